"LoRA adapters: merged == adapter form, frozen base, save/load round trip, clear mismatch errors, the `lora` stage."
import json

import pytest
import torch
from torch import nn

from minimind.generate import generate
from minimind.hub import WeightsError, export_hf, load_model
from minimind.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_QUICK_ARGS, LoRALinear, apply_lora, load_lora, with_replay,
                           lora_layers, lora_parameters, merge_lora, save_lora, unload_lora, unmerge_lora)
from minimind.model import MiniMindConfig, MiniMindForCausalLM, fused_projections

from conftest import micro, run_cli

def trained_lora(model, seed=1, **kw):
    "Adapters on `model` with random (as if trained) A and B."
    names = apply_lora(model, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return names

def logits(model, ids):
    with torch.no_grad(): return model(ids).logits

IDS = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(0))

def test_init_equals_base_and_every_projection_is_wrapped():
    base, model = micro().eval(), micro().eval()
    names = apply_lora(model, rank=4, alpha=8)
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down, not square only
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert torch.equal(logits(model, IDS), logits(base, IDS))  # B = 0

def test_merged_equals_adapter_form_and_unmerge_restores_base():
    base, model = micro().eval(), micro().eval()
    trained_lora(model, rank=8, alpha=16)
    adapter = logits(model, IDS)
    assert (adapter - logits(base, IDS)).abs().max() > 1e-2  # the adapters do change the model
    assert merge_lora(model) == 7 * 2
    torch.testing.assert_close(logits(model, IDS), adapter, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for (n, p), q in zip(((n, p) for n, p in model.named_parameters() if "lora_" not in n), base.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    torch.testing.assert_close(logits(model, IDS), adapter, atol=1e-5, rtol=0)

def test_layer_scales_by_alpha_over_rank_and_freezes_its_base():
    layer = LoRALinear(nn.Linear(6, 5, bias=False), rank=2, alpha=6)
    assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    with torch.no_grad(): layer.lora_B.normal_()
    x = torch.randn(3, 6)
    want = x @ (layer.base.weight + 3.0 * layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)

def test_only_adapters_train_and_change():
    model = micro().eval()
    apply_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == len(lora_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # step 1 moves B only (A's gradient is 0 while B = 0); step 2 moves A too
        out = model(IDS[:, :-1])
        nn.functional.cross_entropy(out.logits.flatten(0, 1), IDS[:, 1:].flatten()).backward()
        opt.step(); opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

def test_fused_generation_with_adapters_attached():
    model = micro().eval()
    trained_lora(model, rank=4)
    with fused_projections(model):
        attn = model.model.layers[0].self_attn
        assert attn.fused_qkv is not None  # LoRALinear.fuse, not the unfused fallback
        x = torch.randn(1, 3, model.config.hidden_size)
        torch.testing.assert_close(attn.fused_qkv(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1),
                                   atol=1e-5, rtol=0)
    prompt, ids = IDS[:1, :6], IDS[:1, :6]
    for _ in range(10): ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], 1)  # greedy by full forwards
    assert torch.equal(generate(model, prompt, max_new_tokens=10, stop_ids=[]), ids)

def test_save_load_round_trip(tmp_path):
    base, model = micro().eval(), micro().eval()
    trained_lora(model, rank=4, alpha=8)
    want = logits(model, IDS)
    path = save_lora(model, tmp_path/"adapter")
    assert sorted(p.name for p in path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    meta = json.loads((path/ADAPTER_CONFIG).read_text())
    assert (meta["rank"], meta["alpha"], meta["base_config"]["hidden_size"]) == (4, 8, 64)
    load_lora(base, path)  # a plain model: wrapped from the file's targets
    assert torch.equal(logits(base, IDS), want)
    other = micro(seed=5).eval()
    apply_lora(other, rank=4, alpha=8)  # the same adapters already attached: overwritten
    load_lora(other, path)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(other), lora_parameters(model)))

def test_merged_export_loads_as_a_plain_model(tmp_path):
    model = micro().eval()
    trained_lora(model, rank=4)
    want = logits(model, IDS)
    export_hf(unload_lora(model), tmp_path/"model")
    assert not lora_layers(model)
    torch.testing.assert_close(logits(load_model(tmp_path/"model"), IDS), want, atol=1e-5, rtol=0)

def test_mismatched_model_errors_clearly(tmp_path):
    model = micro().eval()
    trained_lora(model, rank=4)
    path = save_lora(model, tmp_path/"adapter")
    with pytest.raises(ValueError, match="hidden_size: adapter 64, model 128"):
        load_lora(micro(hidden_size=128).eval(), path)
    other = micro().eval()
    apply_lora(other, rank=8)
    with pytest.raises(ValueError, match="rank: file 4, model \\[8\\]"):
        load_lora(other, path)
    other = micro().eval()
    apply_lora(other, rank=4, targets="attn")
    with pytest.raises(ValueError, match="adapted layers differ"):
        load_lora(other, path)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        load_lora(micro().eval(), tmp_path)
    from safetensors.torch import load_file, save_file  # a tensor of the wrong shape in the file
    sd = load_file(path/ADAPTER_WEIGHTS)
    sd["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(4, 65)
    save_file(sd, path/ADAPTER_WEIGHTS)
    with pytest.raises(WeightsError, match="q_proj.lora_A file \\(4, 65\\) != model \\(4, 64\\)"):
        load_lora(micro().eval(), path)

def test_tied_lm_head_and_bad_targets_are_refused():
    with pytest.raises(ValueError, match="tied"): apply_lora(micro().eval(), targets="lm_head")
    with pytest.raises(ValueError, match="match none"): apply_lora(micro().eval(), targets="nothing_here")
    model = micro().eval()
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"): apply_lora(model)

def test_minimind2_small_rank16_adapter_is_small(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset("minimind2-small"))
    apply_lora(model, rank=16)
    size = (save_lora(model, tmp_path/"a")/ADAPTER_WEIGHTS).stat().st_size
    assert size < 5e6
    per_layer = sum(i + o for i, o in [(512, 512), (512, 128), (512, 128), (512, 512), (512, 1408), (512, 1408), (1408, 512)])
    assert size > 4 * 16 * 8 * per_layer  # every projection of the 8 layers is in it, in float32

def test_lora_stage_smoke(tmp_path):
    "`python -m minimind.train lora` with its quick flags, from a quick SFT run: adapter and merged model written."
    pytest.importorskip("minimind.sft")
    from minimind.sft import SFT
    from minimind.runs import require
    require(SFT, tmp_path, quick=True)  # data, tokenizer, pretrain and sft, each its quick version
    out = run_cli("lora", "--run-dir", tmp_path, *LORA_QUICK_ARGS)
    assert out.returncode == 0, out.stderr[-3000:]
    lora = tmp_path/"lora"
    meta = json.loads((lora/"adapter"/ADAPTER_CONFIG).read_text())
    assert (meta["rank"], meta["alpha"]) == (16, 32)
    assert (lora/"model"/"model.safetensors").exists() and (lora/"model"/"tokenizer.json").exists()
    assert (lora/"adapter"/ADAPTER_WEIGHTS).stat().st_size < (lora/"model"/"model.safetensors").stat().st_size
    numbers = json.loads((lora/"done.json").read_text())["numbers"]
    assert "->" in numbers["val ce (other topics)"] and "->" in numbers["says Lumi/小光"]
    sft = load_model(tmp_path/"sft"/"model")  # the adapter on the SFT model == the exported merged model
    load_lora(sft, lora/"adapter")
    torch.testing.assert_close(logits(sft, IDS), logits(load_model(lora/"model"), IDS), atol=1e-5, rtol=0)

def test_replay_adds_sft_conversations_that_ask_none_of_the_adapters_questions():
    def conv(q, a): return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    own = [conv("Who are you?", "I am Lumi."), conv("What is your name?", "Lumi.")]
    sft = [conv("Who are you?", "I am MiniMind.")] + [conv(f"What is {i} + 1?", str(i + 1)) for i in range(10)]
    mixed = with_replay(own, sft, 4, seed=0)
    assert mixed[:2] == own and len(mixed) == 6
    assert all(r["conversations"][0]["content"] != "Who are you?" for r in mixed[2:])  # the old answer is never replayed
    assert mixed == with_replay(own, sft, 4, seed=0) and mixed != with_replay(own, sft, 4, seed=1)
    assert with_replay(own, sft, 0) == own and len(with_replay(own, sft, 99)) == 2 + 10  # capped by the pool
    class Chars:  # a "tokenizer" with one token per character
        def apply_chat_template(self, conv): return "".join(m["content"] for m in conv)
        def encode(self, text): return list(text)
    short = with_replay(own, sft + [conv("What is 100000 + 1?", "100001")], 99, tok=Chars(), seq_len=20)
    assert all(len(Chars().apply_chat_template(r["conversations"])) <= 21 for r in short[2:])  # the replayed ones fit
    assert len(short) == 2 + 10  # "What is 100000 + 1?100001" is 25 characters: left out

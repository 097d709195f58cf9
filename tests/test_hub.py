"Tests for minimind.hub: strict loading of upstream checkpoints, Hugging Face export (Llama / Qwen3), round trips."
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minimind.hub import (WeightsError, check_state_dict, config_to_hf, export_hf, hf_layout, hf_to_config,
                          infer_preset, load_model, read_state_dict, save_pth)
from minimind.model import MiniMindConfig, MiniMindForCausalLM

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def make(preset="micro", seed=0, **overrides):
    "A random model in eval mode (norm gains randomised too, so a lost norm weight shows in the logits)."
    torch.manual_seed(seed)
    m = MiniMindForCausalLM(MiniMindConfig.from_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("norm.weight"): p.uniform_(0.5, 1.5)
    return m


def minimind2_style(): return make("micro", qk_norm=False, rms_norm_eps=1e-5)      # GQA 4/2, Llama layout
def minimind3_style(): return make("micro", head_dim=24)                              # q/k norm, head_dim != 64/4


def hf_load(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def max_diff(a, b): return (a - b).abs().max().item()


@pytest.mark.parametrize("build,cls", [(minimind2_style, "LlamaForCausalLM"), (minimind3_style, "Qwen3ForCausalLM")])
def test_transformers_loads_export_with_same_logits(tmp_path, build, cls):
    m = build()
    d = export_hf(m, tmp_path / "hf")
    hf = hf_load(d)
    assert type(hf).__name__ == cls
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [cls] and cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(d / "model.safetensors")            # tied: stored once
    torch.manual_seed(1)
    ids = torch.randint(3, m.config.vocab_size, (3, 17))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, m(ids).logits) < 1e-4
        mask = torch.ones_like(ids)
        mask[0, :5], mask[1, :11] = 0, 0                                           # left padding
        ids[mask == 0] = m.config.pad_token_id
        ours, theirs = m(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
        real = mask.bool()
        assert max_diff(ours[real], theirs[real]) < 1e-4


def test_export_is_not_trivially_equal(tmp_path):
    "The comparison above can fail: a model with one changed weight gives different logits from the export."
    m = minimind3_style()
    hf = hf_load(export_hf(m, tmp_path / "hf"))
    with torch.no_grad(): m.model.layers[1].self_attn.k_norm.weight[0] += 1.0
    ids = torch.randint(3, m.config.vocab_size, (2, 9))
    with torch.no_grad(): assert max_diff(hf(ids).logits, m(ids).logits) > 1e-3


def test_untied_export(tmp_path):
    m = make("micro", qk_norm=False, tie_word_embeddings=False)
    with torch.no_grad(): m.lm_head.weight.normal_()
    d = export_hf(m, tmp_path / "hf")
    assert "lm_head.weight" in load_file(d / "model.safetensors")
    hf = hf_load(d)
    ids = torch.randint(3, m.config.vocab_size, (2, 9))
    with torch.no_grad(): assert max_diff(hf(ids).logits, m(ids).logits) < 1e-4
    back = load_model(d)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)


def test_yarn_export_matches_and_control_differs(tmp_path):
    yarn = dict(type="yarn", factor=8, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                attention_factor=1.0)
    m = make("micro", rope_scaling=yarn)
    d = export_hf(m, tmp_path / "hf")
    assert json.loads((d / "config.json").read_text())["rope_scaling"]["rope_type"] == "yarn"
    hf = hf_load(d)
    plain = make("micro")
    plain.load_state_dict(m.state_dict())
    ids = torch.randint(3, m.config.vocab_size, (1, 200))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, m(ids).logits) < 1e-4
        assert max_diff(hf(ids).logits, plain(ids).logits) > 1e-3
    assert load_model(d).config.rope_scaling["factor"] == 8


def test_yarn_inactive_when_table_is_short():
    "Our model applies YaRN only past the original window; the export must not switch it on either."
    c = MiniMindConfig.from_preset("micro", inference_rope_scaling=True)        # 512 positions <= 2048
    assert config_to_hf(c)["rope_scaling"] is None
    assert config_to_hf(MiniMindConfig.from_preset("minimind2-small", inference_rope_scaling=True))["rope_scaling"]


@pytest.mark.parametrize("build", [minimind2_style, minimind3_style])
def test_hf_dir_round_trip_is_identical(tmp_path, build):
    m = build()
    back = load_model(export_hf(m, tmp_path / "hf"))
    assert back.config == m.config
    ours, theirs = m.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours: assert torch.equal(ours[k], theirs[k]), k
    assert back.lm_head.weight is back.model.embed_tokens.weight                  # still tied


def test_bf16_export_loads_in_requested_dtype(tmp_path):
    m = minimind2_style()
    d = export_hf(m, tmp_path / "hf", dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(d / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_model(d)
    assert back.lm_head.weight.dtype == torch.float32
    for k, v in m.state_dict().items(): assert torch.equal(back.state_dict()[k], v.bfloat16().float()), k
    assert load_model(d, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_minimind_layout_round_trip(tmp_path):
    m = minimind3_style()
    d = export_hf(m, tmp_path / "mm", layout="minimind")
    assert json.loads((d / "config.json").read_text())["model_type"] == "minimind"
    back = load_model(d)
    assert back.config == m.config
    for k, v in m.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k


def test_moe_exports_in_minimind_layout(tmp_path):
    pytest.importorskip("minimind.moe")
    m = make("tiny-moe")
    assert hf_layout(m.config) == "minimind"
    with pytest.raises(ValueError, match="MoE"): export_hf(m, tmp_path / "x", layout="qwen3")
    back = load_model(export_hf(m, tmp_path / "mm"))
    assert back.config == m.config
    for k, v in m.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(3, m.config.vocab_size, (2, 9))
    with torch.no_grad(): assert torch.equal(back(ids).logits, m(ids).logits)


def test_wrong_layout_is_refused():
    with pytest.raises(ValueError, match="qk_norm"): config_to_hf(minimind2_style().config, "qwen3")
    with pytest.raises(ValueError, match="qk_norm"): config_to_hf(minimind3_style().config, "llama")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_upstream_pth_loads_strict_and_matches_after_cast(tmp_path, half):
    m = minimind3_style()
    path = tmp_path / "full_sft_64.pth"
    torch.save({k: v.to(half) for k, v in m.state_dict().items()}, path)          # as upstream's trainer does
    loaded = load_model(path, config=m.config)
    rounded = MiniMindForCausalLM(m.config).eval()
    rounded.load_state_dict({k: v.to(half).float() for k, v in m.state_dict().items()}, strict=True)
    for k, v in rounded.state_dict().items(): assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(3, m.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rounded(ids).logits)
        assert max_diff(loaded(ids).logits, m(ids).logits) < 0.05


def test_save_pth_writes_upstream_format(tmp_path):
    m = make("micro")
    path = save_pth(m, tmp_path / "out" / "pretrain_64.pth")
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(m.state_dict()) and "lm_head.weight" in sd                # both tied names, like upstream
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert not list(path.parent.glob("*.tmp"))
    assert load_model(path).config == m.config                                       # preset inferred


@pytest.mark.parametrize("with_head", [True, False])
def test_tied_lm_head_present_or_absent(tmp_path, with_head):
    m = make("micro")
    sd = m.state_dict()
    if not with_head: sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    torch.save(sd, tmp_path / "w.pth")
    back = load_model(tmp_path / "w.pth", preset="micro")
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_untied_head_in_tied_config_is_an_error(tmp_path):
    sd = {k: v.clone() for k, v in make("micro").state_dict().items()}
    sd["lm_head.weight"] += 1
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="w.pth.*lm_head.weight differs"): load_model(tmp_path / "w.pth", preset="micro")
    assert not load_model(tmp_path / "w.pth", preset="micro", tie_word_embeddings=False).config.tie_word_embeddings


def bad_file(tmp_path, change):
    sd = dict(make("micro").state_dict())
    change(sd)
    path = tmp_path / "broken_512.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e: load_model(path, preset="micro")
    assert str(path) in str(e.value)
    return e.value


def test_missing_key_is_named(tmp_path):
    e = bad_file(tmp_path, lambda sd: sd.pop("model.layers.1.self_attn.q_norm.weight"))
    assert e.missing == ["model.layers.1.self_attn.q_norm.weight"] and not e.unexpected and not e.wrong_shape
    assert "model.layers.1.self_attn.q_norm.weight" in str(e)


def test_extra_key_is_named(tmp_path):
    e = bad_file(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.bias": torch.zeros(3)}))
    assert e.unexpected == ["model.layers.0.self_attn.bias"] and "model.layers.0.self_attn.bias" in str(e)


def test_wrong_shape_is_named(tmp_path):
    e = bad_file(tmp_path, lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(200, 64)}))
    assert [k for k, *_ in e.wrong_shape] == ["model.layers.0.mlp.up_proj.weight"]
    assert "model.layers.0.mlp.up_proj.weight file (200, 64) != model (256, 64)" in str(e)


def test_renamed_keys_list_both_sides():
    sd = {k.replace("self_attn", "attention"): v for k, v in make("micro").state_dict().items()}
    with pytest.raises(WeightsError) as e: check_state_dict(sd, MiniMindConfig.from_preset("micro"), "x.pth")
    assert len(e.value.missing) == len(e.value.unexpected) == 12 and str(e.value).startswith("x.pth:")


@pytest.mark.parametrize("name", ["micro", "tiny", "minimind2-small", "minimind3"])
def test_infer_preset_from_shapes(name):
    with torch.device("meta"): sd = MiniMindForCausalLM(MiniMindConfig.from_preset(name)).state_dict()
    assert infer_preset(sd) == name
    assert infer_preset({k: v for k, v in sd.items() if k != "lm_head.weight"}) == name


def test_infer_preset_refuses_unknown_shapes(tmp_path):
    torch.save(make("micro", hidden_size=96).state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth.*no preset"): load_model(tmp_path / "odd.pth")


def test_resume_file_and_wrapper_prefixes(tmp_path):
    m = make("micro")
    sd = {"module._orig_mod." + k: v.half() for k, v in m.state_dict().items()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 0, "step": 10}, tmp_path / "pretrain_64_resume.pth")
    assert set(read_state_dict(tmp_path / "pretrain_64_resume.pth")) == set(m.state_dict())


def test_sharded_safetensors_dir(tmp_path):
    m = make("micro")
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in parts.items(): save_file({k: sd[k] for k in ks}, tmp_path / f)
    index = {"weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(m.config)))
    for k, v in m.state_dict().items(): assert torch.equal(load_model(tmp_path).state_dict()[k], v), k


def test_not_a_weights_file(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"): read_state_dict(tmp_path / "notes.pth")
    with pytest.raises(FileNotFoundError, match="no weights file"): read_state_dict(tmp_path)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth: expected a dict"): read_state_dict(tmp_path / "list.pth")


def test_hf_config_reading():
    # written by transformers 5: RoPE settings nested in rope_parameters, eos as a list
    v5 = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
              tie_word_embeddings=True, eos_token_id=[2, 0], attention_bias=False, mlp_bias=False, pretraining_tp=1,
              rope_parameters=dict(rope_type="default", rope_theta=1e6))
    c = hf_to_config(v5)
    assert (c.rope_theta, c.eos_token_id, c.head_dim, c.qk_norm, c.rope_scaling) == (1e6, 2, 16, False, None)
    for bad in (dict(attention_bias=True), dict(mlp_bias=True), dict(model_type="mistral"),
                dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e6))):
        with pytest.raises(ValueError, match="cfg.json"): hf_to_config({**v5, **bad}, "cfg.json")


@pytest.mark.parametrize("name", ["minimind2-small", "minimind3", "micro"])
def test_config_mapping_loses_nothing(name):
    c = MiniMindConfig.from_preset(name)
    assert hf_to_config(config_to_hf(c)) == c
    hf_cfg = transformers.AutoConfig.for_model(**config_to_hf(c))
    assert hf_cfg.head_dim == c.head_dim and hf_cfg.num_key_value_heads == c.num_key_value_heads


def test_export_with_tokenizer(tmp_path):
    from minimind.tokenizer import train_tokenizer
    tok = train_tokenizer(["the cat sat on the mat", "小猫坐在垫子上", "Lily has 3 apples"] * 20, vocab_size=300)
    m = make("micro", qk_norm=False, vocab_size=len(tok))
    d = export_hf(m, tmp_path / "hf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert hf_tok("the cat sat")["input_ids"] == tok.encode("the cat sat")
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    with pytest.raises(ValueError, match="vocab_size"): export_hf(make("micro", vocab_size=256), tmp_path / "x", tok)
    with pytest.raises(ValueError, match="eos_token_id"):
        export_hf(make("micro", vocab_size=len(tok), eos_token_id=5), tmp_path / "y", tok)


def test_hub_imports_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import minimind.hub; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

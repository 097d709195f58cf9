"Hugging Face `peft` on our export, unchanged: its LoRA trains, merges and loads back into `minimind` with the same logits."
import pytest
import torch
from conftest import sharp_micro
from safetensors.torch import load_file

from minimind.hub import export_hf, load_model
from minimind.lora import apply_lora, lora_layers, lora_parameters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()


def max_diff(a, b): return (a - b).abs().max().item()


@pytest.fixture(params=["llama", "qwen3"])
def export(request, tmp_path):
    "A micro model with sharp weights, exported in the Llama (no q/k norm) or the Qwen3 layout."
    m = sharp_micro(qk_norm=request.param == "qwen3")
    return export_hf(m, tmp_path/"hf")


def one_lora_step(d, ids, rank=4, alpha=8):
    "PEFT's LoRA on q_proj and v_proj of the export loaded by transformers, after one AdamW step on `ids`."
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return pm.eval(), sum(p.numel() for p in trainable)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_merged_peft_adapter_loads_into_minimind(export, tmp_path):
    ids = torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    pm, _ = one_lora_step(export, ids)
    merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path/"merged")
    ours = load_model(tmp_path/"merged")
    with torch.no_grad():
        theirs, mine, base = merged(ids).logits, ours(ids).logits, load_model(export)(ids).logits
    assert max_diff(theirs, mine) < 1e-4
    assert max_diff(theirs, base) > 1e-2  # the step changed the weights: agreeing is not the base model agreeing with itself


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_adapter_runs_in_our_lora_layers(export, tmp_path):
    ids = torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    pm, n_theirs = one_lora_step(export, ids)
    pm.save_pretrained(tmp_path/"adapter")
    saved = load_file(tmp_path/"adapter"/"adapter_model.safetensors")
    mine = load_model(export)
    apply_lora(mine, rank=4, alpha=8, targets=r"(q|v)_proj$")
    assert sum(p.numel() for p in lora_parameters(mine)) == n_theirs  # same rank, same layers: same parameter count
    with torch.no_grad():
        for name, layer in lora_layers(mine).items():
            layer.lora_A.copy_(saved[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.copy_(saved[f"base_model.model.{name}.lora_B.weight"])
        assert max_diff(pm(ids).logits, mine(ids).logits) < 1e-4

"Tests of minimind.quant: int8 weights close to float, per-channel error bounds, the engine on a quantized model, state dicts."
import copy

import pytest
import torch
from torch import nn

from minimind.generate import generate, generate_tokens
from minimind.model import MiniMindConfig, MiniMindForCausalLM, fused_projections
from minimind.quant import Int8Linear, quantize_model, quantize_weight

from conftest import sharp_micro


def rel_err(a, b): return ((a - b).norm() / b.norm()).item()


def test_quantize_weight_error_is_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 100) * torch.logspace(-4, 1, 16)[:, None]   # rows spanning 5 orders of magnitude
    w[3] = 0                                                         # an all-zero row
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (16,)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-12).all()                    # each row: at most half its own step
    assert (q[3] == 0).all() and torch.isfinite(s).all()
    nz = [i for i in range(16) if i != 3]
    assert (q[nz].abs().amax(1) == 127).all()                        # each row uses the full int8 range
    assert (err.amax(1)[nz] / w[nz].abs().amax(1) <= 0.5 / 127 + 1e-6).all()   # relative to the row, not the matrix


@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 3, 64), (17, 64)])
def test_int8_linear_close_to_float(shape):
    torch.manual_seed(1)
    lin = nn.Linear(64, 96, bias=False)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref, got = lin(x), q8(x)
        weights_only = torch.nn.functional.linear(x, q8.weight.float()) * q8.scale
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 0.02
    assert rel_err(weights_only, ref) < 0.01


def test_int8_linear_follows_its_buffers():
    "The cached fbgemm weight is rebuilt when the int8 buffers change (e.g. by load_state_dict)."
    torch.manual_seed(2)
    a, b = Int8Linear.from_linear(nn.Linear(32, 8, bias=False)), Int8Linear.from_linear(nn.Linear(32, 8, bias=False))
    x = torch.randn(2, 32)
    with torch.inference_mode(): ya = a(x)
    a.load_state_dict(b.state_dict())
    with torch.inference_mode(): torch.testing.assert_close(a(x), b(x))
    assert rel_err(a(x).detach(), ya) > 0.1


def test_fuse_is_exact_rows_side_by_side():
    torch.manual_seed(3)
    parts = [Int8Linear.from_linear(nn.Linear(32, n, bias=False)) for n in (16, 8, 8)]
    fused = Int8Linear.fuse(parts)
    x = torch.randn(3, 1, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_quantize_model_replaces_linears_and_unties_lm_head(qk_norm):
    m = sharp_micro(qk_norm=qk_norm)
    n_linear = sum(isinstance(x, nn.Linear) for x in m.modules())
    q = quantize_model(copy.deepcopy(m))
    assert not any(isinstance(x, nn.Linear) for x in q.modules())
    assert sum(isinstance(x, Int8Linear) for x in q.modules()) == n_linear
    assert q.model.embed_tokens.weight.dtype == torch.float32         # embedding stays float
    torch.testing.assert_close(q.model.embed_tokens.weight, m.model.embed_tokens.weight)
    q8, s = quantize_weight(m.model.embed_tokens.weight)              # lm_head: an int8 copy of the tied matrix
    assert torch.equal(q.lm_head.weight, q8) and torch.equal(q.lm_head.scale, s)
    ids = torch.randint(3, 512, (2, 10))
    with torch.inference_mode():
        assert rel_err(q(ids).logits, m(ids).logits) < 0.03


@pytest.mark.parametrize("qk_norm", [False, True])
def test_quantized_greedy_decode_matches_its_full_forward(qk_norm):
    q = quantize_model(sharp_micro(qk_norm=qk_norm))
    torch.manual_seed(4)
    ids = torch.randint(3, 512, (2, 6))
    out = generate(q, ids, max_new_tokens=12, stop_ids=[])
    ref = ids
    with torch.inference_mode():
        for _ in range(12): ref = torch.cat([ref, q(ref).logits[:, -1:].argmax(-1)], 1)
    assert out.tolist() == ref.tolist()


def test_quantized_model_fuses_during_generation():
    q = quantize_model(sharp_micro())
    attn = q.model.layers[0].self_attn
    with torch.inference_mode(), fused_projections(q):
        assert attn.fused_qkv is not None and q.model.layers[0].mlp.fused_gate_up is not None
    assert attn.fused_qkv is None
    assert all(not k.startswith("fused") and ".fused" not in k for k in q.state_dict())


def test_quantized_state_dict_round_trip(tmp_path):
    q = quantize_model(sharp_micro())
    sd = q.state_dict()
    assert sd["lm_head.weight"].dtype == torch.int8 and sd["lm_head.scale"].dtype == torch.float32
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    torch.save(sd, tmp_path / "q.pt")
    fresh = quantize_model(MiniMindForCausalLM(MiniMindConfig.from_preset("micro")).eval())   # other weights
    ids = torch.randint(3, 512, (1, 8))
    with torch.inference_mode(): before = fresh(ids).logits
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True), strict=True)
    with torch.inference_mode():
        assert not torch.allclose(before, q(ids).logits)
        torch.testing.assert_close(fresh(ids).logits, q(ids).logits)
    assert list(generate_tokens(fresh, ids, max_new_tokens=3, stop_ids=[]))[0].shape == (1,)


def test_bias_is_refused():
    with pytest.raises(ValueError, match="bias"): Int8Linear.from_linear(nn.Linear(4, 4))

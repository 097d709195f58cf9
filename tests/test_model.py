"Tests of minimind.model: attention, RoPE/YaRN, config loading, upstream names and sizes, the loss."
import math

import pytest
import torch
import torch.nn.functional as F

from minimind.model import (PRESETS, Attention, MiniMindConfig, MiniMindForCausalLM, lm_loss, precompute_rope,
                            rope_frequencies, yarn_frequencies, YARN_DEFAULT)

from conftest import micro


def meta_model(name):
    with torch.device("meta"): return MiniMindForCausalLM(MiniMindConfig.from_preset(name))


# ---- attention: naive == SDPA (with GQA, with and without q/k norm) -------------------------------------------

def naive_attention(attn, x, pos):
    "Reference attention written out: projections, per-pair rotations, repeated kv heads, explicit causal softmax."
    B, T, _ = x.shape
    H, Hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, d)
    k = (x @ attn.k_proj.weight.T).view(B, T, Hkv, d)
    v = (x @ attn.v_proj.weight.T).view(B, T, Hkv, d)
    if attn.qk_norm:
        def rms(t, w, eps): return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w
        q, k = rms(q, attn.q_norm.weight, attn.q_norm.eps), rms(k, attn.k_norm.weight, attn.k_norm.eps)
    freqs = rope_frequencies(d)
    def rotate(t):  # t (B, T, heads, d): rotate each pair (i, i+d/2) by pos*freq_i
        out = t.clone()
        for i in range(d // 2):
            a = pos[:, None] * freqs[i]                      # (T, 1)
            x1, x2 = t[..., i], t[..., i + d // 2]
            out[..., i], out[..., i + d // 2] = x1 * a.cos() - x2 * a.sin(), x1 * a.sin() + x2 * a.cos()
        return out
    q, k = rotate(q), rotate(k)
    rep = H // Hkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * d)
    return y @ attn.o_proj.weight.T


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_naive(qk_norm):
    cfg = MiniMindConfig.from_preset("micro", qk_norm=qk_norm, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    attn = Attention(cfg)
    for p in attn.parameters(): torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(2, 9, cfg.hidden_size)
    cos, sin = precompute_rope(cfg.head_dim, 32, cfg.rope_theta)
    with torch.no_grad():
        got = attn(x, cos[:9], sin[:9])
        want = naive_attention(attn, x, torch.arange(9).float())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ---- parameter counts --------------------------------------------------------------------------------------

def test_parameter_counts_match_upstream():
    assert meta_model("minimind2-small").num_parameters() == 25_829_888
    assert meta_model("minimind3").num_parameters() == 63_912_192
    assert round(meta_model("minimind2").num_parameters() / 1e6) == 104
    assert 2.5e6 < meta_model("tiny").num_parameters() < 3.5e6


def test_tied_embeddings_counted_once():
    m = micro().eval()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    untied = MiniMindForCausalLM(MiniMindConfig.from_preset("micro", tie_word_embeddings=False))
    assert untied.num_parameters() - m.num_parameters() == 512 * 64


# ---- upstream state-dict names ------------------------------------------------------------------------------

def upstream_state_dict(c):
    "A state dict with upstream's names and shapes, built from the config alone (REFERENCE.md)."
    h, qd, kvd, f = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    emb = torch.randn(c.vocab_size, h)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.randn(h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.randn(h), p + "post_attention_layernorm.weight": torch.randn(h),
                   p + "self_attn.q_proj.weight": torch.randn(qd, h), p + "self_attn.k_proj.weight": torch.randn(kvd, h),
                   p + "self_attn.v_proj.weight": torch.randn(kvd, h), p + "self_attn.o_proj.weight": torch.randn(h, qd),
                   p + "mlp.gate_proj.weight": torch.randn(f, h), p + "mlp.up_proj.weight": torch.randn(f, h),
                   p + "mlp.down_proj.weight": torch.randn(h, f)})
        if c.qk_norm:
            sd.update({p + "self_attn.q_norm.weight": torch.randn(c.head_dim), p + "self_attn.k_norm.weight": torch.randn(c.head_dim)})
    return sd


@pytest.mark.parametrize("name", ["minimind2-small", "minimind3"])
def test_state_dict_names_are_upstreams(name):
    with torch.device("meta"): want = upstream_state_dict(MiniMindConfig.from_preset(name))
    got = meta_model(name).state_dict()
    assert sorted(got) == sorted(want)
    assert all(got[k].shape == want[k].shape for k in want)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_upstream_state_dict_loads_strict(qk_norm):
    c = MiniMindConfig.from_preset("micro", qk_norm=qk_norm)
    m = MiniMindForCausalLM(c)
    sd = upstream_state_dict(c)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.model.layers[1].mlp.down_proj.weight, sd["model.layers.1.mlp.down_proj.weight"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    bad = dict(sd); bad["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError): m.load_state_dict(bad, strict=True)


# ---- config.json of both generations ------------------------------------------------------------------------

V2_JSON = {"architectures": ["MiniMindForCausalLM"], "auto_map": {"AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
           "aux_loss_alpha": 0.1, "bos_token_id": 1, "dropout": 0.0, "eos_token_id": 2, "flash_attn": True,
           "hidden_act": "silu", "hidden_size": 768, "intermediate_size": None, "max_position_embeddings": 32768,
           "model_type": "minimind", "n_routed_experts": 4, "n_shared_experts": 1, "norm_topk_prob": True,
           "num_attention_heads": 8, "num_experts_per_tok": 2, "num_hidden_layers": 16, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "scoring_func": "softmax", "seq_aux": True,
           "torch_dtype": "float32", "transformers_version": "4.48.0", "use_moe": False, "vocab_size": 6400,
           "inference_rope_scaling": False, "rope_scaling": None}
V3_JSON = {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "bos_token_id": 1, "eos_token_id": 2,
           "dropout": 0.0, "flash_attn": True, "head_dim": 96, "hidden_act": "silu", "hidden_size": 768,
           "intermediate_size": 2432, "max_position_embeddings": 32768, "moe_intermediate_size": 2432,
           "norm_topk_prob": True, "num_attention_heads": 8, "num_experts": 4, "num_experts_per_tok": 1,
           "num_hidden_layers": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
           "router_aux_loss_coef": 0.0005, "tie_word_embeddings": True, "use_moe": False, "vocab_size": 6400,
           "inference_rope_scaling": True, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
           "original_max_position_embeddings": 2048, "attention_factor": 1.0, "type": "yarn"},
           "dtype": "bfloat16", "transformers_version": "5.0.0", "use_cache": True}


def test_config_accepts_minimind2_json():
    c = MiniMindConfig(**V2_JSON)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.head_dim, c.qk_norm) == (768, 16, 2048, 96, False)
    assert (c.n_routed_experts, c.n_shared_experts, c.aux_loss_alpha, c.rms_norm_eps) == (4, 1, 0.1, 1e-5)
    assert c.hf_meta["torch_dtype"] == "float32"
    assert c == MiniMindConfig.from_preset("minimind2", aux_loss_alpha=0.1)


def test_config_accepts_minimind3_json():
    c = MiniMindConfig(**V3_JSON)
    assert (c.qk_norm, c.head_dim, c.num_key_value_heads, c.rms_norm_eps) == (True, 96, 4, 1e-6)
    assert (c.num_experts, c.n_routed_experts, c.n_shared_experts, c.router_aux_loss_coef) == (4, 4, 0, 5e-4)
    assert c.rope_scaling["factor"] == 16
    assert c.to_dict() == MiniMindConfig.from_preset("minimind3", inference_rope_scaling=True).to_dict()
    with torch.device("meta"): assert MiniMindForCausalLM(c).num_parameters() == 63_912_192


def test_config_rejects_unknown_key():
    with pytest.raises(TypeError, match="num_layers"): MiniMindConfig(**V2_JSON, num_layers=8)
    with pytest.raises(ValueError, match="contradicts"): MiniMindConfig(num_experts=4, n_routed_experts=8)
    with pytest.raises(ValueError, match="multiple"): MiniMindConfig(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(KeyError): MiniMindConfig.from_preset("minimind9")


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trips(name):
    c = MiniMindConfig.from_preset(name)
    d = c.to_dict()
    assert MiniMindConfig(**d) == c and MiniMindConfig(**d).to_dict() == d


# ---- the loss -----------------------------------------------------------------------------------------------

def test_loss_ignores_minus_100():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 8, 50), torch.randint(0, 50, (2, 8))
    labels = ids.clone(); labels[0, :5] = -100; labels[1, 6] = -100
    keep = labels[:, 1:] != -100
    want = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(lm_loss(logits, labels), want)
    # logits that predict an ignored target do not matter ...
    noisy = logits.clone(); noisy[0, :4] += 5 * torch.randn(4, 50); noisy[1, 5] += 5 * torch.randn(50)
    assert torch.equal(lm_loss(noisy, labels), lm_loss(logits, labels))
    # ... while the ones predicting a trained target do
    noisy[0, 4] += 5 * torch.randn(50)
    assert not torch.equal(lm_loss(noisy, labels), lm_loss(logits, labels))
    # a batch with no trained position gives 0, not NaN
    assert lm_loss(logits, torch.full_like(ids, -100)).item() == 0.0


def test_model_loss_and_aux():
    m = micro().eval()
    ids = torch.randint(0, 512, (2, 12))
    labels = ids.clone(); labels[:, :5] = -100
    out = m(ids, labels=labels)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, labels))
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert abs(m(ids, labels=ids).loss.item() - math.log(512)) < 0.3   # init: about uniform


def test_left_padding_matches_unpadded():
    m = micro().eval()
    ids = torch.randint(3, 512, (1, 7))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(m(padded, attention_mask=mask).logits[:, 4:], m(ids).logits, atol=1e-5, rtol=1e-4)


def test_moe_layers_built_by_the_block_and_aux_summed(monkeypatch):
    "With use_moe the block builds chapter 03's layer (handing it this chapter's experts), and the model sums its aux losses."
    import minimind.model
    class FakeMoE(torch.nn.Module):
        def __init__(self, config, expert, linear):
            super().__init__()
            assert isinstance(expert(8), minimind.model.FeedForward) and linear is minimind.model.Linear
            self.experts = torch.nn.ModuleList([torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)
                                                for _ in range(config.n_routed_experts)])
        def forward(self, x):
            self.aux_loss = x.new_tensor(0.25)
            return self.experts[0](x)
    monkeypatch.setattr(minimind.model, "MoEFeedForward", FakeMoE)
    m = MiniMindForCausalLM(MiniMindConfig.from_preset("micro", use_moe=True, n_routed_experts=4, num_experts_per_tok=1))
    out = m(torch.randint(0, 512, (1, 5)))
    assert out.aux_loss.item() == pytest.approx(0.25 * 2)
    per_expert = 64 * 64
    assert m.num_parameters() - m.num_parameters(active=True) == 2 * 3 * per_expert


# ---- RoPE / YaRN --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 96])
def test_yarn_keeps_fast_dims_and_slows_slow_ones(head_dim):
    base, yarn = rope_frequencies(head_dim), yarn_frequencies(head_dim, 1e6, YARN_DEFAULT)
    ratio = yarn / base
    turns = 2048 * base / (2 * math.pi)                   # full turns of each pair over the original window
    torch.testing.assert_close(ratio[turns > 32], torch.ones(int((turns > 32).sum())))
    torch.testing.assert_close(ratio[turns < 1], torch.full((int((turns < 1).sum()),), 1 / 16))
    assert (turns > 32).any() and (turns < 1).any()
    assert torch.all(ratio[1:] <= ratio[:-1] + 1e-7)     # monotone ramp between


def test_yarn_only_beyond_original_window():
    c1, s1 = precompute_rope(64, 1024, 1e6, YARN_DEFAULT)
    c0, s0 = precompute_rope(64, 1024, 1e6, None)
    assert torch.equal(c1, c0) and torch.equal(s1, s0)
    c2, _ = precompute_rope(64, 4096, 1e6, YARN_DEFAULT)
    assert not torch.equal(c2[:1024], c0)
    c = MiniMindConfig.from_preset("micro", inference_rope_scaling=True, max_position_embeddings=4096)
    assert torch.equal(MiniMindForCausalLM(c).model.freqs_cos, precompute_rope(c.head_dim, 4096, 1e6, YARN_DEFAULT)[0])


# ---- fused projections (inference) ----------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_projections_same_logits_and_temporary(qk_norm):
    from minimind.model import fused_projections
    m = micro(qk_norm=qk_norm).eval()
    ids = torch.randint(0, 512, (2, 9))
    keys = sorted(m.state_dict())
    with torch.no_grad():
        plain = m(ids).logits
        with fused_projections(m):
            attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
            assert attn.fused_qkv is not None and mlp.fused_gate_up is not None
            torch.testing.assert_close(m(ids).logits, plain, atol=1e-5, rtol=1e-5)
            assert sorted(m.state_dict()) == keys
            with torch.no_grad(): m.model.layers[0].self_attn.q_proj.weight.add_(1.0)   # training would change weights...
            m.train()                                                                   # ...and in train mode the
            assert not torch.allclose(m(ids).logits, plain)                             # fused copies are not used
            m.eval()
    assert m.model.layers[0].self_attn.fused_qkv is None and m.model.layers[0].mlp.fused_gate_up is None


# ---- the matrix product: oneDNN == F.linear, and where it is not used ----------------------------------------

needs_onednn = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN linear op")


@needs_onednn
@pytest.mark.parametrize("out_features", [3, 40])  # dy narrower and wider than x: both weight-gradient layouts
def test_onednn_linear_matches_f_linear(out_features):
    from minimind.model import OneDNNLinear
    torch.manual_seed(0)
    x = torch.randn(24, 16).t()[:, :12]                   # (16, 12), non-contiguous
    w = torch.randn(out_features, 12)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ya, yb = OneDNNLinear.apply(xa, wa), F.linear(xb, wb)
    dy = torch.randn_like(yb)
    ya.backward(dy); yb.backward(dy)
    for a, b in [(ya, yb), (xa.grad, xb.grad), (wa.grad, wb.grad)]:
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_linear_skips_gradients_nobody_needs():
    from minimind.model import OneDNNLinear
    x, w = torch.randn(8, 4), torch.randn(6, 4, requires_grad=True)  # x needs no gradient: only dW is computed
    OneDNNLinear.apply(x, w).sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, torch.ones(6, 8) @ x, atol=1e-5)


def test_linear_leaves_autocast_alone():
    "Under CPU autocast the product must run in the autocast dtype, not in oneDNN's fp32."
    from minimind.model import linear
    x, w = torch.randn(2, 5, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16): y = linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 3)
    assert linear(x, w).dtype == torch.float32


def test_model_same_loss_and_gradients_with_and_without_onednn(monkeypatch):
    import minimind.model as mm
    if not mm.ONEDNN_FP32: pytest.skip("this CPU uses PyTorch's default products (no AVX-512)")
    ids = torch.randint(3, 512, (2, 9))
    grads = []
    for flag in (True, False):
        monkeypatch.setattr(mm, "ONEDNN_FP32", flag)
        m = micro().train()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]: assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n

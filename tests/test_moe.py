"Behaviour of the mixture-of-experts layer (chapter 03): dispatch, routing, balancing, names."
import math
from functools import partial

import pytest
import torch
from torch import nn

from minimind.model import FeedForward, Linear, MiniMindConfig, MiniMindForCausalLM
from minimind.moe import MoEFeedForward, dispatch, load_balance_loss, route, update_router_bias


def moe_layer(config, **kw):
    "The MoE layer with chapter 02's experts and router, as `MiniMindBlock` builds it."
    return MoEFeedForward(config, partial(FeedForward, config), Linear, **kw)

def small_config(k=2, shared=1, **kw):
    return MiniMindConfig(hidden_size=16, intermediate_size=24, use_moe=True, n_routed_experts=4,
                          num_experts_per_tok=k, n_shared_experts=shared, **kw)


def naive(moe, x):
    "Reference: every token through each of its chosen experts, one at a time."
    B, T, C = x.shape
    xf = x.reshape(-1, C)
    _, idx, weight = route(moe.gate(xf), moe.top_k, moe.norm_topk_prob)
    rows = []
    for n in range(len(xf)):
        y = sum(weight[n, j] * moe.experts[int(idx[n, j])](xf[n]) for j in range(moe.top_k))
        rows.append(y + sum(s(xf[n]) for s in getattr(moe, "shared_experts", [])))
    return torch.stack(rows).view(B, T, C)


def outputs_and_grads(moe, f, x):
    for p in moe.parameters(): p.grad = None
    xg = x.clone().requires_grad_()
    y = f(xg)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), xg.grad] + [p.grad.clone() for p in moe.parameters()]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("norm", [True, False])
def test_grouped_dispatch_equals_naive_loop(k, shared, norm):
    torch.manual_seed(k + 2 * shared)
    moe = moe_layer(small_config(k, shared, norm_topk_prob=norm))
    x = torch.randn(3, 7, 16)
    ref, got = outputs_and_grads(moe, lambda xg: naive(moe, xg), x), outputs_and_grads(moe, moe, x)
    assert len(ref) == len(got) == 2 + len(list(moe.parameters()))
    for a, b in zip(ref, got): torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_idle_expert_gets_zero_gradient_not_none():
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(3))
    x = torch.randn(5, 8)
    idx = torch.zeros(5, 1, dtype=torch.long)                 # every token to expert 0
    dispatch(x, idx, torch.ones(5, 1), experts).sum().backward()
    assert experts[0].weight.grad.abs().sum() > 0
    for e in experts[1:]: assert e.weight.grad is not None and e.weight.grad.abs().sum() == 0


def test_routing_weights_sum_to_one_and_follow_the_scores():
    logits = torch.randn(50, 6)
    scores, idx, w = route(logits, 3, norm_topk_prob=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    torch.testing.assert_close(scores, logits.softmax(-1))
    assert torch.equal(idx.sort(-1).values, scores.topk(3).indices.sort(-1).values)
    _, _, raw = route(logits, 3, norm_topk_prob=False)
    torch.testing.assert_close(raw, scores.topk(3).values)
    assert (raw.sum(-1) < 1).all()


@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_alpha_when_balanced_and_larger_when_collapsed(seq_aux, k):
    B, T, E, alpha = 2, 8, 4, 0.1
    even = (torch.arange(B * T * k) % E).view(B, T, k)         # every expert picked equally often
    uniform = torch.full((B, T, E), 1 / E)
    torch.testing.assert_close(load_balance_loss(uniform, even, alpha, seq_aux), torch.tensor(alpha))
    peaked = torch.full((B, T, E), 0.02 / (E - 1)); peaked[..., 0] = 0.98
    one = torch.zeros(B, T, k, dtype=torch.long)
    one[..., 1:] = 1                                            # top-k>1: second pick to expert 1
    collapsed = load_balance_loss(peaked, one, alpha, seq_aux)
    assert collapsed > 1.5 * alpha
    if k == 1: torch.testing.assert_close(collapsed, torch.tensor(0.98 * E * alpha))


def test_seq_level_loss_charges_sequences_that_split_the_experts():
    B, T, E, alpha = 2, 8, 4, 0.1
    halves = torch.stack([torch.arange(T) % 2, torch.arange(T) % 2 + 2]).view(B, T, 1)
    scores = torch.nn.functional.one_hot(halves.squeeze(-1), E).float() * 0.5 + 0.125
    assert load_balance_loss(scores, halves, alpha, True) > load_balance_loss(scores, halves, alpha, False) + 1e-3


def test_aux_loss_gradient_pushes_busy_expert_down():
    logits = torch.zeros(1, 16, 4, requires_grad=True)
    idx = torch.zeros(1, 16, 1, dtype=torch.long)              # expert 0 got everything
    load_balance_loss(logits.softmax(-1), idx, 0.01).backward()
    g = logits.grad.sum((0, 1))
    assert g[0] > 0 and (g[1:] < 0).all()                      # descent lowers expert 0's logit


def test_bias_update_moves_load_toward_uniform_and_keeps_mixing_weights():
    torch.manual_seed(0)
    moe = moe_layer(small_config(k=2, shared=0, aux_loss_alpha=0.0), bias_update_rate=0.01)
    with torch.no_grad(): moe.gate.weight[0] = 0.3              # with inputs of mean 0.5: expert 0 favoured
    x = torch.randn(4, 64, 16) + 0.5
    moe.train(); moe(x)
    before = moe.last_load.clone()
    assert before[0] > 0.4
    gate_before = moe.gate.weight.clone()
    loads = []
    for _ in range(100):
        moe(x)
        loads.append(moe.last_load.clone())
        assert update_router_bias(moe) == 1
    after = torch.stack(loads[-10:]).mean(0)                     # the sign rule ends in a small oscillation
    assert (after - 0.25).abs().max() < (before - 0.25).abs().max() / 4
    assert torch.equal(moe.gate.weight, gate_before)            # the rule never touches the router's weights
    assert "expert_bias" in dict(moe.named_buffers()) and not any(n == "expert_bias" for n, _ in moe.named_parameters())
    # selection uses the bias; the mixing weights are the unbiased scores of the chosen experts, renormalised
    xf = x.reshape(-1, 16)
    scores, idx, w = route(moe.gate(xf), 2, True, moe.expert_bias)
    chosen = scores.gather(-1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))
    _, idx_plain, _ = route(moe.gate(xf), 2, True)
    assert not torch.equal(idx, idx_plain)                      # the bias did change some choices
    y = dispatch(xf, idx, w, moe.experts).view_as(x)
    moe.eval(); torch.testing.assert_close(moe(x), y)


def test_bias_update_is_a_noop_without_counts_and_in_eval():
    moe = moe_layer(small_config(), bias_update_rate=0.1)
    assert update_router_bias(moe) == 1 and moe.expert_bias.abs().sum() == 0
    moe.eval(); moe(torch.randn(2, 5, 16)); update_router_bias(moe)
    assert moe.expert_bias.abs().sum() == 0
    assert update_router_bias(moe_layer(small_config())) == 0   # layers without the bias are skipped


def test_statistics_of_the_last_forward():
    torch.manual_seed(0)
    moe = moe_layer(small_config(k=1, shared=0)).eval()
    with torch.inference_mode(): moe(torch.randn(2, 9, 16))
    assert math.isclose(moe.last_load.sum().item(), 1.0, rel_tol=1e-6)
    assert 0 < moe.last_entropy.item() <= math.log(4) + 1e-6
    with torch.no_grad(): moe.gate.weight.zero_()
    moe(torch.randn(2, 9, 16))
    assert math.isclose(moe.last_entropy.item(), math.log(4), rel_tol=1e-5)   # no preference: log E
    assert not moe.last_load.requires_grad and "last_load" not in moe.state_dict()


def upstream_keys(n_layers, n_experts, n_shared, qk_norm):
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    ffn = ("gate_proj", "up_proj", "down_proj")
    for i in range(n_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight"]
        keys += [p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        keys += [p + f"self_attn.{n}.weight" for n in ("q_norm", "k_norm")] if qk_norm else []
        keys += [p + f"mlp.experts.{e}.{n}.weight" for e in range(n_experts) for n in ffn]
        keys += [p + f"mlp.shared_experts.{s}.{n}.weight" for s in range(n_shared) for n in ffn]
    return sorted(keys)


@pytest.mark.parametrize("preset,n_shared,qk", [("minimind2-moe", 1, False), ("minimind3-moe", 0, True)])
def test_state_dict_names_and_shapes_match_upstream(preset, n_shared, qk):
    with torch.device("meta"): m = MiniMindForCausalLM(MiniMindConfig.from_preset(preset))
    sd = m.state_dict()
    assert sorted(sd) == upstream_keys(8, 4, n_shared, qk)
    h = m.config.hidden_size
    assert sd["model.layers.0.mlp.gate.weight"].shape == (4, h)
    assert sd["model.layers.3.mlp.experts.2.up_proj.weight"].shape == (m.config.moe_intermediate_size, h)


def test_upstream_moe_counts():
    def count(name, active):
        with torch.device("meta"): return MiniMindForCausalLM(MiniMindConfig.from_preset(name)).num_parameters(active)
    assert round(count("minimind2-moe", False) / 1e6) == 145
    assert round(count("minimind3-moe", False) / 1e6) == 198 and round(count("minimind3-moe", True) / 1e6) == 64


def test_tiny_moe_model_trains():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset("tiny-moe", vocab_size=300)).train()
    x = torch.randint(0, 300, (2, 24))
    out = model(x, labels=x)
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    (out.loss + out.aux_loss).backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0   # top-1 + norm_topk_prob: only aux trains the router
    model.eval()
    with torch.no_grad(): assert model(x).aux_loss == 0


def test_loss_free_bias_in_a_model_is_saved_and_restored():
    cfg = MiniMindConfig.from_preset("tiny-moe", vocab_size=100, num_hidden_layers=2)
    cfg.moe_bias_update_rate = 0.05
    model = MiniMindForCausalLM(cfg).train()
    x = torch.randint(0, 100, (2, 16))
    model(x); assert update_router_bias(model) == 2
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.expert_bias"].abs().sum() > 0
    twin = MiniMindForCausalLM(cfg); twin.load_state_dict(sd, strict=True)
    model.eval(); twin.eval()
    with torch.no_grad(): torch.testing.assert_close(twin(x).logits, model(x).logits)


def test_only_softmax_scoring_is_supported():
    with pytest.raises(ValueError, match="scoring_func"): moe_layer(small_config(scoring_func="sigmoid"))


@pytest.mark.parametrize("mode", ["autocast", "bf16 weights"])
def test_low_precision_forward_matches_fp32(mode):
    torch.manual_seed(0)
    moe = moe_layer(small_config(k=2, shared=1)).train()
    x = torch.randn(2, 6, 16)
    ref = moe(x)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16): y = moe(x)
    else:
        y = moe.to(torch.bfloat16)(x.bfloat16())
    assert y.shape == ref.shape and torch.isfinite(moe.aux_loss)
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), ref.detach(), atol=0.05, rtol=0.05)

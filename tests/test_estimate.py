"The GPU estimates of chapter 95b: time from FLOPs, memory from parameter states and measured activations."
import pytest
import torch

import minimind.estimate as estimate

MICRO = estimate.MiniMindConfig.from_preset("micro")


def test_estimated_time_is_linear_in_tokens_and_inverse_in_peak_and_gpus():
    base = estimate.estimate_run(MICRO, 1e6, 64, 2, "RTX 3090")
    assert estimate.estimate_run(MICRO, 3e6, 64, 2, "RTX 3090")["seconds"] == pytest.approx(3 * base["seconds"])
    fast = estimate.GPU("fast", 24, 2 * estimate.GPUS["RTX 3090"].peak_flops, "bf16")
    assert estimate.estimate_run(MICRO, 1e6, 64, 2, fast)["seconds"] == pytest.approx(base["seconds"] / 2)
    assert estimate.estimate_run(MICRO, 1e6, 64, 2, "RTX 3090", n_gpus=8)["seconds"] == pytest.approx(base["seconds"] / 8)
    fpt = estimate.flops_per_token(estimate.meta_model(MICRO), 64)  # the engine's own count, not a copy
    assert base["seconds"] == pytest.approx(1e6 * fpt / (71e12 * 0.35))


def test_estimated_memory_grows_with_the_micro_batch_and_states_are_16_bytes_per_parameter():
    n = estimate.meta_model(MICRO).num_parameters()
    one, four = (estimate.estimate_run(MICRO, 1e6, 64, b)["memory"] for b in (1, 4))
    assert one["states"] == four["states"] == 16 * n  # fp32 weight, gradient and AdamW's two moments
    assert four["activations"] > one["activations"] > 0
    fixed, per_token = estimate.activation_fit(MICRO)
    assert four["activations"] - one["activations"] == pytest.approx(3 * 64 * per_token)
    assert estimate.estimate_run(MICRO, 1e6, 64, 1, n_gpus=2)["memory"]["states"] == 20 * n  # DDP's gradient buckets
    lora = estimate.estimate_run(MICRO, 1e6, 64, 1, adapters=1000)["memory"]["states"]
    assert lora == 4 * n + 16 * 1000  # frozen base: its weights only


def test_the_activation_fit_predicts_a_bigger_measured_batch():
    fixed, per_token = estimate.activation_fit(MICRO)
    torch.manual_seed(0)
    measured = estimate.saved_activation_bytes(estimate.MiniMindForCausalLM(MICRO).train(), 3, 96)
    assert fixed + per_token * 3 * 96 == pytest.approx(measured, rel=0.02)


def test_a_run_that_needs_more_memory_than_the_gpu_has_does_not_fit():
    tiny_gpu = estimate.GPU("tiny", 0.001, 1e12, "bf16")
    assert not estimate.estimate_run(MICRO, 1e6, 64, 2, tiny_gpu)["fits"]
    assert estimate.estimate_run(MICRO, 1e6, 64, 2, "A100 80GB")["fits"]


def test_an_unknown_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown GPU 'RTX 9090'.*RTX 3090"):
        estimate.estimate_run(MICRO, 1e6, 64, 2, "RTX 9090")

"""Distillation: the loss against hand-computed values, masks, a frozen teacher under no_grad, and the `distill` stage."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from minimind.distill import DISTILL_QUICK_ARGS, DistillLoss, distill_loss, make_student, shrink
from minimind.engine import Trainer, TrainConfig
from minimind.model import MiniMindConfig

from conftest import micro, run_cli

def random_logits(B=2, T=6, V=9, seed=0, masked=0.4):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < masked] = -100
    labels[0, 0] = 3  # at least one trained position
    return s, t, labels

def toy_batch(B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, : T // 3] = -100  # a prompt
    return {"input_ids": ids, "labels": labels}

def test_alpha_one_is_plain_cross_entropy():
    s, t, labels = random_logits()
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=-100)
    for kind in ("forward", "reverse"):
        loss, metrics = distill_loss(s, t, labels, alpha=1.0, temperature=3.0, kind=kind)
        assert torch.allclose(loss, ce, atol=1e-6) and torch.allclose(metrics["ce"], ce, atol=1e-6)

def test_kl_is_zero_when_student_equals_teacher():
    s, _, labels = random_logits()
    for kind in ("forward", "reverse"):
        loss, metrics = distill_loss(s, s.clone(), labels, alpha=0.3, temperature=2.0, kind=kind)
        assert abs(metrics["kl"].item()) < 1e-6
        assert torch.allclose(loss, 0.3 * metrics["ce"], atol=1e-6)

def test_forward_and_reverse_kl_match_hand_computed_values():
    # the teacher's logits [0, 2 ln 3] give p = [1/4, 3/4] at T = 2; the student's [0, 2 ln 2] give
    # q = [1/3, 2/3] at T = 2 and [1/5, 4/5] at T = 1 (where the cross-entropy is taken)
    s = torch.tensor([[[0.0, 2 * math.log(2)]]])
    t = torch.tensor([[[0.0, 2 * math.log(3)]]])
    labels = torch.tensor([[1]])
    forward = 1 / 4 * math.log((1 / 4) / (1 / 3)) + 3 / 4 * math.log((3 / 4) / (2 / 3))
    reverse = 1 / 3 * math.log((1 / 3) / (1 / 4)) + 2 / 3 * math.log((2 / 3) / (3 / 4))
    ce = -math.log(4 / 5)
    for kind, want in (("forward", forward), ("reverse", reverse)):
        loss, metrics = distill_loss(s, t, labels, alpha=0.25, temperature=2.0, kind=kind)
        assert metrics["kl"].item() == pytest.approx(want, abs=1e-6)
        assert metrics["ce"].item() == pytest.approx(ce, abs=1e-6)
        assert loss.item() == pytest.approx(0.25 * ce + 0.75 * 4 * want, abs=1e-6)  # T^2 = 4
    assert forward != pytest.approx(reverse, abs=1e-4)  # a swap of the two directions would fail above

def test_kl_is_averaged_over_trained_positions():
    s, t, labels = random_logits()
    mask = labels != -100
    p, log_q = F.softmax(t / 2, -1), F.log_softmax(s / 2, -1)
    per_position = (p * (p.log() - log_q)).sum(-1)  # (B, T)
    _, metrics = distill_loss(s, t, labels, temperature=2.0)
    assert metrics["kl"].item() == pytest.approx(per_position[mask].mean().item(), abs=1e-5)

def test_untrained_positions_do_not_change_the_loss():
    s, t, labels = random_logits()
    untrained = (labels == -100)[..., None]
    noise = lambda seed: 50 * torch.randn(s.shape, generator=torch.Generator().manual_seed(seed)) * untrained
    for kind in ("forward", "reverse"):
        a = distill_loss(s, t, labels, kind=kind)[0]
        b = distill_loss(s + noise(1), t + noise(2), labels, kind=kind)[0]
        assert torch.equal(a, b)

def test_fully_masked_batch_gives_a_finite_loss_and_gradient():
    s, t, labels = random_logits()
    s.requires_grad_()
    loss, metrics = distill_loss(s, t, torch.full_like(labels, -100))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0 and torch.isfinite(metrics["kl"])
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() == 0

def test_bad_arguments_are_clear_errors():
    s, t, labels = random_logits()
    with pytest.raises(ValueError, match="kind"): distill_loss(s, t, labels, kind="sideways")
    with pytest.raises(ValueError, match="same vocabulary"): distill_loss(s, t[..., :-1], labels)
    with pytest.raises(ValueError, match="alpha"): DistillLoss(micro(0), alpha=1.5)

def test_no_gradient_reaches_the_teacher_and_its_forward_runs_without_a_graph():
    teacher, student = micro(1, hidden_size=96), micro(2)
    grad_enabled = []
    teacher.register_forward_hook(lambda m, i, o: grad_enabled.append(torch.is_grad_enabled()))
    loss_fn = DistillLoss(teacher, alpha=0.5, temperature=2.0)
    student.train()
    loss, metrics = loss_fn(student, toy_batch())
    loss.backward()
    assert grad_enabled == [False]  # the teacher ran under no_grad
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert metrics["kl"] > 0

def test_alpha_one_skips_the_teacher_in_training_but_not_in_evaluation():
    teacher, student = micro(1, hidden_size=96), micro(2)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    loss_fn = DistillLoss(teacher, alpha=1.0)
    _, train_metrics = loss_fn(student.train(), toy_batch())
    assert calls == [] and "kl" not in train_metrics
    _, eval_metrics = loss_fn(student.eval(), toy_batch())
    assert calls == [1] and eval_metrics["kl"] > 0

class ToyRows:
    "Random rows with the first third of each one masked, like a prompt."
    def __init__(self, n=16): self.rows = [toy_batch(1, 12, seed=i) for i in range(n)]
    def __len__(self): return len(self.rows)
    def __getitem__(self, i): return {k: v[0] for k, v in self.rows[i].items()}

def test_engine_trains_the_student_and_leaves_the_teacher_untouched(tmp_path):
    teacher, student = micro(1, hidden_size=96), micro(2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = student.lm_head.weight.detach().clone()
    cfg = TrainConfig(out_dir=tmp_path, steps=3, micro_batch=4, lr=1e-2, log_every=1, progress=False, peak_flops=1e12)
    result = Trainer(student, ToyRows(), DistillLoss(teacher), cfg, val_data=ToyRows(8)).fit()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(student_before, student.lm_head.weight)
    assert "val_kl" in result and "val_ce" in result

def test_make_student_copies_the_vocabulary_and_is_reproducible():
    teacher = MiniMindConfig.from_preset("tiny", vocab_size=777)
    a, b = make_student("micro", teacher, seed=3), make_student("micro", teacher, seed=3)
    assert a.config.vocab_size == 777 and a.config.hidden_size == 64
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

def test_shrink_keeps_evenly_spaced_layers_of_the_teacher():
    teacher = micro(num_hidden_layers=4)
    student = shrink(teacher, 2)
    assert student.config.num_hidden_layers == 2 and student.num_parameters() < teacher.num_parameters()
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 3)):  # the first and the last layer
        for k, v in s.items():
            if k.startswith(f"model.layers.{new}."): assert torch.equal(v, t[k.replace(f"layers.{new}.", f"layers.{old}.", 1)])
    assert all(torch.equal(v, t[k]) for k, v in s.items() if not k.startswith("model.layers."))  # embeddings, norm, head
    s["model.embed_tokens.weight"].add_(1)
    assert not torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])  # copies, not shared tensors

def test_distill_stage_smoke(tmp_path):
    from minimind.hub import load_model
    from minimind.sft import SFT
    from minimind.runs import require
    run = tmp_path / "run"
    sft = require(SFT, run, quick=True)
    out = run_cli("distill", "--run-dir", run, *DISTILL_QUICK_ARGS)
    assert out.returncode == 0, out.stderr[-3000:]
    student, teacher = load_model(run / "distill" / "model"), load_model(sft / "model")
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.num_parameters() <= teacher.num_parameters()  # quick runs: a micro teacher and a micro student
    numbers = json.loads((run / "distill" / "done.json").read_text())["numbers"]
    assert "->" in numbers["val ce"] and "teacher val ce" in numbers and "no-teacher val ce" in numbers
    before, after = map(float, numbers["val ce"].split("->"))
    assert after < before
    assert str(run / "distill" / "model") in out.stdout

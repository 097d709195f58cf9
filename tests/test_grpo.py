"""Chapter 09b: GRPO's pieces, and GRPO on the training engine: DDP equal to one process, an exact resume (in the
middle of a round too), and one log record per round."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minimind.grpo import (Curriculum, GRPOConfig, GRPOLoss, Rollouts, clipped_objective, completion_tokens,
                           group_advantages, grpo_loss, k3_kl, pack_rollouts)

from conftest import micro

def test_group_advantages_are_normalised_per_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0], [0.3, 0.9, 0.5, 0.1]])
    a = group_advantages(r)
    assert torch.isfinite(a).all()
    assert torch.equal(a[1:3], torch.zeros(2, 4))  # zero variance: 0, not NaN
    torch.testing.assert_close(a.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[[0, 3]].std(-1), torch.ones(2), atol=1e-3, rtol=0)  # unit std (up to eps)
    torch.testing.assert_close(a[0], (r[0] - 0.25) / (r[0].std() + 1e-4))
    with pytest.raises(ValueError): group_advantages(torch.ones(2, 1))

def test_clipped_objective_and_clip_fraction_on_hand_numbers():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7], [0.5, 1.5, 0.9, 1.3]])
    adv = torch.tensor([2.0, -1.0])
    obj, clipped = clipped_objective(ratio, adv, 0.2)
    expected = [[min(1.5 * 2, 1.2 * 2), min(0.5 * 2, 0.8 * 2), 1.1 * 2, min(0.7 * 2, 0.8 * 2)],
                [min(-0.5, -0.8), min(-1.5, -1.2), -0.9, min(-1.3, -1.2)]]
    torch.testing.assert_close(obj, torch.tensor(expected))
    assert clipped.tolist() == [[True, False, False, False], [True, False, False, False]]
    logp = torch.log(ratio)  # old = 0 so exp(logp - old) = ratio; the reference equals the policy: KL 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, m = grpo_loss(logp, torch.zeros_like(logp), logp.clone(), adv, mask, clip_eps=0.2, beta=0.5)
    real = [expected[0][0], expected[0][1], expected[0][2], expected[1][0], expected[1][1]]
    assert loss.item() == pytest.approx(-sum(real) / 5, rel=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 5) and m["kl"].item() == 0.0

def test_grpo_gradient_is_zero_where_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1], [0.5, 0.9]])).requires_grad_()
    loss, _ = grpo_loss(logp, torch.zeros(2, 2), logp.detach().clone(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), 0.2, 0.1)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0  # clipped tokens (KL is 0 at ref == policy, its gradient too)
    assert logp.grad[0, 1] < 0 and logp.grad[1, 1] > 0  # inside the band: push the good up, the bad down

def test_k3_kl_is_nonnegative_zero_at_equality_and_unbiased():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(1000))
    p, q = torch.randn(20, generator=g).log_softmax(0), torch.randn(20, generator=g).log_softmax(0)
    x = torch.multinomial(p.exp(), 100_000, replacement=True, generator=g)
    assert k3_kl(p[x], q[x]).mean().item() == pytest.approx((p.exp() * (p - q)).sum().item(), rel=0.05)

def test_kl_penalty_pulls_the_policy_back_to_the_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([[-1.5, -1.0]]), torch.zeros(1), torch.ones(1, 2), beta=1.0)
    loss.backward()
    assert m["kl"] > 0 and logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0  # too likely: down; too unlikely: up

def test_pack_rollouts_masks_exactly_the_completions():
    b = pack_rollouts([[1, 5, 6], [1, 7]], [[9, 9, 2], [8, 2]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 9, 9], [1, 7, 8, 2, 0]]
    assert b["targets"].tolist() == [[5, 6, 9, 9, 2], [7, 8, 2, 0, 0]]
    assert b["targets"][b["mask"]].tolist() == [9, 9, 2, 8, 2]

def test_curriculum_trains_where_groups_can_disagree():
    import random
    c = Curriculum([1, 2, 3], window=4, explore=0.0)
    c.update(1, 4, 4); c.update(2, 1, 4); c.update(3, 0, 4)
    assert c.active() == [2] and set(c.pick(50, random.Random(0))) == {2}
    c.update(2, 4, 4)  # the window forgets: level 2 is now always solved
    assert c.rate(2) == 1.0 and c.active() in ([1], [2], [3])  # none inside: the closest to 1/2 (a tie here)
    explore = Curriculum([1, 2, 3], explore=1.0)
    explore.load_state_dict(c.state_dict())
    assert set(explore.pick(200, random.Random(0))) == {1, 2, 3}

# --- distillation loss ---

# --- DDP: two gloo processes equal one on the same global batch ---

DDP_SCRIPT = r'''
import os, sys, torch
import torch.multiprocessing as mp

class FixedRollouts:
    "A batch source that gives every step the same global batch of rollouts, this process's share of it."
    def __init__(self, batch, micro): self.batch, self.micro = batch, micro
    def start(self, trainer): self.trainer = trainer
    def batches(self, trainer):
        from minimind.grpo import token_logprobs
        per = len(self.batch["advantages"]) // trainer.world
        mine = {k: v[trainer.rank * per:(trainer.rank + 1) * per] for k, v in self.batch.items()}
        mb = [{k: v[s:s + self.micro] for k, v in mine.items()} for s in range(0, per, self.micro)]
        with torch.no_grad():
            for b in mb: b["old_logp"] = b["ref_logp"] = token_logprobs(trainer.model, b["input_ids"], b["targets"])
        while True: yield mb  # the same rollouts every step: from the second step on the ratio moves
    def state_dict(self): return {}
    def load_state_dict(self, state): pass
    def record(self): return {}

def run(rank, world, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from minimind.engine import Trainer, TrainConfig
    from minimind.grpo import GRPOLoss, completion_tokens
    from minimind.model import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset("micro"))
    g = torch.Generator().manual_seed(1)
    N, T = 8, 12  # the global batch: 8 completions
    ids = torch.randint(11, 512, (N, T + 1), generator=g)
    mask = torch.rand(N, T, generator=g) < 0.6  # uneven token counts per row and micro-batch
    mask[:, 0] = True
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask, "advantages": torch.randn(N, generator=g)}
    cfg = TrainConfig(out_dir=os.path.join(out, f"world{world}"), steps=3, micro_batch=2, lr=1e-2, betas=(0.9, 0.99),
                      weight_decay=0.0, log_every=3, progress=False, peak_flops=1e12)
    trainer = Trainer(model, FixedRollouts(batch, 2), GRPOLoss(clip_eps=0.1, beta=0.1), cfg, count=completion_tokens)
    trainer.fit()
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "stats": trainer.history[-1]},
                   os.path.join(out, f"world{world}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()
        os._exit(0)  # skip interpreter teardown: gloo's worker threads can abort it (~1 run in 10; pytorch/pytorch#179291)

if __name__ == "__main__":
    world, out, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if world == 1: run(0, 1, out, port)
    else: mp.spawn(run, args=(world, out, port), nprocs=world)
'''

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def test_ddp_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world in (1, 2):
        out = subprocess.run([sys.executable, str(script), str(world), str(tmp_path), str(free_port())],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = torch.load(tmp_path / "world1.pt"), torch.load(tmp_path / "world2.pt")
    for k in ("loss", "kl", "clip_frac", "ratio"): assert two["stats"][k] == pytest.approx(one["stats"][k], rel=1e-5, abs=1e-7), k
    assert one["stats"]["clip_frac"] > 0  # several steps on one batch: the ratio moved and the clip acted
    start = micro(0).state_dict()
    moved = 0
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=0, atol=2e-6)
        moved += int(not torch.equal(v, start[k]))
    assert moved > 0

# --- on the engine: records, and an exact resume ---

@pytest.fixture(scope="module")
def quick():
    "The book's quick pretrained model and TinyWorld's RL problems."
    from minimind.reason import read_problems
    from minimind.pretrain import PRETRAIN
    from minimind.runs import require
    from minimind.tokenizer import MiniMindTokenizer
    run = require(PRETRAIN, quick=True).parent
    return run / "pretrain" / "model", MiniMindTokenizer.load(run / "tokenizer"), read_problems(run / "data" / "rl.jsonl")

def grpo_trainer(quick, out, **kw):
    from minimind.engine import Trainer, TrainConfig
    from minimind.hub import load_model
    model_dir, tok, problems = quick
    cfg = TrainConfig(out_dir=out, **{**dict(steps=4, micro_batch=4, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, log_every=2,
                                             progress=False, peak_flops=1e12), **kw})
    source = Rollouts(tok, problems, GRPOConfig(prompts=2, group_size=3, ppo_steps=2, max_new_tokens=8))
    return Trainer(load_model(model_dir).train(), source, GRPOLoss(), cfg, count=completion_tokens)

@pytest.fixture
def length_reward(monkeypatch):
    "The quick model never writes the tags, so every reward would be 0 and nothing would train: score by length instead."
    import minimind.grpo
    monkeypatch.setattr(minimind.grpo, "reward", lambda text, answer, *a: len(text) % 5 / 4)

def test_grpo_on_the_engine_writes_a_record_per_round(quick, length_reward, tmp_path):
    t = grpo_trainer(quick, tmp_path / "run")
    t.fit()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["round"]) for r in recs] == [(2, 1), (4, 2)]  # 2 optimizer steps per round
    assert recs[0]["signal"] > 0 and recs[1]["kl"] > 0

def test_the_first_step_of_a_round_is_on_policy(quick, length_reward, tmp_path):
    "The log-probs recorded when the round is drawn are the policy's own: ratio 1, nothing clipped, on its first step."
    t = grpo_trainer(quick, tmp_path / "run", log_every=1)
    t.fit()
    first, second = t.history[0], t.history[1]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0
    assert second["ratio"] != pytest.approx(1.0, abs=1e-6)  # the second step is off-policy: the weights moved

@pytest.mark.parametrize("stop", [2, 3])  # after round 1, and in the middle of round 2 (its rollouts are in the checkpoint)
def test_grpo_resume_equals_an_uninterrupted_run(quick, length_reward, tmp_path, stop):
    straight = grpo_trainer(quick, tmp_path / "straight"); straight.fit()
    grpo_trainer(quick, tmp_path / "stopped", stop_at=stop).fit()
    resumed = grpo_trainer(quick, tmp_path / "stopped", resume=True); resumed.fit()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()): assert torch.equal(p, q)
    again = {r["step"]: r for r in resumed.history}  # (a stop between two records adds one: it averages fewer steps)
    for r in straight.history: assert {k: again[r["step"]][k] for k in ("round", "reward", "signal")} == {k: r[k] for k in ("round", "reward", "signal")}
    assert not all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), grpo_trainer(quick, tmp_path / "x").model.parameters()))

"""Chapter 09: verifiable rewards, the GRPO loss and its pieces, tag-weighted distillation, DDP equal to one process,
and the `reason` and `grpo` stages of the command line."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind.reason import (Curriculum, answer_correct, clipped_objective, extract_answer, final_answer, format_ok,
                             group_advantages, grpo_loss, k3_kl, pack_rollouts, partial_credit, read_problems, reason_loss,
                             reward, tag_weights)

from conftest import micro, run_cli

GOOD = "<think>\nOnes: 2 + 7 = 9. Write 9.\nSo 12 + 7 = 19.\n</think>\n<answer>\n19\n</answer>"

# --- rewards ---

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),                                            # right answer, right layout
    (GOOD.replace("19\n</answer>", "18\n</answer>"), 0.1),  # wrong answer, right layout
    (GOOD.replace("</think>", ""), 0.9),                    # malformed: no </think>, the answer still counts
    (GOOD.replace("<think>", "<think><think>"), 0.9),       # a tag twice
    ("12 + 7 = 19.", 0.0),                                  # no tags at all: no answer
    (GOOD.replace("<answer>\n19\n</answer>", "19"), 0.0),   # think but no answer block
    (GOOD + "\nAnything else?", 0.9),                       # extra text after the answer breaks the layout only
    ("Sure! " + GOOD, 0.9),                                 # ... and before the think block
    (GOOD + "<answer>19</answer>", 0.0),                    # two answer blocks are no answer
    (GOOD.replace("\n19\n", "  "), 0.0),                    # an empty answer
    ("<think>\n</think><answer>19</answer>", 0.9),          # an empty think block is not the layout
])
def test_reward_on_hand_written_completions(completion, expected):
    assert reward(completion, "19") == pytest.approx(expected)

def test_reward_parts():
    assert extract_answer(GOOD) == "19" and format_ok(GOOD)
    assert extract_answer("<answer> 3、5 ,7 </answer>") == "3、5 ,7"
    assert answer_correct("3、5 ,7", "3, 5, 7") and not answer_correct("3, 7, 5", "3, 5, 7") and not answer_correct(None, "3")
    assert not answer_correct("19.", "19")  # exact: the answer block holds the answer and nothing else
    assert reward(GOOD, "19", format_weight=0.0) == 1.0 and reward("<answer>19</answer>", "19", format_weight=0.0) == 1.0
    assert partial_credit("1259", "1269") == 0.75 and partial_credit("269", "1269") == 0.75
    assert partial_credit("3, 2, 1", "1, 2, 3") == pytest.approx(1 / 3) and partial_credit(None, "4") == 0
    wrong = GOOD.replace("19\n</answer>", "18\n</answer>")  # 18 for 19: one digit of two
    assert reward(wrong, "19", partial_weight=0.5) == pytest.approx(0.9 * 0.25 + 0.1)
    assert reward(GOOD, "19", partial_weight=0.5) == 1.0  # partial credit never exceeds a right answer

def test_final_answer_falls_back_to_the_last_numbers_without_tags():
    assert final_answer("6 - 2 = 4.", "4") == "4"
    assert final_answer("the order is 3, 5 and 7", "3, 5, 7") == "3, 5, 7"
    assert final_answer("<answer>5</answer> 4", "4") == "5"  # an answer block wins
    assert final_answer("<answer>5 and 4", "4") is None  # an unclosed block is no answer, not a fallback
    assert final_answer("no numbers", "4") is None

def test_read_problems_names_file_and_line(tmp_path):
    from minimind.data import DataError
    rec = {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": ""}], "answer": "2"}
    bad = tmp_path / "rl.jsonl"
    bad.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "answer": 2}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: answer"): read_problems(bad)
    bad.write_text(json.dumps({k: v for k, v in rec.items() if k != "answer"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:1: answer"): read_problems(bad)

# --- GRPO pieces ---

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

def test_tag_weighting_changes_only_tag_positions():
    model = micro()
    ids = torch.randint(11, 512, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[0, 4], labels[1, 7], labels[1, 2] = 3, 6, 4  # tag targets
    labels[:, :2] = -100
    w = tag_weights(labels, [3, 4, 5, 6], 10.0)
    assert torch.equal(w != 1, (labels == -100) | torch.isin(labels, torch.tensor([3, 4, 5, 6])))
    grads = {}
    for W in (1.0, 10.0):
        logits = model(ids).logits.detach().requires_grad_()
        class Fixed(torch.nn.Module):
            def forward(self, _): return type("O", (), {"logits": logits, "aux_loss": torch.zeros(())})()
        loss, metrics = reason_loss(Fixed(), {"input_ids": ids, "labels": labels}, [3, 4, 5, 6], W)
        loss.backward(); grads[W] = logits.grad
        if W == 1: assert metrics["ce"].item() == pytest.approx(loss.item())
        else: assert loss.item() > metrics["ce"].item()
    tag = torch.isin(labels, torch.tensor([3, 4, 5, 6]))
    torch.testing.assert_close(grads[10.0][~tag], grads[1.0][~tag], rtol=0, atol=0)
    torch.testing.assert_close(grads[10.0][tag], 10 * grads[1.0][tag])
    assert grads[1.0][tag].abs().sum() > 0

# --- DDP: two gloo processes equal one on the same global batch ---

DDP_SCRIPT = r'''
import os, sys, torch
import torch.multiprocessing as mp

def run(rank, world, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from minimind.model import MiniMindConfig, MiniMindForCausalLM
    from minimind.reason import GRPOConfig, GRPOTrainer
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset("micro"))
    g = torch.Generator().manual_seed(1)
    N, T = 8, 12  # the global batch: 8 completions
    ids = torch.randint(11, 512, (N, T + 1), generator=g)
    mask = torch.rand(N, T, generator=g) < 0.6  # uneven token counts per row and micro-batch
    mask[:, 0] = True
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask,
             "advantages": torch.randn(N, generator=g)}
    cfg = GRPOConfig(out_dir=os.path.join(out, f"rank{rank}"), prompts=2, group_size=4, ppo_steps=3, micro_batch=2,
                     lr=1e-2, beta=0.1, clip_eps=0.1, progress=False)
    records = [{"conversations": [], "answer": "1", "difficulty": 1}]
    trainer = GRPOTrainer(model, None, records, cfg)
    per = N // world
    stats = trainer.update({k: v[rank * per:(rank + 1) * per] for k, v in batch.items()})
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "stats": stats},
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
    assert one["stats"]["clip_frac"] > 0  # several steps per batch: the ratio moved and the clip acted
    start = micro().state_dict()  # the weights both runs began from
    moved = 0
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=0, atol=2e-6)
        moved += int(not torch.equal(v, start[k]))
    assert moved > 0

# --- the stages, through the command line ---

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    "A copy of the book's quick run folder (TinyWorld, tokenizer, pretrain, sft, dpo at their quick sizes)."
    from minimind.train import ensure_stage
    start = "dpo" if importlib_find("minimind.dpo") else "sft"
    src = ensure_stage(start, quick=True).parent
    run = tmp_path_factory.mktemp("quick") / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("checkpoints", ".lock", "reason", "grpo"))
    return run

def importlib_find(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None

def test_reason_then_grpo_stages_with_quick_args(quick_run):
    from minimind.reason import GRPO_QUICK_ARGS, REASON_QUICK_ARGS
    r = run_cli("--run-dir", quick_run, "reason", *REASON_QUICK_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy" in r.stdout and str(quick_run / "reason" / "model") in r.stdout
    assert (quick_run / "reason" / "model" / "model.safetensors").exists() and (quick_run / "reason" / "done.json").exists()
    numbers = json.loads((quick_run / "reason" / "done.json").read_text())["numbers"]
    assert " -> " in numbers["accuracy"] and numbers["steps"] == 4
    g = run_cli("--run-dir", quick_run, "grpo", *GRPO_QUICK_ARGS)
    assert g.returncode == 0, g.stderr[-3000:]
    assert f"from {quick_run / 'reason' / 'model'}" in g.stdout  # grpo starts from the reason stage's model
    assert (quick_run / "grpo" / "model" / "model.safetensors").exists()
    numbers = json.loads((quick_run / "grpo" / "done.json").read_text())["numbers"]
    assert " -> " in numbers["accuracy"] and " -> " in numbers["reward"] and numbers["rounds"] == 2
    rounds = [json.loads(l) for l in (quick_run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rounds] == [1, 2] and all(k in rounds[0] for k in ("reward", "kl", "clip_frac", "length"))

def test_grpo_bad_problem_file_names_file_and_line(quick_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rec = {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": ""}], "answer": "2"}
    bad.write_text(json.dumps(rec) + "\n" + json.dumps({"conversations": rec["conversations"]}) + "\n", encoding="utf-8")
    out = run_cli("--run-dir", quick_run, "grpo", "--init", quick_run / "pretrain" / "model", "--data", bad,
                  "--out", tmp_path / "out", "--steps", "1")
    assert out.returncode != 0 and f"{bad}:2: answer" in out.stderr

def test_grpo_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    "Two rounds straight, against one round, a stop, and a resume from the checkpoint: the same weights and records."
    import minimind.reason
    from minimind.hub import load_model
    from minimind.reason import GRPOConfig, GRPOTrainer
    from minimind.tokenizer import MiniMindTokenizer
    from minimind.train import ensure_stage
    run = ensure_stage("pretrain", quick=True).parent
    tok, problems = MiniMindTokenizer.load(run / "tokenizer"), read_problems(run / "data" / "rl.jsonl")
    def trainer(out, **kw):
        cfg = GRPOConfig(out_dir=out, steps=2, prompts=2, group_size=3, ppo_steps=2, max_new_tokens=8, lr=1e-3,
                         progress=False, **kw)
        return GRPOTrainer(load_model(run / "pretrain" / "model").train(), tok, problems, cfg)
    # the quick model never writes the tags, so every reward would be 0 and nothing would train: score by length instead
    monkeypatch.setattr(minimind.reason, "reward", lambda text, answer, *a: len(text) % 5 / 4)
    straight = trainer(tmp_path / "straight"); straight.fit()
    assert straight.history[0]["signal"] > 0 and straight.history[1]["kl"] > 0
    trainer(tmp_path / "stopped", stop_at=1).fit()
    resumed = trainer(tmp_path / "stopped", resume=True); resumed.fit()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()): assert torch.equal(p, q)
    assert [r["reward"] for r in straight.history] == [r["reward"] for r in resumed.history]
    assert [json.loads(l)["step"] for l in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()] == [1, 2]

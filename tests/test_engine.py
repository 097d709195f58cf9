"""The training engine: exact resume, accumulation, weight-decay groups, masked batches, crash-safe checkpoints,
and `torchrun` with two processes against one (through the `pretrain` command)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import minimind.compute as compute
import minimind.engine as engine
from minimind.data import cache_dir
from minimind.compute import Compute
from minimind.engine import (GlobalBatchSampler, Trainer, TrainConfig, causal_lm_loss, latest_checkpoint,
                             load_checkpoint, param_groups)

from minimind.runs import RunError

from conftest import ALL_WAYS, micro, run_cli

TESTS = Path(__file__).parent

class ToyTokens:
    "Random rows laid out like `PackedDataset` (labels aligned with inputs); `masked` rows are all -100."
    def __init__(self, n, T=16, vocab=512, seed=0, masked=()):
        self.x = torch.randint(3, vocab, (n, T + 1), generator=torch.Generator().manual_seed(seed))
        self.masked = set(masked)
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        y = self.x[i, 1:].clone()
        if i in self.masked: y[:] = -100
        return {"input_ids": self.x[i, :-1], "labels": y}

def train(out, steps, data=None, model=None, val=None, **kw):
    "A short run on the micro model; returns the finished trainer."
    kw = {"micro_batch": 4, "lr": 1e-2, "warmup": 2, "log_every": 1, "progress": False, "peak_flops": 1e12, **kw}
    t = Trainer(micro() if model is None else model, ToyTokens(40) if data is None else data, causal_lm_loss,
                TrainConfig(out_dir=out, steps=steps, **kw), val_data=val)
    t.fit()
    return t

def adam_grads(t):
    "The gradient of the first step, recovered from Adam's first moment (1 - beta1) * grad."
    return torch.cat([t.opt.state[p]["exp_avg"].flatten() for p in t.params]) / (1 - t.cfg.betas[0])

# --- in one process ---

def fake_rates(fastest):
    "A `step_rates` under which `fastest` wins, counting its calls."
    def rates(model, ways, rows, seq_len, device):
        rates.calls += 1
        return {c.name: 2.0 if c.name == fastest else 1.0 for c in ways}
    rates.calls = 0
    return rates

@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    "Every way to compute, and a cache of the test's own: the timings it makes up stay out of every other test's runs."
    monkeypatch.setattr(engine, "cpu_candidates", ALL_WAYS)
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path/"cache"))

def test_auto_on_a_cpu_takes_the_fastest_way_and_remembers_it(tmp_path, monkeypatch, capsys, own_cache):
    monkeypatch.setattr(compute, "step_rates", fake_rates("bf16"))
    t = train(tmp_path/"a", 2)
    assert t.compute == Compute(torch.bfloat16) and compute.step_rates.calls == 1
    assert "compute: bf16, the fastest" in capsys.readouterr().out
    monkeypatch.setattr(compute, "step_rates", fake_rates("fp32"))  # a new timing would choose fp32: none is made
    assert train(tmp_path/"b", 2).compute == Compute(torch.bfloat16) and compute.step_rates.calls == 0

def test_fp32_never_takes_bf16(tmp_path, monkeypatch, own_cache):
    monkeypatch.setattr(compute, "step_rates", fake_rates("bf16"))
    t = train(tmp_path, 2, dtype="fp32")
    assert t.compute.dtype == torch.float32 and t.dtype == torch.float32

def test_a_resumed_run_computes_the_way_its_checkpoint_says(tmp_path, monkeypatch, own_cache):
    monkeypatch.setattr(compute, "step_rates", fake_rates("bf16"))
    train(tmp_path, 4, save_every=2, stop_at=2)
    assert load_checkpoint(latest_checkpoint(tmp_path/"checkpoints"))["compute"] == "bf16"
    (cache_dir()/"compute.json").unlink()  # forget the timing: the checkpoint alone decides
    monkeypatch.setattr(compute, "step_rates", fake_rates("fp32"))
    assert train(tmp_path, 4).compute == Compute(torch.bfloat16) and compute.step_rates.calls == 0

def test_resume_equals_an_uninterrupted_run(tmp_path):
    # 40 rows, global batch 8 (micro 4 x accum 2): 5 steps per epoch, so the run crosses an epoch boundary
    straight = train(tmp_path/"straight", 8, accum=2, save_every=3)
    train(tmp_path/"resumed", 8, accum=2, save_every=3, stop_at=4)
    resumed = train(tmp_path/"resumed", 8, accum=2, save_every=3, resume=True, model=micro(seed=99))
    for p, q in zip(straight.params, resumed.params):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"): assert torch.equal(straight.opt.state[p][k], resumed.opt.state[q][k])
    assert straight.opt.param_groups[0]["lr"] == resumed.opt.param_groups[0]["lr"]
    assert (straight.epoch, straight.offset, straight.tokens) == (resumed.epoch, resumed.offset, resumed.tokens)
    lines = [json.loads(l) for l in (tmp_path/"resumed"/"metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))  # one record per step, none duplicated
    assert [r["loss"] for r in lines] == [r["loss"] for r in straight.history]

def stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(Path(folder).glob("*.pt"))}

def test_a_run_in_a_used_folder_continues_it_and_deletes_nothing(tmp_path, capsys):
    "By default (`resume='auto'`) a run finds its folder's checkpoint and continues; nothing is removed or rewritten."
    first = train(tmp_path, 4, save_every=2)
    before = stamps(tmp_path/"checkpoints")
    assert len(before) == 2
    again = train(tmp_path, 4, save_every=2)
    assert "resumed from" in capsys.readouterr().out and stamps(tmp_path/"checkpoints") == before
    for p, q in zip(first.params, again.params): assert torch.equal(p, q)
    assert len((tmp_path/"metrics.jsonl").read_text().splitlines()) == 4

def test_a_new_run_refuses_a_folder_that_holds_checkpoints(tmp_path):
    train(tmp_path, 4, save_every=2)
    before = stamps(tmp_path/"checkpoints")
    with pytest.raises(RunError, match="--overwrite"): train(tmp_path, 4, resume=False)
    assert stamps(tmp_path/"checkpoints") == before

def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(RunError, match="no checkpoint"): train(tmp_path, 2, resume=True)

def test_resume_with_another_global_batch_says_what_it_does(tmp_path, capsys):
    train(tmp_path, 6, stop_at=2)
    t = train(tmp_path, 6, micro_batch=2, resume=True)
    out = capsys.readouterr().out
    assert "global batch changed from 4 to 2" in out and "continuing from the same sample" in out
    assert t.step == 6 and (t.epoch, t.offset) == (0, 8 + 4 * 2)  # 2 steps of 4 rows, then 4 steps of 2

def test_accumulation_equals_a_bigger_batch(tmp_path):
    data = ToyTokens(40, masked=(1, 6, 9, 30))  # unequal token counts per micro-batch: weighting by tokens matters
    accum = train(tmp_path/"accum", 1, data=data, micro_batch=2, accum=2)
    big = train(tmp_path/"big", 1, data=data, micro_batch=4)
    torch.testing.assert_close(adam_grads(accum), adam_grads(big), rtol=0, atol=1e-6)
    assert accum.history[-1]["loss"] == pytest.approx(big.history[-1]["loss"], abs=1e-6)

def test_global_batches_do_not_depend_on_the_number_of_processes():
    def steps(n_steps, micro, accum, world):
        its = [iter(GlobalBatchSampler(30, micro, accum, r, world, seed=3)) for r in range(world)]
        return [[i for it in its for _ in range(accum) for i in next(it)] for _ in range(n_steps)]
    one = steps(12, 6, 1, 1)
    assert one == steps(12, 3, 2, 1) == steps(12, 3, 1, 2) == steps(12, 1, 2, 3)
    assert sorted(sum(one[:5], [])) == list(range(30)) and one[:5] != one[5:10]  # epochs: permutations, reshuffled

def test_weight_decay_skips_norms_embeddings_and_biases(tmp_path):
    model = micro()
    model.extra = nn.Linear(8, 8, bias=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in skipped and "extra.bias" in skipped and "model.norm.weight" in skipped
    assert all("norm" in n or n in ("model.embed_tokens.weight", "extra.bias") for n in skipped)
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if n not in skipped}
    assert all(p.ndim == 2 for p in decay["params"])
    t = Trainer(micro(), ToyTokens(8), causal_lm_loss, TrainConfig(tmp_path, micro_batch=4, weight_decay=0.1))
    emb = t.model.model.embed_tokens.weight
    assert [g["weight_decay"] for g in t.opt.param_groups if any(p is emb for p in g["params"])] == [0.0]

def test_fully_masked_micro_batch_is_finite(tmp_path):
    first = next(iter(GlobalBatchSampler(16, 2, 2, seed=0)))  # the rows of step 1's first micro-batch
    some = train(tmp_path/"some", 1, data=ToyTokens(16, masked=first), micro_batch=2, accum=2)
    assert all(torch.isfinite(p).all() for p in some.model.parameters())
    assert some.history[0]["loss"] > 0 and torch.isfinite(adam_grads(some)).all()
    everything = ToyTokens(16, masked=range(16))
    t = train(tmp_path/"all", 3, data=everything, micro_batch=2, accum=2, val=everything)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert [r.get("loss", r.get("val_loss")) for r in t.history] == [0.0, 0.0, 0.0, 0.0]

# --- crash during a checkpoint write ---

KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import micro
from test_engine import ToyTokens
import minimind.engine as E
replace = os.replace
def slow_replace(src, dst):  # the temp file is complete; the rename has not happened yet
    if str(dst).endswith("step_00000004.pt"):
        print("writing step 4", flush=True)
        time.sleep(600)
    replace(src, dst)
os.replace = slow_replace
E.cpu_candidates = lambda: [E.Compute()]  # fp32 on PyTorch's kernels, as the in-process runs it is compared with (conftest)
cfg = E.TrainConfig(out_dir={out!r}, steps=6, micro_batch=4, lr=1e-2, warmup=2, save_every=2, keep=3, log_every=1,
                    progress=False, peak_flops=1e12)
E.Trainer(micro(), ToyTokens(40), E.causal_lm_loss, cfg).fit()
"""

def test_kill_during_checkpoint_write_keeps_the_last_good_one(tmp_path):
    out = tmp_path/"killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(tests=str(TESTS), out=str(out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("writing step 4"): break
        else: pytest.fail(f"the training process ended before the write: {proc.stderr.read()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill(); proc.wait()
    ckpts = out/"checkpoints"
    assert (ckpts/"step_00000004.pt.tmp").exists()  # the interrupted write
    assert latest_checkpoint(ckpts).name == "step_00000002.pt"
    assert load_checkpoint(latest_checkpoint(ckpts))["step"] == 2
    resumed = train(out, 6, save_every=2, keep=3, resume=True)
    straight = train(tmp_path/"straight", 6)
    assert all(torch.equal(p, q) for p, q in zip(straight.params, resumed.params))
    assert not list(ckpts.glob("*.tmp"))  # the next save cleaned up the leftover

# --- the command line, with one and two processes ---

def metrics(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    "A tiny TinyWorld and tokenizer, then the same 6-step pretraining with 1 process (micro 4) and 2 (micro 2 each)."
    from minimind.tinyworld import make_tinyworld
    from minimind.tokenizer import texts_from_jsonl, train_tokenizer
    torchrun = shutil.which("torchrun")
    if torchrun is None: pytest.skip("torchrun is not installed")
    run = tmp_path_factory.mktemp("run")
    make_tinyworld(run/"data", scale=0.02)
    train_tokenizer(texts_from_jsonl(run/"data"/"pretrain.jsonl"), vocab_size=400).save(run/"tokenizer")
    # fp32 (either kernel): 1 and 2 processes agree to ~1e-7. Under bf16, which the start-up timing picks on some
    # loaded machines, the halved micro-batch rounds differently and the losses part by ~3e-5 (measured).
    common = ["pretrain", "--run-dir", run, "--preset", "micro", "--seq-len", 32, "--steps", 6, "--lr", 3e-3,
              "--warmup", 2, "--log-every", 1, "--eval-every", 3, "--eval-batches", 2, "--save-every", 3, "--keep", 3,
              "--peak-flops", 1e12, "--dtype", "fp32"]
    one = run_cli(*common, "--micro-batch", 4, "--out", run/"one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*common, "--micro-batch", 2, "--out", run/"two",
                  launcher=(torchrun, "--standalone", "--nproc_per_node", "2", "-m"))
    assert two.returncode == 0, two.stderr[-3000:]
    return run, common, one, two

def test_torchrun_two_processes_equal_one(cli_runs):
    run, _, one, two = cli_runs
    a, b = metrics(run/"one"/"metrics.jsonl"), metrics(run/"two"/"metrics.jsonl")
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    assert [r["split"] for r in a].count("train") == 6
    for x, y in zip(a, b):
        key = "loss" if x["split"] == "train" else "val_loss"
        assert y[key] == pytest.approx(x[key], rel=1e-5), (x, y)
    wa, wb = (load_checkpoint(latest_checkpoint(run/d/"checkpoints"))["model"] for d in ("one", "two"))
    assert list(wa) == list(wb) and "model.embed_tokens.weight" in wa  # upstream names, no `module.` prefix
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)
    assert str(run/"two"/"checkpoints") in two.stdout and str(run/"two"/"metrics.jsonl") in two.stdout
    assert two.stdout.count("checkpoints in") == 1  # rank 0 reports, rank 1 does not
    assert (run/"one"/"model"/"model.safetensors").exists()

def test_resume_with_another_number_of_processes(cli_runs):
    run, common, *_ = cli_runs
    shutil.copytree(run/"two", run/"resumed", ignore=shutil.ignore_patterns("model"))
    (run/"resumed"/"checkpoints"/"latest").write_text("step_00000003.pt\n")  # as if the 2-process run died after step 3
    res = run_cli(*common, "--micro-batch", 4, "--out", run/"resumed", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in res.stdout and "data order continues exactly" in res.stdout
    a, b = metrics(run/"one"/"metrics.jsonl"), metrics(run/"resumed"/"metrics.jsonl")
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]  # records after step 3 replaced
    expected = {(r["split"], r["step"]): r.get("loss", r.get("val_loss")) for r in a}
    for r in b: assert r.get("loss", r.get("val_loss")) == pytest.approx(expected[(r["split"], r["step"])], rel=1e-5)

def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from minimind.compute import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="--device mps: this machine has no Apple GPU"): pick_device("mps")
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA GPU"): pick_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps") and pick_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(local_rank=3) == torch.device("cuda:3")  # torchrun's process 3 takes GPU 3


def test_book_setup_says_where_a_chapter_ran_and_shrinks_it_under_nbdev_test(monkeypatch, capsys):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("IN_TEST", raising=False)
        torch.set_num_threads(2)
        assert compute.book_setup() is False and torch.get_num_threads() == 2  # a reader's run keeps its threads
        line = capsys.readouterr().out
        assert line.startswith(f"torch {torch.__version__} · cpu: ") and "2 threads" in line and "nbdev-test" not in line
        monkeypatch.setenv("IN_TEST", "1")
        assert compute.book_setup() is True and torch.get_num_threads() == 1
        assert capsys.readouterr().out.rstrip().endswith("· nbdev-test sizes")
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a T4: emulated only
    assert compute.machine_line(torch.device("cuda:0")).endswith("cuda:0: NVIDIA GeForce RTX 3090 · dtype float16")

"""A user's work is never lost: re-running a stage resumes it, Ctrl-C saves a checkpoint and the same command
continues to the same weights, an interrupted pipeline finishes with the same table, a second run skips every stage."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind.runs import read_done, require
from minimind.tokenizer import TOKENIZER
from minimind.train import PIPELINE

from conftest import run_cli

QUICK = ("pretrain", "--preset", "micro", "--seq-len", "64", "--eval-every", "0", "--log-every", "5", "--save-every", "10")

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    "A run folder with the quick TinyWorld and tokenizer, to copy for each run."
    run = tmp_path_factory.mktemp("prepared")/"run"
    require(TOKENIZER, run, quick=True)
    return run

def fresh(prepared, path):
    shutil.copytree(prepared, path, ignore=shutil.ignore_patterns(".lock"))
    return path

def weights(run):
    return load_file(Path(run)/"pretrain"/"model"/"model.safetensors")

def test_rerunning_an_unfinished_stage_resumes_and_never_deletes_a_checkpoint(prepared, tmp_path):
    run = fresh(prepared, tmp_path/"run")
    first = run_cli(*QUICK, "--steps", "40", "--stop-at", "20", "--run-dir", run)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = run/"pretrain"/"checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.glob("step_*.pt")}
    assert "step_00000020.pt" in before and read_done(run/"pretrain") is None  # stopped early: not done
    again = run_cli(*QUICK, "--steps", "40", "--stop-at", "20", "--run-dir", run)  # the same command, nothing new to do
    assert again.returncode == 0 and "resumed from" in again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.glob("step_*.pt")} == before  # nothing deleted or rewritten
    done = run_cli(*QUICK, "--steps", "40", "--run-dir", run)  # without --stop-at: continues to the end
    assert done.returncode == 0 and read_done(run/"pretrain")["numbers"]["steps"] == 40
    straight = fresh(prepared, tmp_path/"straight")
    assert run_cli(*QUICK, "--steps", "40", "--run-dir", straight).returncode == 0
    assert all(torch.equal(v, weights(straight)[k]) for k, v in weights(run).items())

def wait_for(path, what, timeout=300):
    "Wait until the file at `path` contains `what`."
    t0 = time.time()
    while not (path.exists() and what in path.read_text()):
        if time.time() - t0 > timeout: raise TimeoutError(f"{path} never contained {what!r}")
        time.sleep(0.05)

def interrupt(cmd, metrics:Path, env=None):
    "Start `cmd`, send it SIGINT once training has written a record, return the finished process's output."
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        wait_for(metrics, '"split": "train"')
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally: proc.kill()
    return proc.returncode, out, err

def test_ctrl_c_saves_a_checkpoint_and_the_same_command_continues_to_the_same_weights(prepared, tmp_path):
    run = fresh(prepared, tmp_path/"run")
    cmd = [sys.executable, "-m", "minimind.train", *QUICK, "--steps", "300", "--run-dir", str(run)]
    code, out, err = interrupt(cmd, run/"pretrain"/"metrics.jsonl")
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert "SIGINT: stopped at step" in err and "continues" in err  # says what it did, and what to run
    stopped = int(err.split("stopped at step ")[1].split()[0])
    assert 0 < stopped < 300 and (run/"pretrain"/"checkpoints"/f"step_{stopped:08d}.pt").exists()
    again = run_cli(*QUICK, "--steps", "300", "--run-dir", run)
    assert again.returncode == 0 and "resumed from" in again.stdout + again.stderr
    straight = fresh(prepared, tmp_path/"straight")
    assert run_cli(*QUICK, "--steps", "300", "--run-dir", straight).returncode == 0
    assert all(torch.equal(v, weights(straight)[k]) for k, v in weights(run).items())

def table(stdout:str)->list[str]:
    "The results table a pipeline run prints."
    return [l for l in stdout.splitlines() if l.startswith("| ")]

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    "One uninterrupted quick pipeline run: its folder and its printed table."
    run = tmp_path_factory.mktemp("pipeline")/"run"
    out = run_cli("--quick", "--run-dir", run)
    assert out.returncode == 0, out.stderr[-3000:]
    return run, table(out.stdout)

def test_a_second_pipeline_run_skips_every_stage(pipeline):
    run, first = pipeline
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name not in ("report.md", "curves.png", "seconds.png")}
    again = run_cli("--quick", "--run-dir", run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(", skipped") == len(PIPELINE) and table(again.stdout) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten

def test_an_interrupted_pipeline_run_again_finishes_with_the_same_table(pipeline, tmp_path):
    _, first = pipeline
    run = tmp_path/"run"
    cmd = [sys.executable, "-m", "minimind.train", "--quick", "--run-dir", str(run)]
    code, out, err = interrupt(cmd, run/"pretrain"/"metrics.jsonl")
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert read_done(run/"pretrain") is None  # interrupted mid-stage: not taken for finished
    again = run_cli("--quick", "--run-dir", run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "data: done" in again.stdout and table(again.stdout) == first


@pytest.mark.parametrize("name", ["pretrain", "sft", "lora", "dpo", "distill", "reason", "grpo"])
def test_every_training_stage_resumes_by_default(name):
    "The same command after an interrupt continues the run: no training stage needs --resume (or refuses without it)."
    from minimind.runs import STAGES, stage_parser
    import minimind.train  # registers every stage
    args = stage_parser(STAGES[name]).parse_args([])
    assert args.resume == "auto"
    assert stage_parser(STAGES[name]).parse_args(["--resume"]).resume is True

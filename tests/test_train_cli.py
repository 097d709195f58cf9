"The `python -m minimind.train` command: its stages, their chaining through the run folder, and torchrun."
import json
import shutil

import pytest

from minimind.tokenizer import MiniMindTokenizer

from conftest import run_cli

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    "A run folder with a small TinyWorld and a small tokenizer trained by the CLI."
    run = tmp_path_factory.mktemp("run")
    data = run_cli("data", "--run-dir", run, "--scale", "0.05")
    assert data.returncode == 0, data.stderr
    tok = run_cli("tokenizer", "--run-dir", run, "--vocab-size", "600")
    assert tok.returncode == 0, tok.stderr
    return run, data.stdout + tok.stdout

def test_help_lists_every_stage():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in ("data", "tokenizer"): assert stage in out.stdout

def test_unknown_stage_is_a_usage_error():
    out = run_cli("no-such-stage")
    assert out.returncode == 2 and "invalid choice: 'no-such-stage'" in out.stderr

def test_tokenizer_stage_reads_the_data_stage_output(small_run):
    run, stdout = small_run
    tok = MiniMindTokenizer.load(run/"tokenizer")
    assert len(tok) == 600
    assert str(run/"tokenizer") in stdout  # the run says where its output went
    text = json.loads((run/"data"/"pretrain_val.jsonl").open(encoding="utf-8").readline())["text"]
    assert tok.decode(tok.encode(text)) == text

def test_tokenizer_stage_builds_tinyworld_when_missing(tmp_path, small_run):
    run, _ = small_run
    shutil.copytree(run/"data", tmp_path/"elsewhere")
    out = run_cli("tokenizer", "--run-dir", tmp_path/"empty", "--vocab-size", "600",
                  "--data", tmp_path/"elsewhere"/"sft.jsonl")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path/"empty"/"data").exists()  # explicit --data: nothing built
    assert (tmp_path/"empty"/"tokenizer"/"tokenizer.json").exists()

def test_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path/"bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    out = run_cli("tokenizer", "--run-dir", tmp_path, "--data", bad, "--vocab-size", "600")
    assert out.returncode != 0
    assert f"{bad}:2" in out.stderr

def test_torchrun_two_processes_write_the_same_tokenizer_once(tmp_path, small_run):
    run, _ = small_run
    torchrun = shutil.which("torchrun")
    if torchrun is None: pytest.skip("torchrun is not installed")
    shutil.copytree(run/"data", tmp_path/"data")
    out = run_cli("tokenizer", "--run-dir", tmp_path, "--vocab-size", "600",
                  launcher=(torchrun, "--standalone", "--nproc_per_node", "2", "-m"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("saved to") == 1  # rank 0 trains and saves; rank 1 waits
    ours = json.loads((tmp_path/"tokenizer"/"tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    single = json.loads((run/"tokenizer"/"tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert ours == single

def test_run_dir_before_the_stage_is_kept(tmp_path):
    "`--run-dir X STAGE` and `STAGE --run-dir X` both write into X (a sub-command default must not win)."
    out = run_cli("--run-dir", tmp_path/"before", "data", "--scale", "0.01", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path/"before"/"data"/"sft.jsonl").exists() and not (tmp_path/"runs").exists()


def test_the_pipelines_dtype_reaches_every_training_stage(tmp_path, monkeypatch):
    "`python -m minimind.train --dtype fp32` turns the bf16 path off in every stage that trains."
    import minimind.train as train
    seen = {}
    monkeypatch.setattr(train, "run_stage", lambda stage, args: seen.update({stage.name: getattr(args, "dtype", None)}))
    train.run_pipeline(tmp_path, dtype="fp32")
    assert seen == {"data": None, "tokenizer": None, **dict.fromkeys(("pretrain", "sft", "lora", "dpo", "distill", "reason", "grpo", "tools", "agent"), "fp32")}

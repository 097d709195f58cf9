"The run-folder protocol (chapter 89): done.json records what a result depends on, and a change of code or input invalidates it."
import importlib
import json
import sys

import pytest

from minimind.runs import (DONE, RunError, code_hash, read_done, require, run_lock, run_stage, source_files, stage_args,
                           why_not_valid)

TOY = '''
from pathlib import Path
from minimind.runs import Input, Stage

def count_args(p): p.add_argument("--n", type=int, default=3); p.add_argument("--out", type=Path, default=None)
def count(args):
    if args.n < 0: raise ValueError("a negative count")
    out = Path(args.run_dir)/"count"; out.mkdir(parents=True, exist_ok=True)
    (out/"numbers.txt").write_text(" ".join(str(i) for i in range(args.n)))
    return {"n": args.n}
COUNT = Stage("count", "write 0..n-1", count_args, count, writes=("numbers.txt",))

def total_args(p): p.add_argument("--numbers", type=Path, default=None); p.add_argument("--out", type=Path, default=None)
def total(args):
    out = Path(args.run_dir)/"total"; out.mkdir(parents=True, exist_ok=True)
    n = sum(int(x) for x in Path(args.numbers).read_text().split())
    (out/"total.txt").write_text(str(n))
    return {"total": n}
TOTAL = Stage("total", "add them up", total_args, total, reads=(Input("numbers", COUNT, "numbers.txt"),), writes=("total.txt",))
PAIR = Stage("pair", "two inputs, the second only by default", lambda p: [p.add_argument("--numbers", default=None),
             p.add_argument("--extra", default=None)], lambda args: {}, reads=(Input("numbers", COUNT, "numbers.txt"),
             Input("extra", COUNT, "numbers.txt", unless="numbers")))
'''

@pytest.fixture
def toy(tmp_path, monkeypatch):
    "Two stages in a module of their own (a stage's code hash is its module's), and a run folder."
    src = tmp_path/"src"; src.mkdir()
    (src/"toy_stages.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(src))
    sys.modules.pop("toy_stages", None)
    mod = importlib.import_module("toy_stages")
    yield mod, src/"toy_stages.py", tmp_path/"run"
    sys.modules.pop("toy_stages", None)

def test_require_runs_what_is_missing_then_nothing(toy):
    mod, _, run = toy
    require(mod.TOTAL, run)
    assert (run/"total"/"total.txt").read_text() == "3" and why_not_valid(mod.TOTAL, run) is None
    stamp = (run/"count"/DONE).stat().st_mtime_ns
    require(mod.TOTAL, run)
    assert (run/"count"/DONE).stat().st_mtime_ns == stamp  # done and valid: not run again
    rec = read_done(run/"total")
    assert rec["inputs"]["numbers"] == {"stage": "count", "fingerprint": read_done(run/"count")["fingerprint"]}

def test_an_input_without_a_flag_is_filled_in_unless_its_partner_was_given(toy, tmp_path):
    "A held-out file defaults to the run folder's only when the training data does (`Input.unless`)."
    from minimind.runs import resolve_inputs
    mod, _, run = toy
    args = stage_args(mod.PAIR, run)
    resolve_inputs(mod.PAIR, args)
    assert args.numbers == args.extra == run/"count"/"numbers.txt"  # neither given: both from the run folder
    mine = tmp_path/"mine.txt"; mine.write_text("1")
    args = stage_args(mod.PAIR, run, ["--numbers", mine])
    resolve_inputs(mod.PAIR, args)
    assert args.numbers == str(mine) and args.extra is None  # the user's data: no held-out default that fits it

def test_changing_a_stages_code_invalidates_it_and_what_read_it(toy):
    mod, path, run = toy
    require(mod.TOTAL, run)
    path.write_text(TOY.replace("range(args.n)", "range(1, args.n + 1)"))
    assert why_not_valid(mod.COUNT, run) == "its code changed since it ran"
    with pytest.raises(RunError, match="--overwrite"): require(mod.TOTAL, run, redo_stale=False)
    mod = importlib.reload(mod)
    require(mod.TOTAL, run)  # the book's cache: stale stages run again
    assert (run/"total"/"total.txt").read_text() == "6"

def test_changing_an_input_file_invalidates_the_stage(toy, tmp_path):
    mod, _, run = toy
    numbers = tmp_path/"numbers.txt"; numbers.write_text("10 20")
    assert run_stage(mod.TOTAL, stage_args(mod.TOTAL, run, ["--numbers", numbers])) == {"total": 30}
    assert why_not_valid(mod.TOTAL, run) is None
    numbers.write_text("10 21")  # same size: the content is what counts
    assert why_not_valid(mod.TOTAL, run) == f"--numbers {numbers} changed since it ran"

def test_rerunning_an_upstream_stage_invalidates_what_read_it(toy):
    mod, _, run = toy
    require(mod.TOTAL, run)
    run_stage(mod.COUNT, stage_args(mod.COUNT, run, ["--n", "5", "--overwrite"]))
    assert why_not_valid(mod.TOTAL, run) == "count was run again since"

def test_a_done_stage_is_skipped_with_the_same_flags_and_refused_with_others(toy):
    mod, _, run = toy
    assert run_stage(mod.COUNT, stage_args(mod.COUNT, run)) == {"n": 3}
    stamp = (run/"count"/DONE).stat().st_mtime_ns
    assert run_stage(mod.COUNT, stage_args(mod.COUNT, run)) == {"n": 3}  # the recorded numbers
    assert (run/"count"/DONE).stat().st_mtime_ns == stamp
    with pytest.raises(RunError, match=r"other flags \(n 3 -> 5\).*--overwrite"):
        run_stage(mod.COUNT, stage_args(mod.COUNT, run, ["--n", "5"]))

def test_done_json_is_removed_before_a_stage_writes(toy):
    "A stage that fails after it started leaves no done.json: it is never taken for finished."
    mod, _, run = toy
    run_stage(mod.COUNT, stage_args(mod.COUNT, run))
    with pytest.raises(ValueError, match="negative"):
        run_stage(mod.COUNT, stage_args(mod.COUNT, run, ["--n", "-1", "--overwrite"]))
    assert read_done(run/"count") is None and why_not_valid(mod.COUNT, run) == "not done"

def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with run_lock(tmp_path):
        with run_lock(tmp_path): pass  # would wait for itself forever if it were not

def test_a_stages_code_hash_covers_what_it_imports_and_never_the_command_line():
    sft = source_files("minimind.sft")
    assert {"minimind.sft", "minimind.pretrain", "minimind.engine", "minimind.model", "minimind.tinyworld",
            "minimind.data", "minimind.runs"} <= set(sft)
    assert "minimind.train" not in sft and "minimind.train" not in source_files("minimind.grpo")
    assert code_hash("minimind.sft") != code_hash("minimind.pretrain")

def test_done_json_records_code_args_and_inputs(tmp_path):
    from minimind.tinyworld import DATA
    from minimind.tokenizer import TOKENIZER
    require(TOKENIZER, tmp_path, quick=True)
    rec = read_done(tmp_path/"tokenizer")
    assert rec["args"] == {"vocab_size": 1024} and rec["code"] == code_hash("minimind.tokenizer")
    assert rec["inputs"]["data"]["stage"] == "data" and rec["numbers"] == {"vocab": 1024}
    assert json.loads((tmp_path/"data"/DONE).read_text())["args"] == {"scale": 0.1, "seed": 0}
    assert why_not_valid(DATA, tmp_path) is None and why_not_valid(TOKENIZER, tmp_path) is None

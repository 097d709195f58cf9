"""A user's mistake on any command line ends in one `error:` line, a non-zero exit, no traceback, and no file of the
run folder changed."""
import json

import pytest

from minimind.runs import require
from minimind.tokenizer import TOKENIZER

from conftest import run_cli

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "A run folder with the quick TinyWorld and tokenizer, and files that are wrong in the ways users get them wrong."
    d = tmp_path_factory.mktemp("mistakes")
    run = d/"run"
    require(TOKENIZER, run, quick=True)
    (d/"empty.jsonl").write_bytes(b"")
    (d/"latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    (d/"bad_json.jsonl").write_text('{"text": "unterminated\n', encoding="utf-8")
    (d/"text.jsonl").write_text('{"text": "Mimi lives in Maple Town."}\n', encoding="utf-8")
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (d/"sft.jsonl").write_text(json.dumps({"conversations": conv}) + "\n", encoding="utf-8")
    (d/"a_file").write_text("not a folder")
    (d/"not_a_model").mkdir()
    return d

def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}

CASES = {  # name: (arguments, a piece of the error line); "{d}" is the folder of the files above
    "unknown stage": (["distil"], "invalid choice: 'distil'"),
    "unknown preset": (["pretrain", "--preset", "tinyy"], "invalid choice: 'tinyy'"),
    "a number that is not one": (["pretrain", "--steps", "ten"], "expected an integer, got 'ten'"),
    "a number out of range": (["sft", "--lr", "-1"], "expected > 0"),
    "unknown stage to force": (["--force", "lorra"], "invalid choice: 'lorra'"),
    "missing data file": (["pretrain", "--data", "{d}/nope.jsonl", "--tokenizer", "{d}/run/tokenizer"], "no such file"),
    "empty data file": (["pretrain", "--data", "{d}/empty.jsonl", "--tokenizer", "{d}/run/tokenizer"], "empty file"),
    "not UTF-8": (["pretrain", "--data", "{d}/latin1.jsonl", "--tokenizer", "{d}/run/tokenizer"], "not valid UTF-8"),
    "bad JSON": (["tokenizer", "--data", "{d}/bad_json.jsonl"], "bad JSON"),
    "wrong schema for pretrain": (["pretrain", "--data", "{d}/sft.jsonl", "--tokenizer", "{d}/run/tokenizer"], "text: missing"),
    "wrong schema for sft": (["sft", "--data", "{d}/text.jsonl"], "conversations: missing"),
    "wrong schema for dpo": (["dpo", "--data", "{d}/sft.jsonl"], "chosen: missing"),
    "wrong schema for reason": (["reason", "--val-data", "{d}/text.jsonl"], "conversations: missing"),
    "wrong schema for lora's replay": (["lora", "--replay-data", "{d}/text.jsonl"], "conversations: missing"),
    "data without its tokenizer": (["pretrain", "--data", "{d}/text.jsonl"], "needs a tokenizer trained on that text"),
    "not a tokenizer folder": (["pretrain", "--tokenizer", "{d}/not_a_model"], "not a tokenizer folder"),
    "rows longer than the model": (["pretrain", "--seq-len", "100000"], "exceeds the tiny preset's"),
    "missing model folder": (["sft", "--init", "{d}/no_such_model"], "no such file or folder"),
    "a folder that holds no model": (["sft", "--init", "{d}/not_a_model"], "not a model folder"),
    "a teacher that is not a model": (["distill", "--teacher", "{d}/not_a_model"], "not a model folder"),
    "a file as the run folder": (["data", "--run-dir", "{d}/a_file"], "a file, not a folder"),
    "a done stage asked with other flags": (["data", "--scale", "0.5"], "other flags"),
    "GRPO problems without an answer": (["grpo", "--data", "{d}/sft.jsonl"], "answer: expected a non-empty string"),
    "held-out problems that are not problems": (["reason", "--val-data", "{d}/sft.jsonl"], "expected <think>"),
}

@pytest.mark.parametrize("name", CASES)
def test_train_mistakes_end_in_one_error_line(files, name):
    args, expected = CASES[name]
    args = [a.format(d=files) for a in args]
    if "--run-dir" not in args: args = ["--run-dir", str(files/"run"), *args]
    before = snapshot(files)
    out = run_cli(*args)
    assert out.returncode != 0
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert snapshot(files) == before  # nothing built, nothing written

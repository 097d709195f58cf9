"""A user's mistake on any command line ends in one `error:` line, a non-zero exit, no traceback, and no file of the
run folder changed."""
import json
import shutil

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

# --- using a model: chat, serve, eval, bench ---

@pytest.fixture(scope="module")
def models(files):
    "A model folder, and a run folder whose only model is a reasoning model (no chat model to pick by default)."
    from minimind.pretrain import PRETRAIN
    model = require(PRETRAIN, quick=True)/"model"
    run = files/"reasoning_only"
    shutil.copytree(model, run/"reason"/"model")
    (run/"reason"/"done.json").write_text("{}", encoding="utf-8")
    return model, run

USING = {  # name: (module, arguments, a piece of the error line); "{m}" is a model folder, "{r}" a run folder without a chat model
    "chat: missing model": ("chat", ["--model", "{d}/nope", "--prompt", "hi"], "no such file or folder"),
    "chat: a run folder without a chat model": ("chat", ["--model", "{r}", "--prompt", "hi"], "pick one with --stage"),
    "chat: a stage the run folder does not have": ("chat", ["--model", "{r}", "--stage", "grpo", "--prompt", "hi"], "has no model"),
    "chat: unknown stage": ("chat", ["--model", "{r}", "--stage", "rlhf"], "invalid choice: 'rlhf'"),
    "chat: negative temperature": ("chat", ["--model", "{m}", "--temperature", "-1", "--prompt", "hi"], "expected >= 0"),
    "chat: top-p of zero": ("chat", ["--model", "{m}", "--top-p", "0", "--prompt", "hi"], "expected > 0"),
    "chat: a device that is not one": ("chat", ["--model", "{m}", "--device", "gpu9", "--prompt", "hi"], "not a device"),
    "serve: missing model": ("serve", ["--model", "{d}/nope"], "no such file or folder"),
    "serve: a port out of range": ("serve", ["--model", "{m}", "--port", "70000"], "expected >= 0 and <= 65535"),
    "serve: no room to queue": ("serve", ["--model", "{m}", "--max-queue", "0"], "0 is out of range: expected >= 1"),  # Queue(0) has no limit
    "eval: missing data file": ("eval", ["--model", "{m}", "--task", "choice", "--data", "{d}/nope.jsonl"], "no such file"),
    "eval: a folder as data": ("eval", ["--model", "{m}", "--task", "ppl", "--data", "{d}/not_a_model"], "a folder, not a file"),
    "eval: the wrong kind of file": ("eval", ["--model", "{m}", "--task", "choice", "--data", "{d}/text.jsonl"], "question"),
    "eval: data for all tasks at once": ("eval", ["--model", "{m}", "--data", "{d}/text.jsonl"], "needs a single --task"),
    "eval: not UTF-8": ("eval", ["--model", "{m}", "--task", "ppl", "--data", "{d}/latin1.jsonl"], "not valid UTF-8"),
    "bench: unknown preset": ("bench", ["decode", "--preset", "tinyy"], "invalid choice: 'tinyy'"),
    "bench: batch of zero": ("bench", ["decode", "--batch", "0"], "expected >= 1"),
    "bench: not an upstream clone": ("bench", ["train", "--upstream", "{d}/not_a_model"], "no model/model_minimind.py"),
}

def check_error(out, expected, before, after):
    assert out.returncode != 0
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert after == before  # nothing written

@pytest.mark.parametrize("name", USING)
def test_using_a_model_mistakes_end_in_one_error_line(files, models, name):
    module, args, expected = USING[name]
    args = [a.format(d=files, m=models[0], r=models[1]) for a in args]
    before = snapshot(files)
    check_error(run_cli(*args, module=f"minimind.{module}", stdin=""), expected, before, snapshot(files))

def test_serve_on_a_port_in_use_says_so_before_loading(files, models):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); s.listen()
        before = snapshot(files)
        out = run_cli("--model", models[0], "--port", s.getsockname()[1], module="minimind.serve")
        check_error(out, "cannot listen on 127.0.0.1", before, snapshot(files))
        assert "serving" not in out.stdout

"The chat program: finding models, think traces while streaming, multi-turn sessions, the command line, the widget."
import copy
import io
import random
import shutil
from functools import partial

import pytest
import torch

from minimind.chat import (ChatSession, ChatWidget, ThinkSplitter, load_chat_model, print_reply, repl, resolve_model,
                           split_think)
from minimind.data import THINK_RE, read_jsonl
from minimind.tinyworld import tinyworld
from minimind.generate import generate_text
from minimind.hub import save_pth

from conftest import run_cli


def fake_run(tmp_path, model_dir, finished, unfinished=()):
    "A run folder whose stages all hold a copy of the same model; `finished` ones have a done.json."
    for s in [*finished, *unfinished]:
        shutil.copytree(model_dir, tmp_path / s / "model")
        if s in finished: (tmp_path / s / "done.json").write_text("{}")
    return tmp_path


# ---- which model -----------------------------------------------------------------------------------------------

def test_run_folder_picks_the_latest_finished_main_line_stage(tmp_path, quick):
    run = fake_run(tmp_path, quick.path, finished=["pretrain", "sft", "lora", "distill"], unfinished=["dpo"])
    assert resolve_model(run) == (run / "sft" / "model", "sft")  # dpo unfinished; lora and distill are side branches
    assert resolve_model(run, stage="lora") == (run / "lora" / "model", "lora")
    assert resolve_model(run / "dpo") == (run / "dpo" / "model", "dpo")  # a stage folder, finished or not
    assert resolve_model(run / "pretrain" / "model") == (run / "pretrain" / "model", "pretrain")
    (run / "dpo" / "done.json").write_text("{}")
    assert resolve_model(run)[1] == "dpo"


def test_bad_model_paths_are_clear_errors(tmp_path, quick):
    with pytest.raises(FileNotFoundError, match="no such file or folder"): resolve_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a model folder"): resolve_model(tmp_path)
    run = fake_run(tmp_path / "run", quick.path, finished=["pretrain"])
    with pytest.raises(FileNotFoundError, match="stage 'sft' has no model"): resolve_model(run, stage="sft")


def test_upstream_pth_needs_a_tokenizer_and_loads_with_one(tmp_path, quick):
    pth = save_pth(quick.model, tmp_path / "full_sft_64.pth")
    with pytest.raises(ValueError, match="--tokenizer"): load_chat_model(pth)
    up = load_chat_model(pth, tokenizer=quick.path, preset="micro", vocab_size=len(quick.tokenizer))
    assert up.name == "full_sft_64"
    ids = torch.tensor([quick.tokenizer.encode("Mimi is a white cat.")])
    with torch.no_grad():
        torch.testing.assert_close(up.model(ids).logits, copy.deepcopy(quick.model).half().float()(ids).logits, atol=1e-4, rtol=0)


# ---- think traces ----------------------------------------------------------------------------------------------

def test_think_splitter_streams_any_cut_of_a_reasoning_reply():
    records = [r for r, _ in zip(read_jsonl(tinyworld(scale=0.1) / "reason_val.jsonl", "reason"), range(30))]
    rng = random.Random(0)
    for rec in records:
        reply = rec["conversations"][-1]["content"]
        want = THINK_RE.fullmatch(reply).groups()
        for _ in range(5):
            cuts = sorted(rng.sample(range(1, len(reply)), rng.randint(1, min(20, len(reply) - 1))))
            s, got = ThinkSplitter(), {"reasoning": "", "content": ""}
            for a, b in zip([0, *cuts], [*cuts, len(reply)]):
                for ch, t in s.push(reply[a:b]): got[ch] += t
            for ch, t in s.flush(): got[ch] += t
            assert (got["reasoning"], got["content"]) == want


def test_replies_that_do_not_start_with_think_pass_through_unchanged():
    for text in ["Mimi is white.\n", "a <answer>b</answer> c", "x</think>y", "\n<think>late</think>", "<thin", ""]:
        assert split_think(text) == ("", text)
    s = ThinkSplitter()
    assert s.push("<th") == []  # could still become <think>
    assert s.push("ink>\nhm") == [("reasoning", "hm")]
    assert s.push("m\n</think>\n<answer>\n4") == [("reasoning", "m"), ("content", "4")]
    assert s.push("2\n") == [("content", "2")] and s.flush() == [("content", "\n")]  # a newline waits: a tag may follow


def test_print_reply_shows_or_hides_the_trace():
    pieces = [("reasoning", "2+2"), ("reasoning", " is 4"), ("content", "4")]
    hidden, shown = io.StringIO(), io.StringIO()
    print_reply(iter(pieces), False, hidden); print_reply(iter(pieces), True, shown)
    assert hidden.getvalue() == "4" and shown.getvalue() == "[think] 2+2 is 4\n4"


# ---- sessions --------------------------------------------------------------------------------------------------

def test_session_replies_are_the_engine_s_replies_to_the_whole_history(quick):
    s = ChatSession(quick.model, quick.tokenizer, system="Answer briefly.", temperature=0.8, top_p=0.9, max_new_tokens=24, seed=3)
    first, second = s.ask("Who are you?"), s.ask("What colour is Mimi?")
    g = torch.Generator().manual_seed(3)  # one random stream for the whole session
    h = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who are you?"}]
    want1 = generate_text(quick.model, quick.tokenizer, [h], 24, temperature=0.8, top_p=0.9, generator=g)[0]
    h += [{"role": "assistant", "content": want1}, {"role": "user", "content": "What colour is Mimi?"}]
    want2 = generate_text(quick.model, quick.tokenizer, [h], 24, temperature=0.8, top_p=0.9, generator=g)[0]
    assert (first, second) == (want1, want2)
    assert s.messages == h + [{"role": "assistant", "content": want2}]
    again = ChatSession(quick.model, quick.tokenizer, system="Answer briefly.", temperature=0.8, top_p=0.9, max_new_tokens=24, seed=3)
    assert again.ask("Who are you?") == first  # the same seed: the same conversation
    s.reset()
    assert s.messages == [{"role": "system", "content": "Answer briefly."}]


def test_session_drops_the_oldest_exchanges_to_fit_and_refuses_what_cannot(quick):
    s = ChatSession(quick.model, quick.tokenizer, temperature=0, max_new_tokens=8)
    for q in ["one", "two", "three"]: s.ask(q)
    n = lambda msgs: len(quick.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    need = n([{"role": "user", "content": "four"}])
    s.context = need + 8 + 1  # room for the new message only
    s.ask("four")
    assert s.dropped == 3 and [m["content"] for m in s.messages if m["role"] == "user"] == ["four"]
    with pytest.raises(ValueError, match="at most"): s.ask("word " * 50)


def test_an_interrupted_reply_stays_in_the_history(quick):
    s = ChatSession(quick.model, quick.tokenizer, temperature=0, max_new_tokens=30)
    it = s.send("Tell me a story.")
    shown = "".join(t for _, t in (next(it), next(it)))
    it.close()  # the user pressed Ctrl-C
    assert s.messages[-1] == {"role": "assistant", "content": shown} and shown

def test_a_reply_with_no_answer_leaves_no_user_turn_behind(monkeypatch, quick):
    import minimind.chat
    monkeypatch.setattr(minimind.chat, "stream", lambda *a, **k: iter(["<think>", "\nstill thinking"]))  # cut inside its trace
    s = ChatSession(quick.model, quick.tokenizer, temperature=0, max_new_tokens=8)
    s.ask("Who are you?"); s.ask("And where do you live?")
    assert s.messages == [] and s.last == {"reasoning": "still thinking", "content": ""}


# ---- the program and the widget --------------------------------------------------------------------------------

chat_cli = partial(run_cli, module="minimind.chat")


def test_command_line_scripted_and_interactive(quick):
    out = chat_cli("--model", quick.path, "--temperature", "0", "--max-new-tokens", "20", "--prompt", "Hi", "--prompt", "你好")
    assert out.returncode == 0, out.stderr
    s = ChatSession(quick.model, quick.tokenizer, temperature=0, max_new_tokens=20)
    assert out.stdout == s.ask("Hi") + "\n" + s.ask("你好") + "\n"
    out = chat_cli("--model", quick.path, "--temperature", "0", "--max-new-tokens", "20", stdin="Hi\n/think\n/reset\n你好\n/exit\n")
    assert out.returncode == 0, out.stderr
    s = ChatSession(quick.model, quick.tokenizer, temperature=0, max_new_tokens=20)
    assert f"minimind> {s.ask('Hi')}\n" in out.stdout and "(think traces shown)" in out.stdout
    s.reset()
    assert f"(conversation cleared)\nyou> minimind> {s.ask('你好')}\n" in out.stdout


def test_command_line_reports_a_bad_model(tmp_path):
    out = chat_cli("--model", tmp_path / "nothing", "--prompt", "hi")
    assert out.returncode == 1 and "error:" in out.stderr and "no such file or folder" in out.stderr


def test_repl_commands(quick):
    lines, out = iter(["/help", "   ", "/think", "/think", "/exit", "never read"]), io.StringIO()
    repl(ChatSession(quick.model, quick.tokenizer), input_fn=lambda p: next(lines), out=out)
    assert out.getvalue() == "commands: /reset  /think  /exit\n(think traces shown)\n(think traces hidden)\n"


def test_widget_streams_escaped_text(quick):
    pytest.importorskip("ipywidgets")
    w = ChatWidget(ChatSession(quick.model, quick.tokenizer, temperature=0, max_new_tokens=12))
    values = []
    w.log.observe(lambda change: values.append(change["new"]), names="value")
    reply = w.send("<b>hi</b>")
    assert "&lt;b&gt;hi&lt;/b&gt;" in w.log.value and "<b>hi</b>" not in w.log.value
    assert len(values) >= 3  # updated piece by piece, not once at the end
    assert reply == generate_text(quick.model, quick.tokenizer, [[{"role": "user", "content": "<b>hi</b>"}]], 12, temperature=0)[0]
    w.reset()
    assert w.log.value == "" and w.session.messages == []


# ---- tools (chapter 13) ----------------------------------------------------------------------------------------

def scripted(monkeypatch, replies):
    "Replace the model's streamed replies with `replies`, in turn; return the prompts it was given."
    import minimind.chat as chat
    prompts, it = [], iter(replies)
    def fake_stream(model, tokenizer, prompt, *args, **kwargs):
        prompts.append(prompt)
        yield next(it)
    monkeypatch.setattr(chat, "stream", fake_stream)
    return prompts


def test_session_with_tools_runs_each_call_shows_it_and_answers_from_the_result(monkeypatch, quick):
    from minimind.tools import TOOLS_CHAT_TEMPLATE, tinyworld_tools
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 48213, "b": 9077}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": "48213"}}\n</tool_call>'
    prompts = scripted(monkeypatch, [call, bad, "48213 + 9077 = 57290."])
    tok = copy.copy(quick.tokenizer); tok.chat_template = TOOLS_CHAT_TEMPLATE
    s = ChatSession(quick.model, tok, tools=tinyworld_tools(), context=4096)  # (the stand-in replies need no positions)
    pieces = list(s.send("What is 48213 + 9077?"))
    assert [t for ch, t in pieces if ch == "tool"] == ['add({"a": 48213, "b": 9077}) -> 57290\n',
                                                       'add({"a": "48213"}) -> error: add: missing argument \'b\'\n']
    assert "# Tools" in prompts[0] and "<tool_response>\n57290\n</tool_response>" in prompts[1]
    assert "<tool_response>\nerror: add: missing argument 'b'\n</tool_response>" in prompts[2]
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert s.last["content"] == "48213 + 9077 = 57290." and s.calls == 2
    out = io.StringIO(); print_reply(iter(pieces), out=out)
    assert "\n[tool] add(" in out.getvalue() and out.getvalue().endswith("57290.")


def test_session_with_tools_stops_after_max_rounds(monkeypatch, quick):
    from minimind.tools import TOOLS_CHAT_TEMPLATE, tinyworld_tools
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>'
    prompts = scripted(monkeypatch, [call] * 10)
    tok = copy.copy(quick.tokenizer); tok.chat_template = TOOLS_CHAT_TEMPLATE
    s = ChatSession(quick.model, tok, tools=tinyworld_tools(max_calls=2), max_rounds=3, context=4096)
    tools = [t for ch, t in s.send("1 + 1?") if ch == "tool"]
    assert len(prompts) == 3 and tools[-1].endswith("error: too many tool calls (at most 2 in one conversation)\n")


def test_command_line_with_tools_says_when_the_tool_list_does_not_fit(quick):
    "The quick model has 512 positions; the tools' system turn alone is longer: one error line, no traceback."
    out = chat_cli("--model", quick.path, "--tools", "--temperature", "0", "--max-new-tokens", "12", "--prompt", "What is 48213 + 9077?")
    assert out.returncode == 1 and out.stderr.startswith("error: the message has") and "Traceback" not in out.stderr

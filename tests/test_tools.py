"""Chapter 13's pieces: the tools chat template against minimind-3's, tool-call parsing, and a registry that turns
every bad call into an `error:` message for the model instead of an exception."""
import json
from pathlib import Path

import pytest

from conftest import run_cli
from minimind.tokenizer import render_chat_template, tinyworld_tokenizer
from minimind.tools import (TOOLS_CHAT_TEMPLATE, Tool, ToolCall, ToolRegistry, assistant_message, lookup, parse_tool_calls,
                            tinyworld_tools)

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
LOOK = {"type": "function", "function": {"name": "lookup", "description": "查一个事实。",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}, "field": {"type": "string", "enum": ["town", "colour"]}},
                       "required": ["name", "field"]}}}
def call(name, args): return {"type": "function", "function": {"name": name, "arguments": args}}
Q = {"role": "user", "content": "What is 48213 + 9077?"}
SYS = {"role": "system", "content": "You are MiniMind."}

# (messages, tools, add_generation_prompt, open_thinking); tests/golden/minimind3_chat_template.json holds what
# minimind-3's own template (upstream model/tokenizer_config.json, 2026) renders for each, through transformers 5.25
CASES = [
    ([Q], None, True, None),  # no tools, thinking off by default
    ([Q], None, True, True),  # thinking on
    ([SYS, Q], None, True, False),  # a system message, thinking off explicitly
    ([Q], [ADD], True, None),  # tools
    ([SYS, Q], [ADD, LOOK], True, True),  # a system message and two tools
    ([Q, {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 48213, "b": 9077})]},  # a call and its result
      {"role": "tool", "content": "57290"}], [ADD], True, None),
    ([Q, {"role": "assistant", "content": "Let me add.", "reasoning_content": "big numbers",  # text, reasoning, string arguments
          "tool_calls": [call("add", '{"a": 48213, "b": 9077}')]},
      {"role": "tool", "content": "57290"}, {"role": "assistant", "content": "57290"}], [ADD], False, None),
    ([{"role": "user", "content": "皮皮住在哪里？它是什么颜色？"},  # two calls in one reply, two results in one turn
      {"role": "assistant", "content": "", "tool_calls": [call("lookup", {"name": "皮皮", "field": "town"}),
                                                          call("lookup", {"name": "皮皮", "field": "colour"})]},
      {"role": "tool", "content": "枫叶镇"}, {"role": "tool", "content": "黄色"}], [LOOK], True, True),
    ([Q, {"role": "assistant", "content": "<think>\nI should add.\n</think>\n\n57290"}], None, False, None),  # reasoning in the content
    ([Q, {"role": "assistant", "content": "<think>I should add.</think>57290"}, {"role": "user", "content": "And minus 1?"}],
     [ADD], True, False),
    ([Q, {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 48213, "b": 9077}}]},  # multi-step
      {"role": "tool", "content": "57290"}, {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 57290, "b": -1})]},
      {"role": "tool", "content": "57289"}, {"role": "assistant", "content": "57289"}], [ADD], False, None),
    ([SYS, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "bye"}], None, True, None),  # a later system message
]
GOLDEN = json.loads((Path(__file__).parent / "golden" / "minimind3_chat_template.json").read_text(encoding="utf-8"))


def kwargs(tools, think): return {"tools": tools, **({} if think is None else {"open_thinking": think})}


@pytest.mark.parametrize("i", range(len(CASES)))
def test_template_renders_as_minimind3(i):
    msgs, tools, gen, think = CASES[i]
    assert render_chat_template(msgs, TOOLS_CHAT_TEMPLATE, add_generation_prompt=gen, **kwargs(tools, think)) == GOLDEN[i]


def test_template_through_transformers():
    "transformers' own apply_chat_template renders our template to the same bytes."
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tinyworld_tokenizer(small=True))
    for (msgs, tools, gen, think), want in zip(CASES, GOLDEN):
        got = hf.apply_chat_template(msgs, chat_template=TOOLS_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen,
                                     **kwargs(tools, think))
        assert got == want


def test_golden_file_matches_the_cases():
    assert len(GOLDEN) == len(CASES) >= 10


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "not valid JSON"),
    ('<tool_call>["add", 1, 2]</tool_call>', 'needs a JSON object with a "name" string'),
    ('<tool_call>{"arguments": {}}</tool_call>', 'needs a JSON object with a "name" string'),
    ('<tool_call>{"name": "add", "arguments": "{a: 1}"}</tool_call>', "arguments are not valid JSON"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', '"arguments" must be a JSON object'),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "was not closed"),
])
def test_malformed_calls_become_errors(text, error):
    (c,) = parse_tool_calls(text)
    assert error in c.error
    assert tinyworld_tools().call(c).startswith("error: ")


def test_calls_parse_in_order_with_string_arguments():
    text = ('<think>\nadd then look\n</think>\n\n<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>\n'
            '<tool_call>\n{"name": "lookup", "arguments": {"name": "Pip", "field": "town"}}\n</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("lookup", {"name": "Pip", "field": "town"})]
    assert parse_tool_calls("7 + 8 = 15") == []


@pytest.mark.parametrize("c, want", [
    (ToolCall("add", {"a": 48213, "b": 9077}), "57290"),
    (ToolCall("multiply", {"a": -12, "b": 34}), "-408"),
    (ToolCall("lookup", {"name": "Pip", "field": "colour"}), "yellow"),
    (ToolCall("lookup", {"name": "皮皮", "field": "town"}), "枫叶镇"),
    (ToolCall("divide", {"a": 1, "b": 2}), "error: unknown tool 'divide' (tools: add, subtract, multiply, lookup)"),
    (ToolCall("add", {"a": "1", "b": 2}), "error: add: argument 'a' must be an integer, got \"1\""),
    (ToolCall("add", {"a": True, "b": 2}), "error: add: argument 'a' must be an integer, got true"),
    (ToolCall("add", {"a": 1.5, "b": 2}), "error: add: argument 'a' must be an integer, got 1.5"),
    (ToolCall("add", {"a": 1}), "error: add: missing argument 'b'"),
    (ToolCall("add", {"a": 1, "b": 2, "c": 3}), "error: add: unknown argument 'c' (expected 'a', 'b')"),
    (ToolCall("lookup", {"name": "Pip", "field": "age"}), 'error: lookup: argument \'field\' must be one of "animal", "colour", "town", "food", got "age"'),
    (ToolCall("lookup", {"name": "Nobody", "field": "town"}), "error: lookup failed: ValueError: no creature called 'Nobody' in TinyWorld"),
])
def test_registry_runs_good_calls_and_explains_bad_ones(c, want):
    assert tinyworld_tools().call(c) == want


def test_a_tool_that_raises_does_not_escape():
    def boom(x): raise RuntimeError("disk on fire")
    reg = ToolRegistry([Tool("boom", "Always fails.", {"type": "object", "properties": {"x": {"type": "number"}}}, boom)])
    assert reg.call(ToolCall("boom", {"x": 1})) == "error: boom failed: RuntimeError: disk on fire"
    assert reg.call(ToolCall("boom", {"x": 2.5})).startswith("error: boom failed")  # a number may be an int or a float


def test_call_limit_per_conversation():
    reg = tinyworld_tools(max_calls=3)
    one = ToolCall("add", {"a": 1, "b": 1})
    assert [m["content"] for m in reg.answer([one, one], made=0)] == ["2", "2"]
    assert [m["content"] for m in reg.answer([one, one], made=2)] == ["2", "error: too many tool calls (at most 3 in one conversation)"]
    assert all(m["role"] == "tool" for m in reg.answer([one], made=5))


def test_specs_are_what_the_template_lists():
    specs = tinyworld_tools().specs()
    assert [s["function"]["name"] for s in specs] == ["add", "subtract", "multiply", "lookup"]
    prompt = render_chat_template([Q], TOOLS_CHAT_TEMPLATE, add_generation_prompt=True, tools=specs)
    assert all(json.dumps(s, ensure_ascii=False) in prompt for s in specs)


def test_assistant_message_round_trips_a_reply():
    reply = ('<think>\nBig numbers.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 48213, "b": 9077}}\n</tool_call>')
    msgs = [Q, assistant_message(reply), *tinyworld_tools().answer(parse_tool_calls(reply))]
    prompt = render_chat_template(msgs, TOOLS_CHAT_TEMPLATE, add_generation_prompt=True, tools=[ADD])
    assert f"<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>user\n<tool_response>\n57290\n</tool_response><|im_end|>\n" in prompt


def test_lookup_agrees_with_the_world():
    assert (lookup("Mimi", "animal"), lookup("咪咪", "animal"), lookup("Mimi", "food")) == ("cat", "猫", "fish")


def test_tool_tasks_validate_and_their_answers_come_from_the_tools():
    from minimind.data import chat_parts, validate_record
    from minimind.tools import TOOL_TASKS, tool_conversations
    recs = tool_conversations(50, seed=3)
    assert {r["task"] for r in recs} == set(TOOL_TASKS)
    for r in recs:
        validate_record(r, "sft")
        msgs, tools = chat_parts(r["conversations"])
        names = {t["function"]["name"] for t in tools or []}
        calls = [c["function"] for m in msgs for c in m.get("tool_calls", [])]
        results = [m["content"] for m in msgs if m["role"] == "tool"]
        assert r["answer"] in msgs[-1]["content"]
        if r["task"] == "direct":  # no tools listed, no calls
            assert not tools and not calls and not results
            continue
        assert {c["name"] for c in calls} <= names and len(names) == 2  # a choice: one tool not needed, or the two of a two-step task
        assert results == [tinyworld_tools().call(ToolCall(c["name"], c["arguments"])) for c in calls]
        assert results[-1] == r["answer"]


def test_sft_trains_the_calls_not_the_results(tok):
    "With the tools template, an SFT row trains the assistant's calls and answer, never the tool's result or the tool list."
    import numpy as np
    from minimind.sft import tokenize_conversations
    from minimind.tools import tool_task
    import random
    tok3 = type(tok)(tok.tokenizer, chat_template=TOOLS_CHAT_TEMPLATE)
    r = tool_task(random.Random(0), "add")
    (ids, trained), = tokenize_conversations(tok3, [r["conversations"]])
    text = lambda m: tok3.decode(ids[m].tolist())
    assert '<tool_call>\n{"name": "add"' in text(trained) and r["answer"] in text(trained)
    assert "<tool_response>" not in text(trained) and "# Tools" not in text(trained) and "# Tools" in text(~trained)
    assert text(trained).count("<|im_end|>") == 2  # both assistant turns, through their ends


@pytest.mark.parametrize("reply, answer, ok", [("48213 + 9077 = 57290.", "57290", True), ("It is 157290.", "57290", False),
                                               ("结果是-12。", "-12", True), ("皮皮住在枫叶镇。", "枫叶镇", True), ("Pip is red.", "yellow", False)])
def test_reply_has(reply, answer, ok):
    from minimind.tools import reply_has
    assert reply_has(reply, answer) == ok


def test_a_malformed_call_stays_in_the_history_and_its_error_follows():
    reply = '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>'
    msg = assistant_message(reply)
    assert msg["content"] == reply and "tool_calls" not in msg
    results = tinyworld_tools().answer(parse_tool_calls(reply))
    assert results[0]["content"].startswith("error: the tool call is not valid JSON")
    render_chat_template([Q, msg, *results], TOOLS_CHAT_TEMPLATE, add_generation_prompt=True, tools=[ADD])  # renders


# Episodes: the one loop that evaluates tool use (greedy) and rolls it out for agentic RL (sampled), driven here by
# scripted replies in place of a model's.
def scripted(tok, replies, monkeypatch):
    "Make `tool_episodes` generate `replies` in turn (one list per round: a row's reply text, an end-of-turn token added unless it ends with '...')."
    import minimind.agent as agent
    rounds = iter(replies)
    def fake(model, tok_, prompts, *args, **kw):
        texts = next(rounds)
        assert len(texts) == len(prompts)
        return [tok.encode(t[:-3]) if t.endswith("...") else tok.encode(t) + [tok.eos_id] for t in texts]
    monkeypatch.setattr(agent, "sample_completions", fake)

OFFER = {"role": "system", "content": "Be brief.", "tools": [ADD, LOOK]}  # the tools an episode may run
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 48213, "b": 9077}}\n</tool_call>'

@pytest.fixture
def tok3(tok): return type(tok)(tok.tokenizer, chat_template=TOOLS_CHAT_TEMPLATE)

def test_an_episode_reads_as_its_conversation_renders(tok3, monkeypatch):
    "The episode's tokens are the chat of its messages; only the model's replies are trained; the result comes from the registry."
    from minimind.agent import tool_episodes
    from minimind.sft import chat_text
    scripted(tok3, [[ADD_CALL], ["48213 + 9077 = 57290."]], monkeypatch)
    conv = [{"role": "system", "content": "Be brief.", "tools": [ADD]}, Q]
    (e,) = tool_episodes(None, tok3, [conv], tinyworld_tools())
    assert e["final"] == "48213 + 9077 = 57290." and e["calls"] == 1 and e["errors"] == 0
    assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant", "tool", "assistant"] and e["messages"][3]["content"] == "57290"
    assert tok3.decode(e["ids"]) == chat_text(tok3, e["messages"]).rstrip("\n")  # the template's text, through the last <|im_end|>
    trained = tok3.decode([t for t, k in zip(e["ids"], e["trained"]) if k])
    assert trained == ADD_CALL + "<|im_end|>" + "48213 + 9077 = 57290.<|im_end|>"

@pytest.mark.parametrize("first, calls, errors", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', 1, 1),  # malformed JSON
    ('<tool_call>\n{"name": "divide", "arguments": {"a": 1, "b": 2}}\n</tool_call>', 1, 1),  # unknown tool
    ('<tool_call>\n{"name": "add", "arguments": {"a": "1", "b": 2}}\n</tool_call>', 1, 1),  # wrong type
    ('<tool_call>\n{"name": "lookup", "arguments": {"name": "Nobody", "field": "town"}}\n</tool_call>', 1, 1),  # the tool raises
    (ADD_CALL + "\n" + ADD_CALL + "\n" + ADD_CALL, 3, 1)])  # past the limit of 2 calls
def test_bad_calls_do_not_stop_an_episode(tok3, monkeypatch, first, calls, errors):
    from minimind.agent import tool_episodes
    scripted(tok3, [[first], ["I could not."]], monkeypatch)
    (e,) = tool_episodes(None, tok3, [[OFFER, Q]], tinyworld_tools(max_calls=2))
    assert e["final"] == "I could not." and e["calls"] == calls and e["errors"] == errors
    assert sum(m["content"].startswith("error:") for m in e["messages"] if m["role"] == "tool") == errors

def test_episodes_end_unfinished_when_cut_off_or_out_of_rounds(tok3, monkeypatch):
    from minimind.agent import tool_episodes
    scripted(tok3, [[ADD_CALL, "48213 + 90..."], [ADD_CALL]], monkeypatch)  # row 2 runs out of tokens; row 1 keeps calling
    a, b = tool_episodes(None, tok3, [[OFFER, Q], [OFFER, Q]], tinyworld_tools(), max_rounds=2)
    assert a["final"] is None and a["calls"] == 2 and b["final"] is None and b["calls"] == 0
    assert a["ids"][-1] == tok3.eos_id and a["trained"][-1]  # ended on its own reply: no results to read after it

def test_pack_episodes_trains_exactly_the_model_tokens():
    from minimind.agent import pack_episodes
    eps = [{"ids": [5, 6, 7, 8, 9], "trained": [False, False, True, False, True]}, {"ids": [5, 6, 7], "trained": [False, True, True]}]
    b = pack_episodes(eps, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 7, 0]] and b["targets"].tolist() == [[6, 7, 8, 9], [6, 7, 0, 0]]
    assert b["targets"][b["mask"]].tolist() == [7, 9, 6, 7]

@pytest.mark.parametrize("final, calls, errors, reward", [("It is 57290.", 1, 0, 1.2), ("It is 57290.", 3, 0, 1.0), ("It is 5.", 1, 0, 0.2),
                                                         ("It is 5.", 1, 1, 0.0), (None, 0, 0, 0.0), ("57290", 0, 0, 1.0)])
def test_episode_reward(final, calls, errors, reward):
    from minimind.agent import episode_reward
    assert episode_reward({"final": final, "calls": calls, "errors": errors}, "57290", needed=1) == pytest.approx(reward)


# The `tools` and `agent` stages of `python -m minimind.train`, at their quick sizes.
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    "A copy of the book's quick run folder through the reason stage."
    import shutil
    from minimind.reason import REASON
    from minimind.runs import require
    src = require(REASON, quick=True).parent
    run = tmp_path_factory.mktemp("quick") / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("checkpoints", ".lock", "grpo", "tools", "agent", "lora", "distill"))
    return run

def test_tools_then_agent_stages_with_quick_args(quick_run):
    from minimind.agent import AGENT_QUICK_ARGS, TOOLS_QUICK_ARGS
    t = run_cli("--run-dir", quick_run, "tools", *TOOLS_QUICK_ARGS)
    assert t.returncode == 0, t.stderr[-3000:]
    assert f"from {quick_run / 'reason' / 'model'}" in t.stdout and "24 tool conversations + 16 replayed" in t.stdout
    folder = quick_run / "tools"
    assert (folder / "model" / "model.safetensors").exists() and "tool_call" in (folder / "model" / "tokenizer_config.json").read_text()
    val = [json.loads(l) for l in (folder / "tools_val.jsonl").read_text().splitlines()]
    trained = (folder / "tools.jsonl").read_text()
    assert len(val) == 8 and not any(json.dumps(c["function"]["arguments"]) in trained  # held out: no trained calculation
                                     for r in val for m in r["conversations"] for c in m.get("tool_calls", []) if "a" in c["function"]["arguments"])
    numbers = json.loads((folder / "done.json").read_text())["numbers"]
    assert " -> " in numbers["accuracy"] and numbers["steps"] == 4 and "lookup" in numbers["by task"]
    a = run_cli("--run-dir", quick_run, "agent", *AGENT_QUICK_ARGS)
    assert a.returncode == 0, a.stderr[-3000:]
    assert f"from {folder / 'model'}" in a.stdout and "held-out 8 problems" in a.stdout  # the tools stage's model and held-out file
    assert "16 problems (lookup, two-step)" in a.stdout  # by default RL trains where tool SFT leaves errors
    numbers = json.loads((quick_run / "agent" / "done.json").read_text())["numbers"]
    assert numbers["rounds"] == 2 and " -> " in numbers["accuracy"]
    rounds = [json.loads(l) for l in (quick_run / "agent" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(k in rounds[0] for k in ("reward", "kl", "accuracy", "length"))
    from minimind.train import tool_samples
    assert [q.split(" (")[-1] for q, _ in tool_samples(quick_run)] == ["agent, with tools)"] * 2  # the report's episodes: the newest tool model

@pytest.mark.parametrize("stage, record, why", [
    ("agent", {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}, ":1: answer"),
    ("tools", {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "tool", "content": "2"}]}, ":1: "),
])
def test_a_bad_data_file_is_one_error_line(quick_run, tmp_path, stage, record, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n", encoding="utf-8")
    out = run_cli("--run-dir", quick_run, stage, "--init", quick_run / "reason" / "model", "--data", bad, "--out", tmp_path / "out")
    assert out.returncode != 0 and f"{bad}{why}" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")

def test_a_call_inside_the_think_block_is_not_a_call(tok3, monkeypatch):
    "Thinking about a call (even a broken one) runs nothing; the reply after the think block is what counts."
    from minimind.agent import tool_episodes
    thought = '<think>\nmaybe <tool_call>\n{"name": "add", "arguments": {"a": 1,\n</think>\n\n'
    scripted(tok3, [[thought + "It is 57290."], [thought + ADD_CALL], ["48213 + 9077 = 57290."]], monkeypatch)
    (a,) = tool_episodes(None, tok3, [[OFFER, Q]], tinyworld_tools(), open_thinking=True)
    assert a["final"] == "It is 57290." and a["calls"] == 0 and a["messages"][-1]["reasoning_content"].startswith("maybe <tool_call>")
    (b,) = tool_episodes(None, tok3, [[OFFER, Q]], tinyworld_tools(), open_thinking=True)
    assert b["calls"] == 1 and b["errors"] == 0 and b["final"] == "48213 + 9077 = 57290."

def test_the_report_shows_an_episode_call_by_call():
    from minimind.train import episode_text
    msgs = [Q, {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 48213, "b": 9077})]},
            {"role": "tool", "content": "57290"}, {"role": "assistant", "content": "48213 + 9077 = 57290."}]
    assert episode_text(msgs) == 'add({"a": 48213, "b": 9077})\n-> 57290\n48213 + 9077 = 57290.'

def test_an_episode_runs_only_the_tools_its_conversation_lists(tok3, monkeypatch):
    "A tool the registry has but the conversation does not list is an unknown tool: no reward for calling what was not offered."
    from minimind.agent import tool_episodes
    scripted(tok3, [[ADD_CALL, ADD_CALL], ["I could not.", "I could not."]], monkeypatch)
    listed = [{"role": "system", "content": "Be brief.", "tools": [LOOK]}, Q]
    a, b = tool_episodes(None, tok3, [listed, [Q]], tinyworld_tools())
    assert [m["content"] for m in a["messages"] if m["role"] == "tool"] == ["error: unknown tool 'add' (tools: lookup)"]
    assert [m["content"] for m in b["messages"] if m["role"] == "tool"] == ["error: unknown tool 'add' (tools: none offered)"]
    assert a["errors"] == b["errors"] == 1

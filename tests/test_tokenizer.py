"Tests for minimind.tokenizer: round trips, special tokens, Hugging Face compatibility, errors."
import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from minimind.data import DataError
from minimind.tokenizer import (CHAT_TEMPLATE, RESERVED_TOKENS, SPECIAL_TOKENS, MiniMindTokenizer,
                                texts_from_jsonl, train_tokenizer)

transformers = pytest.importorskip("transformers")

UPSTREAM_MINIMIND2_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"

# a template in the style of upstream minimind-3: tools, reasoning, namespace, tojson, open_thinking
TOOLS_TEMPLATE = """{%- set ns = namespace(sys=false) %}
{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{% for t in tools %}{{- '\\n' + (t | tojson) }}{% endfor %}{{- '\\n</tools><|im_end|>\\n' }}{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}
{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% if open_thinking is defined and open_thinking %}{{- '<think>\\n' }}{% endif %}{% endif %}"""


def corpus(n=600, seed=0):
    "A small bilingual corpus with digits, tags, punctuation and emoji."
    r = random.Random(seed)
    en = "the cat dog sat ran on a mat river Lily Tom has apples what is plus happy little walked to".split()
    zh = list("小猫狗坐在垫子上莉莉汤姆有个苹果走到河边加等于几很开心")
    out = []
    for _ in range(n):
        words = " ".join(r.choice(en) for _ in range(r.randrange(3, 9)))
        hanzi = "".join(r.choice(zh) for _ in range(r.randrange(3, 9)))
        out.append(f"{words} {r.randrange(1000)} {hanzi}" + r.choice([".", "!", "。", " <think>ok</think>", " 🙂"]))
    return out


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def saved(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def hf(saved):
    return transformers.AutoTokenizer.from_pretrained(saved)


CHAT = [{"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am MiniMind."},
        {"role": "user", "content": "7+5=?"},
        {"role": "assistant", "content": "<think>\n7+5=12\n</think>\n<answer>\n12\n</answer>"}]
SYSTEM = [{"role": "system", "content": "你是一个助手。"}]
CONVERSATIONS = [CHAT, SYSTEM + CHAT, CHAT[:2], SYSTEM + CHAT[:2]]
PROMPTS = [CHAT[:1], CHAT[:3], SYSTEM + CHAT[:1], SYSTEM + CHAT[:3]]

SPECIAL_TEXT = st.sampled_from(SPECIAL_TOKENS + RESERVED_TOKENS + ["<|im_start", "<think", "|>", "</"])
PIECES = st.one_of(st.text(), st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)),
                   st.text(alphabet="0123456789 \t\n\r\u3000"), st.sampled_from(["🙂", "👩‍👩‍👧", "e\u0301", "\x00", "\ufeff"]),
                   SPECIAL_TEXT)


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_roundtrip_text(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=150, deadline=None)
@given(st.lists(PIECES, max_size=8).map("".join))
def test_roundtrip_mixed(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.encode_batch([s, s]) == [ids, ids]


def test_special_token_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in RESERVED_TOKENS] == list(range(3, 11))
    for i, t in enumerate(SPECIAL_TOKENS + RESERVED_TOKENS):
        assert tok.encode(t) == [i]
        assert tok.encode(f"a{t}b")[1:-1] == [i]
    assert tok.think_ids == (3, 4) and tok.answer_ids == (5, 6) and tok.tag_ids == [3, 4, 5, 6]
    assert len(tok) == tok.vocab_size == 400


def test_skip_special_keeps_tags(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>x</think><tool_call>{}</tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think><tool_call>{}</tool_call>"


def test_digits_split(tok):
    ids = tok.encode("x 1234567890 2025年")
    assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == list("12345678902025")
    assert all(len(tok.decode([i]).strip(" x年")) <= 1 for i in ids)


def test_template_matches_upstream_for_complete_chats(tok):
    up = MiniMindTokenizer(tok.tokenizer, UPSTREAM_MINIMIND2_TEMPLATE)
    for msgs in CONVERSATIONS:
        assert tok.apply_chat_template(msgs) == up.apply_chat_template(msgs)
    for msgs in PROMPTS:
        assert tok.apply_chat_template(msgs, add_generation_prompt=True) == up.apply_chat_template(msgs)
        assert not tok.apply_chat_template(msgs).endswith("<|im_start|>assistant\n")


def test_transformers_loads_and_agrees(tok, hf):
    samples = corpus(20, seed=1) + ["<|im_start|>user\nhi<|im_end|>", "<think>\n1+1=2\n</think>", "猫 🐈 \t 42", ""]
    for s in samples:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=True) == ids
        assert hf.decode(ids) == tok.decode(ids) == s
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("msgs", CONVERSATIONS + PROMPTS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(tok, hf, msgs, gen):
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ours
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == tok.encode(ours)


def test_save_load_roundtrip(tok, saved):
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == tuple(SPECIAL_TOKENS[i] for i in (1, 2, 0, 0))
    assert cfg["added_tokens_decoder"]["3"] == dict(content="<think>", lstrip=False, normalized=False, rstrip=False,
                                                    single_word=False, special=False)
    assert cfg["added_tokens_decoder"]["2"]["special"] is True
    assert (saved / "special_tokens_map.json").is_file()
    tok2 = MiniMindTokenizer.load(saved)
    s = "汤姆有12个苹果 <think>?</think>"
    assert tok2.encode(s) == tok.encode(s) and tok2.chat_template == CHAT_TEMPLATE and len(tok2) == len(tok)


def upstream_dir(tok, path, template):
    "An upstream-style tokenizer directory: 3 special tokens only, upstream's config layout."
    spec = json.loads(tok.tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    for t in RESERVED_TOKENS: del spec["model"]["vocab"][t]
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    cfg = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
           "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
           "additional_special_tokens": [], "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False,
           "eos_token": "<|im_end|>", "legacy": True, "model_max_length": 32768, "pad_token": "<|endoftext|>",
           "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
           "unk_token": "<|endoftext|>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    return path


def test_load_upstream_minimind2(tok, tmp_path):
    d = upstream_dir(tok, tmp_path / "up", UPSTREAM_MINIMIND2_TEMPLATE)
    up, hf = MiniMindTokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
    assert (up.pad_id, up.bos_id, up.eos_id) == (0, 1, 2)
    assert up.token_to_id("<think>") is None and up.tag_ids == []
    for msgs in CONVERSATIONS + PROMPTS:
        for gen in (False, True):
            assert up.apply_chat_template(msgs, add_generation_prompt=gen) == \
                hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    s = "<|im_start|>user\n<think>12</think><|im_end|>"
    assert up.encode(s) == hf.encode(s) and up.decode(up.encode(s)) == s


def test_load_template_with_tools(tok, tmp_path):
    d = upstream_dir(tok, tmp_path / "up3", TOOLS_TEMPLATE)
    up, hf = MiniMindTokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
    tools = [{"type": "function", "function": {"name": "add", "description": "加法", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": "", "reasoning_content": "use add", "tool_calls": [{"name": "add"}]},
            {"role": "tool", "content": "3"}]
    for kw in [{}, {"tools": tools}, {"tools": tools, "open_thinking": True}]:
        ours = up.apply_chat_template(msgs, add_generation_prompt=True, **kw)
        assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    assert '"加法"' in up.apply_chat_template(msgs, tools=tools) and ours.endswith("<think>\n")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=267 is too small.*must exceed 267"):
        train_tokenizer(["abc"], vocab_size=267)


def test_load_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: missing tokenizer.json"):
        MiniMindTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing tokenizer_config.json"):
        MiniMindTokenizer.load(tmp_path)


@pytest.mark.parametrize("msgs, msg", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "message 1: unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], r"message 1 \(assistant\): empty content"),
    ([{"role": "user", "content": 3}], r"message 0 \(user\): content must be a string"),
    ([{"role": "user", "content": "hi"}, "hello"], "message 1: expected a dict"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    ([], "messages is empty"),
    (CHAT + SYSTEM, "message 4: a system message may only come first"),
    ([{"role": "tool", "content": "3"}], "message 0: unknown role tool"),
])
def test_bad_messages(tok, msgs, msg):
    with pytest.raises(ValueError, match=msg):
        tok.apply_chat_template(msgs)


def test_texts_from_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": "hello"}, {"conversations": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "yo", "reasoning_content": "think"}]}]
    p.write_text(json.dumps(recs[0]) + "\n")
    q = tmp_path / "c.jsonl"
    q.write_text(json.dumps(recs[1]) + "\n")
    assert list(texts_from_jsonl([p, str(q)])) == ["hello", "hi", "yo", "think"]
    bad = tmp_path / "bad.jsonl"
    for lines, msg in [('{"text": "ok"}\n{"text": \n', "bad JSON"), ('{"text": "ok"}\n{"prompt": "x"}\n', "text: missing"),
                       ('{"text": "ok"}\n\n{"text": "ok"}\n', "blank line"),
                       ('{"text": "ok"}\n' + json.dumps(recs[1]) + "\n", "text: missing")]:
        bad.write_text(lines)
        with pytest.raises(DataError, match=f"{bad}:2: {msg}"):
            list(texts_from_jsonl(bad))
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match=f"{bad}:1: cannot tell the record kind"):
        list(texts_from_jsonl(bad))

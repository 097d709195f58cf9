"Tests for minimind.data (formats, validation errors, the skip policy) and the TinyWorld generator (minimind.world, minimind.tinyworld)."
import hashlib
import json
import pickle
import re
import warnings

import pytest

from minimind.data import THINK_RE, DataError, read_jsonl, validate_file, validate_record
from minimind.tinyworld import FILES, TINYWORLD_KINDS, make_tinyworld, tinyworld
from minimind.world import CREATURES, en_num, held_out, zh_num

SCALE = 0.05
EXPECTED_FILES = {"pretrain", "pretrain_val", "sft", "sft_val", "identity", "dpo", "dpo_val",
                  "reason", "reason_val", "rl", "rl_val"}


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.jsonl"))}


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    "Two generations with seed 0 and one with seed 1, at a small scale."
    root = tmp_path_factory.mktemp("tinyworld")
    return {name: (root/name, make_tinyworld(root/name, seed=seed, scale=SCALE))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


# ---------------------------------------------------------------- generator: determinism and splits
def test_files_and_kinds(worlds):
    folder, paths = worlds["a"]
    assert set(paths) == EXPECTED_FILES == set(TINYWORLD_KINDS)
    assert {p.name for p in folder.iterdir()} == {f"{s}.jsonl" for s in EXPECTED_FILES} # no temp files left


def test_same_seed_is_byte_identical(worlds):
    assert _digests(worlds["a"][0]) == _digests(worlds["b"][0])
    assert len(_digests(worlds["a"][0])) == len(EXPECTED_FILES)


def test_different_seed_differs(worlds):
    a, c = _digests(worlds["a"][0]), _digests(worlds["c"][0])
    assert all(a[name] != c[name] for name in a)


def test_files_are_plain_utf8_jsonl(worlds):
    raw = (worlds["a"][0]/"sft.jsonl").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    assert "咪咪".encode() in raw or "波波".encode() in raw # Chinese written as UTF-8, not \u escapes


@pytest.mark.parametrize("stem", sorted(EXPECTED_FILES))
def test_every_file_validates(worlds, stem):
    folder, paths = worlds["a"]
    n = validate_file(paths[stem], TINYWORLD_KINDS[stem])
    assert n == len(_lines(paths[stem])) > 0


@pytest.mark.parametrize("stem", [s for s, (_, _, _, n_val) in FILES.items() if n_val])
def test_val_shares_no_record_with_train(worlds, stem):
    folder, _ = worlds["a"]
    val, train = set(_lines(folder/f"{stem}_val.jsonl")), set(_lines(folder/f"{stem}.jsonl"))
    assert val and not (val & train)


def test_val_is_about_five_to_ten_percent():
    for stem, (_, _, n, n_val) in FILES.items():
        assert n_val == 0 or 0.04 <= n_val / n <= 0.11, stem


def test_held_out_sums_never_in_train(worlds):
    folder, _ = worlds["a"]
    eq = re.compile(r"^(?:What is )?(\d+) ([+-]) (\d+)")
    seen = {"train": 0, "val": 0}
    for stem, split in (("reason", "train"), ("rl", "train"), ("reason_val", "val"), ("rl_val", "val")):
        for rec in read_jsonl(folder/f"{stem}.jsonl", TINYWORLD_KINDS[stem]):
            m = eq.match(rec["conversations"][0]["content"])
            if rec["task"] in ("add", "sub") and m:
                assert held_out(f"{m[1]}{m[2]}{m[3]}") == (split == "val"), rec
                seen[split] += 1
    assert seen["train"] > 10 and seen["val"] > 0


def test_the_assistants_sums_are_the_one_digit_table(worlds):
    "SFT sums are one-digit, right, and asked in both files (a table, like the facts); pretraining pages ask them too."
    folder, _ = worlds["a"]
    eq = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")
    for stem in ("sft", "sft_val"):
        found = [m for rec in read_jsonl(folder/f"{stem}.jsonl", "sft") for t in rec["conversations"]
                 if t["role"] == "assistant" and (m := eq.fullmatch(t["content"]))]
        assert found, stem
        for m in found:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a < 10 and b < 10 and c == (a + b if op == "+" else a - b) >= 0
    pages = [r["text"] for r in read_jsonl(folder/"pretrain.jsonl", "pretrain") if "\nA: " in r["text"] or "\n答：" in r["text"]]
    assert any(re.search(r"Q: What is \d \+ \d\?\nA: \d \+ \d = \d+\.", p) for p in pages)


# ---------------------------------------------------------------- reasoning traces are right
EQ_RE = re.compile(r"(\d+(?: [+-] \d+)+) = (\d+)")
CMP_RE = re.compile(r"(\d+) ([<>]) (\d+)")


def _check_problem(rec):
    q, answer = rec["conversations"][0]["content"], rec["answer"]
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if rec["task"] in ("add", "sub"):
        a, b = nums[:2]
        assert int(answer) == (a + b if rec["task"] == "add" else a - b)
    elif rec["task"] == "sort":
        assert answer == ", ".join(map(str, sorted(nums)))
    elif rec["task"] == "compare":
        larger = "larger" in q or "更大" in q
        assert int(answer) == (max(nums) if larger else min(nums))
    elif rec["task"] == "word":
        assert int(answer) >= 0


def test_reason_traces_are_correct(worlds):
    folder, _ = worlds["a"]
    n_eq = n_rec = 0
    for stem in ("reason", "reason_val"):
        for rec in read_jsonl(folder/f"{stem}.jsonl", "reason"):
            trace, answer = THINK_RE.fullmatch(rec["conversations"][-1]["content"]).groups()
            assert answer == rec["answer"]
            for lhs, rhs in EQ_RE.findall(trace):
                assert eval(lhs) == int(rhs), (lhs, rhs, rec)
                n_eq += 1
            for x, op, y in CMP_RE.findall(trace):
                assert (int(x) > int(y)) == (op == ">"), rec
            assert isinstance(rec["difficulty"], int) and 1 <= rec["difficulty"] <= 3
            _check_problem(rec)
            n_rec += 1
    assert n_rec > 50 and n_eq > n_rec


def test_reason_ladder_covers_every_task_and_difficulty(worlds):
    recs = list(read_jsonl(worlds["a"][0]/"reason.jsonl", "reason"))
    assert {(r["task"], r["difficulty"]) for r in recs} == {(t, d) for t in ("add", "sub", "count", "compare", "sort", "word")
                                                            for d in (1, 2, 3)}


def test_rl_records_are_prompts_with_ground_truth(worlds):
    for rec in read_jsonl(worlds["a"][0]/"rl.jsonl", "rl"):
        assert rec["conversations"][-1] == {"role": "assistant", "content": ""}
        _check_problem(rec)


def test_count_answer_matches_list(worlds):
    for rec in read_jsonl(worlds["a"][0]/"reason.jsonl", "reason"):
        q = rec["conversations"][0]["content"]
        if rec["task"] == "count" and q.startswith("Here"):
            listed, plural = re.match(r"Here is a list of animals: (.*)\. How many (\w+) are there\?", q).groups()
            items = listed.split(", ")
            assert sum(plural.startswith(i) or plural == i for i in items) == int(rec["answer"])


# ---------------------------------------------------------------- language: measure words, consistent stories
MEASURE = {"猫头鹰": "只", "猫": "只", "狗": "条", "鱼": "条", "牛": "头", "马": "匹", "鸟": "只", "熊": "头",
           "猪": "头", "大象": "头", "蛇": "条", "书": "本", "伞": "把", "花": "朵"}
MW_RE = re.compile(r"[一二两三四五六七八九十几每这那]([只条头匹个本把朵棵座张])((?:[\u4e00-\u9fff]{1,2}色的)?)(" +
                   "|".join(sorted(MEASURE, key=len, reverse=True)) + ")")


def test_chinese_measure_words(worlds):
    folder, _ = worlds["a"]
    found = {}
    for stem in ("pretrain", "sft", "reason"):
        for m in MW_RE.finditer((folder/f"{stem}.jsonl").read_text(encoding="utf-8")):
            measure, _, noun = m.groups()
            assert measure == MEASURE[noun], m.group(0)
            found[noun] = found.get(noun, 0) + 1
    assert {"猫", "狗", "鱼", "牛", "马"} <= set(found), found


@pytest.mark.parametrize("stem", ["pretrain", "sft", "dpo", "reason", "identity"])
def test_english_articles(worlds, stem):
    text = (worlds["a"][0]/f"{stem}.jsonl").read_text(encoding="utf-8")
    bad = re.search(r".{0,30}\b[Aa] [aeiou].{0,30}", text) # "a orange fish" should be "an orange fish"
    assert bad is None, bad.group(0)


def test_english_descriptions_match_the_world(worlds):
    folder, _ = worlds["a"]
    pats = [re.compile(r"\ban? (\w+) (\w+) (?:named|called) ([A-Z]\w+)"), re.compile(r"\b([A-Z]\w+) (?:was|is) an? (\w+) (\w+)\b")]
    checked = 0
    for stem in ("pretrain", "sft"):
        text = (folder/f"{stem}.jsonl").read_text(encoding="utf-8")
        for m in pats[0].finditer(text):
            colour, animal, name = m.groups()
            assert (animal, colour) == CREATURES[name][1:3], m.group(0)
            checked += 1
        for m in pats[1].finditer(text):
            name, colour, animal = m.groups()
            if name in CREATURES:
                assert (animal, colour) == CREATURES[name][1:3], m.group(0)
                checked += 1
    assert checked > 20


def test_number_words():
    assert [zh_num(n) for n in (0, 10, 11, 20, 101, 110, 999, 1010)] == ["零", "十", "十一", "二十", "一百零一", "一百一十", "九百九十九", "一千零一十"]
    assert [en_num(n) for n in (0, 13, 21, 100, 907)] == ["zero", "thirteen", "twenty-one", "one hundred", "nine hundred seven"]


def test_identity_sets_disagree_on_the_name(worlds):
    folder, _ = worlds["a"]
    lora = (folder/"identity.jsonl").read_text(encoding="utf-8")
    assert ("Lumi" in lora or "小光" in lora) and "MiniMind" not in lora
    sft = [r for r in read_jsonl(folder/"sft.jsonl", "sft") if r["conversations"][-1]["content"].startswith(("I am MiniMind", "我是MiniMind"))]
    assert sft


# ---------------------------------------------------------------- validation errors name file and line
GOOD = {"pretrain": {"text": "hello"},
        "sft": {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "dpo": {"chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
                "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}]},
        "reason": {"conversations": [{"role": "user", "content": "1+1?"},
                                     {"role": "assistant", "content": "<think>\n1 + 1 = 2\n</think>\n<answer>\n2\n</answer>"}]},
        "rl": {"conversations": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": ""}], "answer": "2"}}

BAD = [ # (kind, bad line, words the message must contain)
    ("sft", '{"conversations": [', "bad JSON"),
    ("sft", '{"messages": []}', "conversations: missing"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}),
     "conversations[1].role: expected one of system/user/assistant/tool, got 'bot'"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}),
     "conversations[1].content: empty"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                                          {"role": "assistant", "content": "y"}]}), "conversations[1].role: a system message may only come first"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "hi"}]}), "needs at least one assistant turn"),
    ("sft", "", "blank line"),
    ("sft", "   ", "blank line"),
    ("sft", "[1, 2]", "expected a JSON object, got list"),
    ("pretrain", '{"text": 5}', "text: expected a string, got int"),
    ("pretrain", '{"text": ""}', "text: empty"),
    ("dpo", json.dumps({"chosen": GOOD["dpo"]["chosen"],
                        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}),
     "rejected[0]: differs from chosen[0]"),
    ("dpo", json.dumps({"chosen": GOOD["dpo"]["chosen"]}), "rejected: missing"),
    ("dpo", json.dumps({"chosen": GOOD["dpo"]["chosen"], "rejected": GOOD["dpo"]["chosen"][:1]}),
     "rejected: needs at least one assistant turn"),
    ("dpo", json.dumps({"chosen": GOOD["dpo"]["chosen"], "rejected": GOOD["dpo"]["chosen"] + [{"role": "user", "content": "?"}]}),
     "rejected[2].role: the last turn must be the assistant's"),
    ("reason", json.dumps(GOOD["sft"]), "conversations[1].content: expected <think>"),
    ("rl", json.dumps({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
     "the last turn must be the assistant placeholder"),
    ("rl", json.dumps({"conversations": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}),
     "conversations[0].content: empty"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "1+2?"}, {"role": "tool", "content": "3"},
                                          {"role": "assistant", "content": "3"}]}),
     "conversations[1].role: a tool result must follow an assistant turn's tool_calls"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": "[{"}]}),
     "conversations[1].tool_calls: not valid JSON"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "1+2?"},
                                          {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]}),
     "conversations[1].tool_calls[0]: expected an object with a function name"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "1+2?", "tool_calls": [{"name": "add"}]},
                                          {"role": "assistant", "content": "3"}]}),
     "conversations[0].tool_calls: only assistant messages make tool calls"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "1+2?", "tools": "[]x"}, {"role": "assistant", "content": "3"}]}),
     "conversations[0].tools: only the system message lists tools"),
    ("sft", json.dumps({"conversations": [{"role": "system", "content": "s", "tools": {"name": "add"}}, {"role": "user", "content": "1+2?"},
                                          {"role": "assistant", "content": "3"}]}),
     "conversations[0].tools: expected a list of tool objects"),
    ("sft", json.dumps({"conversations": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3", "reasoning_content": 5}]}),
     "conversations[1].reasoning_content: expected a string, got int"),
]


def _file(tmp_path, kind, lines, name="data.jsonl"):
    path = tmp_path/name
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_good_records_pass(kind):
    validate_record(GOOD[kind], kind)


@pytest.mark.parametrize("kind,bad,words", BAD)
def test_bad_line_names_file_and_line(tmp_path, kind, bad, words):
    good = json.dumps(GOOD[kind])
    path = _file(tmp_path, kind, [good, good, bad, good])
    with pytest.raises(DataError) as info:
        validate_file(path, kind)
    e = info.value
    assert (e.path, e.line) == (path, 3)
    assert words in e.msg and str(e) == f"{path}:3: {e.msg}"


def test_invalid_utf8(tmp_path):
    path = _file(tmp_path, "pretrain", [json.dumps(GOOD["pretrain"]).encode(), b'{"text": "\xff"}'])
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        validate_file(path, "pretrain")


def test_rl_is_not_sft():
    with pytest.raises(ValueError, match="content: empty"): validate_record(GOOD["rl"], "sft")
    validate_record({**GOOD["sft"], "tools": "[]", "answer": "x"}, "sft") # extra keys are fine


def test_unknown_kind_and_policy(tmp_path):
    path = _file(tmp_path, "sft", [json.dumps(GOOD["sft"])])
    with pytest.raises(ValueError, match="unknown kind"): read_jsonl(path, "chat")
    with pytest.raises(ValueError, match="on_error"): read_jsonl(path, "sft", on_error="ignore")


def test_dataerror_pickles():
    e = pickle.loads(pickle.dumps(DataError("f.jsonl", 7, "blank line")))
    assert (e.path, e.line, e.msg, str(e)) == ("f.jsonl", 7, "blank line", "f.jsonl:7: blank line")


# ---------------------------------------------------------------- skip policy counts exactly
def test_skip_policy_counts_and_reports(tmp_path):
    good = json.dumps(GOOD["sft"])
    bad = [b for k, b, _ in BAD if k == "sft"]
    lines = [good, *bad[:3], good, *bad[3:], good]
    path = _file(tmp_path, "sft", lines)
    reader = read_jsonl(path, "sft", on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = list(reader)
    assert len(recs) == reader.records == 3
    assert reader.skipped == len(bad) == len(lines) - 3
    assert [e.line for e in reader.errors] == [2, 3, 4, 6, 7] # the first five bad lines, in order
    assert len(caught) == 1 and f"skipped {len(bad)} bad line(s)" in str(caught[0].message)
    assert f"{path}:2:" in str(caught[0].message)


def test_no_warning_when_clean(tmp_path):
    path = _file(tmp_path, "sft", [json.dumps(GOOD["sft"])] * 3)
    reader = read_jsonl(path, "sft", on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(reader)) == 3 and reader.skipped == 0


def test_reader_streams(tmp_path):
    "The reader yields the first record before it sees the bad last line."
    path = _file(tmp_path, "sft", [json.dumps(GOOD["sft"]), "{oops"])
    reader = read_jsonl(path, "sft")
    assert next(reader) == GOOD["sft"]
    with pytest.raises(DataError, match=":2: bad JSON"): next(reader)


# ---------------------------------------------------------------- the cache
def test_tinyworld_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path/"cache"))
    d = tinyworld(seed=3, scale=0.02)
    assert d.parent == tmp_path/"cache" and "seed3" in d.name and "scale0.02" in d.name
    stamp = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert tinyworld(seed=3, scale=0.02) == d # reused, not regenerated
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamp
    assert [p.name for p in (tmp_path/"cache").iterdir()] == [d.name] # no temp folder left behind
    assert _digests(d) == _digests(make_tinyworld(tmp_path/"again", seed=3, scale=0.02)["sft"].parent)

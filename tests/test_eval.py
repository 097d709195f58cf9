"Evaluation: token scoring, perplexity masks, the TinyWorld multiple-choice set, chance vs trained, bad files."
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from minimind.chat import load_chat_model
from minimind.data import DataError, write_jsonl
from minimind.world import FACTS, say_fact
from minimind.eval import (LETTERS, choice_accuracy, choice_scores, parse_choice_record, perplexity, read_choices,
                           reasoning_eval, scored_sequences, tinyworld_choices, tinyworld_choices_file, token_logprobs)
from minimind.model import MiniMindForCausalLM
from minimind.sft import tokenize_conversations
from minimind.runs import require
from minimind.pretrain import PRETRAIN

from conftest import run_cli


@pytest.fixture(scope="module")
def book():
    "The book's pretrained model at its real size (about a minute to train on first use; cached afterwards)."
    return load_chat_model(require(PRETRAIN) / "model")


# ---- scoring ---------------------------------------------------------------------------------------------------

def test_token_logprobs_in_padded_batches_equal_one_sequence_at_a_time(quick):
    m, tok = quick.model, quick.tokenizer
    seqs = [tok.encode(t) for t in ["Mimi", "Mimi is a white cat from Maple Town.", "咪咪住在枫叶镇。", "One day, Pip went to visit Olly."]]
    got = token_logprobs(m, seqs, max_batch_tokens=30)  # forces several batches of different widths
    for s, g in zip(seqs, got):
        with torch.no_grad(): logits = m(torch.tensor([s])).logits[0, :-1]
        torch.testing.assert_close(g, -F.cross_entropy(logits, torch.tensor(s[1:]), reduction="none"), atol=1e-4, rtol=0)


def test_text_perplexity_scores_every_token_between_separators(quick, tmp_path):
    m, tok = quick.model, quick.tokenizer
    texts = ["Mimi is a white cat.", "Pip likes to sing. Pip lives in Reed Village."]
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    r = perplexity(m, tok, f)
    total, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([0, *tok.encode(t), 0])
        with torch.no_grad(): total += F.cross_entropy(m(ids[None]).logits[0, :-1], ids[1:], reduction="sum").item()
        n += len(ids) - 1
    assert r["tokens"] == n and r["scored"] == "text"
    assert r["ppl"] == pytest.approx(torch.tensor(total / n).exp().item(), rel=1e-4)


def test_long_documents_are_windowed_with_every_token_scored_once(quick, tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", [{"text": "Mimi is a white cat. " * 40}])
    whole, _ = scored_sequences(f, quick.tokenizer, 10_000)
    cut, _ = scored_sequences(f, quick.tokenizer, 50)
    assert len(whole) == 1 and len(cut) > 3 and all(len(ids) <= 50 for ids, _ in cut)
    assert sum(sum(s[1:]) for _, s in cut) == sum(whole[0][1][1:])
    assert perplexity(quick.model, quick.tokenizer, f, max_len=50)["tokens"] == sum(whole[0][1][1:])


def test_conversation_perplexity_scores_only_the_assistant(quick, tmp_path):
    m, tok = quick.model, quick.tokenizer
    conv = lambda q: [{"role": "user", "content": q}, {"role": "assistant", "content": "Mimi is white."},
                      {"role": "user", "content": "And Pip?"}, {"role": "assistant", "content": "Pip is brown."}]
    a = perplexity(m, tok, write_jsonl(tmp_path / "a.jsonl", [{"conversations": conv("What colour is Mimi?")}]))
    b = perplexity(m, tok, write_jsonl(tmp_path / "b.jsonl", [{"conversations": conv("Tell me about Mimi, please, now.")}]))
    ids, mask = tokenize_conversations(tok, [conv("What colour is Mimi?")])[0]
    assert a["scored"] == "assistant" and a["tokens"] == b["tokens"] == int(mask.sum())  # the user's words are not scored
    assert a["tokens"] == len(tok.encode("Mimi is white.<|im_end|>")) + len(tok.encode("Pip is brown.<|im_end|>"))
    ids = torch.tensor(ids)
    with torch.no_grad(): lp = -F.cross_entropy(m(ids[None]).logits[0, :-1], ids[1:], reduction="none")
    assert a["ce"] == pytest.approx(-lp[torch.tensor(mask[1:])].mean().item(), rel=1e-4)


# ---- the TinyWorld multiple-choice set ---------------------------------------------------------------------------

def test_tinyworld_choices_are_deterministic_and_right(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", tinyworld_choices(seed=3))
    b = write_jsonl(tmp_path / "b.jsonl", tinyworld_choices(seed=3))
    c = write_jsonl(tmp_path / "c.jsonl", tinyworld_choices(seed=4))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    recs = tinyworld_choices(seed=3)
    assert len(recs) == 2 * len(FACTS)
    letters = []
    for rec, (fact, lang) in zip(recs, [(f, l) for f in FACTS for l in ("en", "zh")]):
        opts = [rec[L] for L in LETTERS if L in rec]
        assert opts[LETTERS.index(rec["answer"])] == say_fact(fact, lang, None, template=0)  # the right option is the fact
        assert len(set(opts)) == len(opts) >= 3
        letters.append(rec["answer"])
    assert min(letters.count(L) for L in "ABCD") > len(recs) / 8  # the right answer is not always in one place
    assert tinyworld_choices_file().read_bytes() == write_jsonl(tmp_path / "d.jsonl", tinyworld_choices()).read_bytes()


def test_untrained_is_at_chance_and_the_book_model_is_well_above(book):
    recs = read_choices(tinyworld_choices_file())
    torch.manual_seed(0)
    untrained = MiniMindForCausalLM(book.model.config).eval()
    u = choice_accuracy(untrained, book.tokenizer, recs, "text")
    t = choice_accuracy(book.model, book.tokenizer, recs, "text")
    assert abs(u["accuracy"] - u["chance"]) < 0.1
    assert t["accuracy"] > u["chance"] + 0.2
    assert u["accuracy_sum"] > u["chance"] + 0.08  # the length trap: summed log-probs favour the tokenizer's merged truths


def test_letter_method_scores_one_letter_per_option(quick):
    rec = parse_choice_record({"question": "1+1?", "A": "1", "B": "2", "C": "3", "answer": "B"})
    (scores, lengths), = choice_scores(quick.model, quick.tokenizer, [rec], "chat", "letter")
    assert lengths == [1, 1, 1] and len(set(scores)) == 3


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,msg", [
    ('{"question": "q", "A": "a", "B": "b"', "bad JSON"),
    ('["q", "a"]', "expected a JSON object"),
    ('{"A": "a", "B": "b", "answer": "A"}', "question: expected a non-empty string"),
    ('{"question": "q", "A": "a", "answer": "A"}', "choices: expected options A, B"),
    ('{"question": "q", "A": "a", "B": "", "answer": "A"}', "choices: expected options A, B"),
    ('{"question": "q", "A": "a", "B": "b", "answer": "C"}', "answer: expected a letter A-B"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "answer: expected a letter A-B"),
    ('', "blank line"),
])
def test_bad_choice_lines_name_the_file_and_line(tmp_path, line, msg):
    f = tmp_path / "mc.jsonl"
    f.write_text('{"question": "q", "A": "a", "B": "b", "answer": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e: read_choices(f)
    assert str(e.value).startswith(f"{f}:2: {msg}")


def test_perplexity_refuses_files_it_cannot_score(quick, tmp_path):
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                              "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}])
    with pytest.raises(DataError, match="perplexity needs"): perplexity(quick.model, quick.tokenizer, dpo)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError) as e: perplexity(quick.model, quick.tokenizer, bad)
    assert str(e.value).startswith(f"{bad}:2: text: expected a string")


def test_reasoning_files_need_their_answers(quick, tmp_path):
    conv = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": ""}]
    f = write_jsonl(tmp_path / "rl.jsonl", [{"conversations": conv, "answer": "2"}, {"conversations": conv}])
    with pytest.raises(DataError) as e: reasoning_eval(quick.model, quick.tokenizer, f)
    assert str(e.value).startswith(f"{f}:2: answer")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"conversations": conv, "answer": "2"}] * 3)
    r = reasoning_eval(quick.model, quick.tokenizer, ok, max_new_tokens=8)
    assert r["n"] == 3 and 0 <= r["accuracy"] <= 1 and r["format"] == 0


eval_cli = partial(run_cli, module="minimind.eval")


def test_command_line(quick, tmp_path):
    out = eval_cli("--model", quick.path, "--task", "choice", "--limit", "30", "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["format"] == "text"  # auto: a pretrained model reads questions as text
    rows = read_choices(tinyworld_choices_file(), 30)
    want = choice_accuracy(quick.model, quick.tokenizer, rows, "text")["accuracy"]
    assert r["choice acc"] == pytest.approx(want) and "| choice acc |" in out.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "A": "a", "B": "b", "answer": "Z"}\n', encoding="utf-8")
    out = eval_cli("--model", quick.path, "--task", "choice", "--data", bad)
    assert out.returncode == 1 and f"error: {bad}:1: answer" in out.stderr

"Chapter 05: chat formatting, assistant-only loss masks, packing, the `sft` stage."
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minimind.data import DataError, read_jsonl
from minimind.tinyworld import tinyworld
from minimind.engine import causal_lm_loss
from minimind.sft import (ASSISTANT_HEADER, IGNORE, ConversationTooLong, SFTDataset, gold_answers, graded_turns,
                          pack_best_fit, prompt_ids, sft_collate, sft_eval, shift_labels, story_requests,
                          tokenize_conversation, tokenize_conversations)
from minimind.tokenizer import MiniMindTokenizer

from conftest import micro

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def records(): return list(read_jsonl(tinyworld(seed=0, scale=0.1)/"sft.jsonl", "sft"))

@pytest.fixture(scope="module")
def packed(tok, records): return SFTDataset(records, tok, 512)

@pytest.fixture(scope="module")
def model(tok): return micro(vocab_size=len(tok)).eval()

def loss_of(model, x, y): # x, y: (T,) arrays -> scalar loss of one row
    return causal_lm_loss(model, {"input_ids": torch.as_tensor(x)[None], "labels": torch.as_tensor(y)[None]})[0]

def naive_mask(tok, ids): # the upstream rule, token by token: after each assistant header, through its <|im_end|>
    header, mask, i, inside = tok.encode(ASSISTANT_HEADER), np.zeros(len(ids), bool), 0, False
    while i < len(ids):
        if not inside and list(ids[i:i + len(header)]) == header: i, inside = i + len(header), True; continue
        if inside: mask[i], inside = True, ids[i] != tok.eos_id
        i += 1
    return mask

CONV = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am MiniMind."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}]


def test_mask_agrees_with_naive_reference(tok, records):
    for r, (ids, mask) in zip(records, tokenize_conversations(tok, [r["conversations"] for r in records])):
        assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == mask.shape
        assert ids.tolist() == tok.encode(tok.apply_chat_template(r["conversations"]))  # same ids as the whole text
        np.testing.assert_array_equal(mask, naive_mask(tok, ids))

def test_multi_turn_with_system_prompt(tok):
    ids, mask = tokenize_conversation(tok, CONV)
    assert tok.decode(ids[mask].tolist()) == "I am MiniMind.<|im_end|>2 + 3 = 5.<|im_end|>"
    assert "Answer briefly." in tok.decode(ids.tolist()) and "Answer briefly." not in tok.decode(ids[mask].tolist())
    assert int(np.diff(mask.astype(int)).clip(min=0).sum()) == 2  # two trained spans
    ids, mask = tokenize_conversation(tok, CONV[1:])  # no system turn: the template's default one, untrained
    assert tok.decode(ids[:mask.argmax()].tolist()).startswith("<|im_start|>system\nYou are a helpful assistant")
    assert tok.decode(ids[mask].tolist()) == "I am MiniMind.<|im_end|>2 + 3 = 5.<|im_end|>"

def test_prompt_ids_are_the_training_prefix(tok):
    ids, mask = tokenize_conversation(tok, CONV)
    starts = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
    assert prompt_ids(tok, CONV) == ids[:starts[-1]].tolist()
    assert prompt_ids(tok, CONV[:4]) == ids[:starts[-1]].tolist()

def test_max_len_raises(tok):
    n = len(tokenize_conversation(tok, CONV)[0])
    tokenize_conversation(tok, CONV, max_len=n)
    with pytest.raises(ConversationTooLong, match=f"{n} tokens"): tokenize_conversation(tok, CONV, max_len=n - 1)


@FEW
@given(st.integers(0, 10**6), st.data())
def test_untrained_targets_do_not_change_the_loss(tok, records, model, seed, data):
    ids, mask = tokenize_conversation(tok, records[seed % len(records)]["conversations"])
    rng = np.random.default_rng(seed)
    x, y = shift_labels(ids, mask)
    other = np.where(mask, ids, rng.integers(3, len(tok), len(ids)))  # every untrained token replaced as a target
    _, y2 = shift_labels(other, mask)
    torch.testing.assert_close(loss_of(model, x, y), loss_of(model, x, y2), rtol=0, atol=0)
    t = data.draw(st.sampled_from(np.flatnonzero(mask[1:]).tolist()))  # a trained target does change it
    y3 = y.copy(); y3[t] = (y[t] + 1) % len(tok)
    assert loss_of(model, x, y3) != loss_of(model, x, y)

@FEW
@given(st.integers(0, 10**6))
def test_tokens_after_the_last_trained_target_do_not_change_the_loss(tok, packed, model, seed):
    item = packed[seed % len(packed)]
    x, y = item["input_ids"], item["labels"]
    last = int((y != IGNORE).nonzero()[-1])
    x2 = x.clone(); x2[last + 1:] = torch.randint(0, len(tok), (len(x) - last - 1,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss_of(model, x, y), loss_of(model, x2, y))
    x3 = x.clone(); x3[last] = (x[last] + 1) % len(tok)  # the input of the last trained target does
    assert not torch.equal(loss_of(model, x3, y), loss_of(model, x, y))

def test_collate_trims_without_changing_the_loss(tok, records, model):
    ds = SFTDataset(records[:60], tok, 512, pack=False)
    samples = [ds[i] for i in range(8)]
    full = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    cut = sft_collate(samples)
    assert cut["input_ids"].shape[1] < 512 and (cut["labels"][:, -1] != IGNORE).any()
    torch.testing.assert_close(causal_lm_loss(model, cut)[0], causal_lm_loss(model, full)[0])

def test_fully_masked_batch_gives_zero_loss_and_finite_grads(tok, packed):
    item = packed[0]
    batch = {"input_ids": item["input_ids"][None], "labels": torch.full_like(item["labels"], IGNORE)[None]}
    batch = sft_collate([{k: v[0] for k, v in batch.items()}])
    m = micro(vocab_size=len(tok))
    loss = causal_lm_loss(m, batch)[0]
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_packing_keeps_every_trained_token_once(tok, records, packed):
    padded = SFTDataset(records, tok, 512, pack=False)
    assert len(packed) < len(padded) == padded.stats["conversations"]
    labels = lambda ds: np.sort(np.concatenate([ds[i]["labels"].numpy() for i in range(len(ds))]))
    a, b = labels(packed), labels(padded)
    np.testing.assert_array_equal(a[a != IGNORE], b[b != IGNORE])
    assert packed.stats["real / slots"] > 0.9 > 0.5 > padded.stats["real / slots"]

@FEW
@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(50, 80))
def test_best_fit_is_a_partition_within_capacity(lengths, cap):
    rows = pack_best_fit(np.array(lengths), cap)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    assert len(rows) <= 2 * (sum(lengths) // cap + 1)  # any-fit packing fills rows at least half on average


def test_bad_jsonl_names_file_and_line(tok, tmp_path):
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = tmp_path/"bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"conversations": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: conversations\[0\]\.content: missing"): SFTDataset(bad, tok, 64)
    with pytest.raises(ValueError, match=r"record 1: conversations: needs at least one assistant turn"):
        SFTDataset([good, {"conversations": [{"role": "user", "content": "hi"}]}], tok, 64)

def test_too_long_conversations_are_never_cut_silently(tok, records, tmp_path):
    path = tmp_path/"sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:50]), encoding="utf-8")
    lengths = [len(ids) for ids, _ in tokenize_conversations(tok, [r["conversations"] for r in records[:50]])]
    seq_len = int(np.median(lengths))
    n_long, first = sum(l > seq_len + 1 for l in lengths), 1 + next(i for i, l in enumerate(lengths) if l > seq_len + 1)
    with pytest.raises(DataError, match=rf"sft\.jsonl:{first}: a conversation of \d+ tokens does not fit"): SFTDataset(path, tok, seq_len)
    with pytest.warns(UserWarning, match=f"skip {n_long} conversation"): ds = SFTDataset(path, tok, seq_len, too_long="skip")
    assert ds.stats["skipped"] == n_long and ds.stats["conversations"] == 50 - n_long
    with pytest.warns(UserWarning, match=f"truncate {n_long} conversation"): ds = SFTDataset(path, tok, seq_len, too_long="truncate")
    assert ds.stats["truncated"] == n_long and ds.stats["conversations"] == 50


def test_gold_answers(records):
    assert gold_answers("Where does Mimi live?", "Mimi lives in Maple Town.")[1] >= {"Mimi lives in Maple Town.", "Mimi's home is in Maple Town."}
    assert gold_answers("What is 12 + 5?", "12 + 5 = 17.") == ("sum", {"12 + 5 = 17."})
    assert gold_answers("Tell me a story about Pip.", "Once upon a time...") is None
    items = graded_turns(records)
    assert {k for _, k, _ in items} == {"fact", "sum", "identity"}
    assert all(p[-1]["role"] == "user" for p, _, _ in items)
    for prompt, kind, gold in items[:50]:  # the reference reply that follows the prompt is always accepted
        conv = next(r["conversations"] for r in records if r["conversations"][:len(prompt)] == prompt)
        assert conv[len(prompt)]["content"] in gold


def test_story_requests_name_their_hero_in_both_languages(records):
    found = story_requests(records)
    assert {p[-1]["content"] for p, _ in found} and all(p[-1]["role"] == "user" for p, _ in found)
    asked = story_requests([{"conversations": [{"role": "user", "content": "讲一个关于粉粉的故事。"}, {"role": "assistant", "content": "…"}]},
                            {"conversations": [{"role": "user", "content": "Can you tell me a story?"}, {"role": "assistant", "content": "…"}]}])
    assert [names for _, names in asked] == [("Pinky", "粉粉")]  # a request that names nobody is not graded


def test_story_hero_is_the_share_of_stories_that_name_it(tok, monkeypatch):
    import minimind.sft as sft
    recs = [{"conversations": [{"role": "user", "content": f"Tell me a story about {n}."}, {"role": "assistant", "content": "…"}]}
            for n in ("Mimi", "Pip", "Dot", "Max")]
    monkeypatch.setattr(sft, "generate_text", lambda m, t, prompts, *a, **k: ["Mimi and Pip went out." for _ in prompts])
    assert sft_eval(micro(vocab_size=len(tok)), tok, recs)["story hero"] == 0.5  # Mimi's and Pip's stories name them


def test_sft_stage_smoke(tmp_path, monkeypatch):
    "The `sft` stage end to end on a quick run folder: it trains, exports a model, and reports before -> after."
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from minimind.hub import load_model
    from minimind.sft import SFT_QUICK_ARGS
    from minimind.pretrain import PRETRAIN
    from minimind.runs import require
    from minimind.train import main
    run = tmp_path/"run"
    require(PRETRAIN, run, quick=True)
    main(["--run-dir", str(run), "sft", *SFT_QUICK_ARGS])
    done = json.loads((run/"sft"/"done.json").read_text())
    assert " -> " in done["numbers"]["val ce"] and " -> " in done["numbers"]["accuracy"]
    before, after = map(float, done["numbers"]["val ce"].split(" -> "))
    assert after < before
    load_model(run/"sft"/"model")
    MiniMindTokenizer.load(run/"sft"/"model")
    bad = tmp_path/"bad.jsonl"
    bad.write_text('{"conversations": []}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: conversations: expected a non-empty list"):
        main(["--run-dir", str(run), "sft", "--data", str(bad), "--out", str(tmp_path/"x"), *SFT_QUICK_ARGS])

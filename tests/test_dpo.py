"DPO: the loss and its masks, the frozen and the cached reference, pair tokenization, bad input, and the `dpo` stage."
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minimind.data import DataError
from minimind.tinyworld import tinyworld
from minimind.dpo import (DPO_QUICK_ARGS, DPODataset, DPOLoss, collate_pairs, dpo_loss, freeze, pairs, reference_logps,
                          sequence_logps)

from conftest import micro, run_cli

VOCAB = 512  # the micro preset's vocabulary

POLICY, REF = micro(0), freeze(micro(1))  # two different models: the loss is not the constant log 2

def random_batch(seed:int, B:int=2, T:int=16)->tuple[dict, torch.Tensor]:
    "2B rows (chosen, then rejected): a prompt, a reply of at least one token, then padding; and each reply's end."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2 * B, T), generator=g)
    targets = torch.randint(3, VOCAB, (2 * B, T), generator=g)
    start = torch.randint(0, T - 1, (2 * B,), generator=g)
    end = start + 1 + (torch.rand(2 * B, generator=g) * (T - 1 - start)).long()  # start < end <= T - 1
    pos = torch.arange(T)
    trained = (pos >= start[:, None]) & (pos < end[:, None])
    return {"input_ids": ids, "labels": targets.where(trained, -100)}, end

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_tokens_after_the_last_trained_position_do_not_change_the_loss(seed):
    batch, end = random_batch(seed)
    loss, _ = DPOLoss(REF)(POLICY, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(seed + 1)
    for r, e in enumerate(end.tolist()):  # position e - 1 is the last scored input; every later token is only context for nothing
        changed["input_ids"][r, e:] = torch.randint(3, VOCAB, (changed["input_ids"].shape[1] - e,), generator=g)
    assert torch.equal(DPOLoss(REF)(POLICY, changed)[0], loss)

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_summed_logps_count_only_trained_positions(seed):
    batch, _ = random_batch(seed)
    logp = POLICY(batch["input_ids"]).logits.float().log_softmax(-1)
    trained = batch["labels"] != -100
    expected = torch.stack([logp[r, trained[r]].gather(-1, batch["labels"][r, trained[r]][:, None]).sum()
                            for r in range(len(trained))])
    torch.testing.assert_close(sequence_logps(POLICY, batch["input_ids"], batch["labels"]), expected, atol=1e-4, rtol=0)

def test_a_fully_masked_batch_gives_a_finite_loss():
    batch, _ = random_batch(0)
    batch["labels"][:] = -100
    loss, metrics = DPOLoss(REF)(POLICY, batch)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(2)) < 1e-6
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in POLICY.parameters() if p.grad is not None)
    POLICY.zero_grad()

def test_the_loss_equals_the_closed_form():
    pc, pr = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -6.0]), torch.tensor([-3.0, -2.5])
    beta = 0.2
    expected = [math.log1p(math.exp(-beta * ((a - b) - (c - d)))) for a, b, c, d in zip(pc, pr, rc, rr)]  # -log sigmoid
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    assert abs(loss.item() - sum(expected) / 2) < 1e-6
    assert abs(m["margin"].item() - beta * ((0.5 + 1.0) + (-1.5 - 0.5)) / 2) < 1e-6
    assert m["reward_acc"].item() == 0.5
    assert abs(m["chosen_drift"].item() - (0.5 - 1.5) / 2) < 1e-6

def test_policy_equal_to_reference_gives_log_2():
    batch, _ = random_batch(3)
    loss, m = DPOLoss(freeze(micro(0)))(micro(0), batch)
    assert abs(loss.item() - math.log(2)) < 1e-6 and m["margin"].item() == 0 and m["reward_acc"].item() == 0

def test_gradient_flows_only_to_the_policy():
    policy, ref = micro(0), micro(1)
    batch, _ = random_batch(1)
    loss_fn = DPOLoss(ref)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    loss_fn(policy, batch)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "embed" not in n)
    assert all(p.grad is None for p in ref.parameters())

@pytest.fixture(scope="module")
def val_file():
    return tinyworld(seed=0, scale=0.1) / "dpo_val.jsonl"

def test_cached_reference_equals_live(tok, val_file):
    ds = DPODataset(val_file, tok)
    policy, ref = micro(0, vocab_size=len(tok)), micro(1, vocab_size=len(tok))
    live_batch = ds.collate([ds[i] for i in range(4)])
    live, _ = DPOLoss(ref)(policy, live_batch)
    cached = reference_logps(ref, ds, batch_size=3)
    assert cached.shape == (len(ds), 2) and torch.equal(ds.ref, cached)
    cached_batch = ds.collate([ds[i] for i in range(4)])
    assert torch.equal(cached_batch["input_ids"], live_batch["input_ids"])
    from_cache, _ = DPOLoss(None)(policy, cached_batch)
    assert abs(from_cache.item() - live.item()) < 1e-5
    ds.ref[:] = 0  # the loss really reads the cache
    assert abs(DPOLoss(None)(policy, ds.collate([ds[i] for i in range(4)]))[0].item() - live.item()) > 1e-3

def test_only_the_final_reply_is_trained(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
              {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "And 4 + 3?"}]
    rec = {"chosen": prompt + [{"role": "assistant", "content": "4 + 3 = 7."}],
           "rejected": prompt + [{"role": "assistant", "content": "4 + 3 = 8, I think."}]}
    item = DPODataset([rec], tok)[0]
    for side, reply in (("chosen", "4 + 3 = 7."), ("rejected", "4 + 3 = 8, I think.")):
        x, y = item[f"{side}_input_ids"], item[f"{side}_labels"]
        trained = (y != -100).nonzero().flatten()
        assert tok.decode(y[trained].tolist()) == reply + "<|im_end|>"
        assert trained.tolist() == list(range(int(trained[0]), len(y)))  # one run, to the end of the row
        assert torch.equal(x[1:], y[:-1].where(y[:-1] != -100, x[1:]))  # labels are the next inputs
        prompt_text = tok.decode(x[:int(trained[0]) + 1].tolist())
        assert prompt_text.endswith("<|im_start|>assistant\n") and "2 + 3 = 5." in prompt_text

def test_collate_puts_chosen_rows_then_rejected_rows(tok, val_file):
    ds = DPODataset(val_file, tok)
    items = [ds[i] for i in range(3)]
    b = collate_pairs(items, pad_id=tok.pad_id)
    assert b["input_ids"].shape[0] == 6 and pairs(b) == 3
    for r, (side, i) in enumerate([(s, i) for s in ("chosen", "rejected") for i in range(3)]):
        n = len(items[i][f"{side}_input_ids"])
        assert torch.equal(b["input_ids"][r, :n], items[i][f"{side}_input_ids"])
        assert (b["labels"][r, n:] == -100).all() and (b["input_ids"][r, n:] == tok.pad_id).all()

def test_bad_jsonl_names_file_and_line(tok, val_file, tmp_path):
    good = val_file.read_text(encoding="utf-8").splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + good + "\n" + '{"chosen": [' + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{bad}:3: bad JSON"): DPODataset(bad, tok)
    rec = json.loads(good)
    rec["rejected"][0]["content"] += " (changed)"
    bad.write_text(good + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{bad}:2: .*share the prompt"): DPODataset(bad, tok)

def test_too_long_pairs_raise_or_are_cut_and_counted(tok, val_file, tmp_path):
    n = sum(1 for _ in open(val_file, encoding="utf-8"))
    with pytest.raises(DataError, match=rf"^{val_file}:\d+: a side of \d+ tokens is longer than max_len=60"):
        DPODataset(val_file, tok, max_len=60)
    short = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
    long = {**short, "rejected": short["rejected"][:1] + [{"role": "assistant", "content": "la " * 200}]}
    f = tmp_path / "long.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (short, long, short)) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{f}:2: a side of"): DPODataset(f, tok, max_len=100)
    with pytest.warns(UserWarning, match="cut"):
        ds = DPODataset(val_file, tok, max_len=60, too_long="truncate")  # every prompt fits: replies are cut, none dropped
    assert ds.truncated and not ds.skipped and len(ds) == n
    assert max(len(s) for p in ds.seqs for s in p) <= 60
    with pytest.warns(UserWarning, match="skipped"), pytest.warns(UserWarning, match="cut"):
        ds = DPODataset(val_file, tok, max_len=45, too_long="truncate")  # some prompts alone fill 45 tokens
    assert ds.skipped and len(ds) + len(ds.skipped) == n
    assert all((ds[i][f"{k}_labels"] != -100).any() for i in range(len(ds)) for k in ("chosen", "rejected"))

def test_dpo_stage_runs_from_the_sft_stage(tmp_path):
    from minimind.sft import SFT
    from minimind.runs import require
    sft = require(SFT, tmp_path, quick=True)
    out = run_cli("dpo", "--run-dir", tmp_path, *DPO_QUICK_ARGS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "dpo" / "model" / "model.safetensors").exists()
    done = json.loads((tmp_path / "dpo" / "done.json").read_text())
    assert " -> " in done["numbers"]["val pref acc"] and done["numbers"]["steps"] == 4
    assert str(tmp_path / "dpo" / "model") in out.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": []}\n', encoding="utf-8")
    out = run_cli("dpo", "--run-dir", tmp_path, "--init", sft / "model", "--data", bad, "--out", tmp_path / "bad", *DPO_QUICK_ARGS)
    assert out.returncode != 0 and f"{bad}:1:" in out.stderr

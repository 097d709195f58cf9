"Behaviour of minimind.bench that the book relies on: the cached TinyWorld model and the command's help."
import pytest
import torch

import minimind.bench as bench
from minimind.tinyworld import tinyworld
from minimind.engine import Trainer
from minimind.generate import generate
from minimind.shards import PackedDataset, build_token_file

from conftest import micro

SMALL = dict(preset="micro", steps=3, batch=2, seq_len=16, verbose=False)


def test_tinyworld_lm_trains_once_with_the_engine_then_loads_its_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "cache_dir", lambda: tmp_path)  # only the model's run folder; data and tokenizer are shared
    fits, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fits.append((self.step, self.total)) or fit(self))
    first = bench.tinyworld_lm(**SMALL)
    assert fits == [(0, 3)] and list(tmp_path.glob("tinyworld-lm/*/metrics.jsonl"))  # the engine ran 3 steps, under cache_dir()
    again = bench.tinyworld_lm(**SMALL)
    assert fits == [(0, 3)]  # not trained again
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()): assert torch.equal(a, b), k
    assert not again.training and next(again.parameters()).device.type == "cpu"
    fresh = bench.MiniMindForCausalLM(again.config)
    assert not torch.equal(fresh.lm_head.weight, again.lm_head.weight)  # trained weights, not a new init


def test_token_windows_are_the_packed_rows_with_their_last_target():
    tok = bench.tinyworld_tok()
    path = tinyworld()/"pretrain_val.jsonl"
    w, rows = bench.token_windows(path, tok, 32, max_windows=5), PackedDataset(build_token_file(path, tok), 32)
    assert w.shape == (5, 33)
    for i in range(5):
        assert torch.equal(w[i, :-1], rows[i]["input_ids"]) and torch.equal(w[i, 1:], rows[i]["labels"])


@pytest.mark.parametrize("name", list(bench.SUBCOMMANDS))
def test_each_subcommand_has_a_description_and_help_for_every_flag(name, capsys):
    with pytest.raises(SystemExit): bench.main([name, "--help"])
    flat = lambda text: " ".join(text.split())  # argparse re-wraps the paragraph
    assert flat(bench.SUBCOMMANDS[name][1]) in flat(capsys.readouterr().out)
    parser = bench.argparse.ArgumentParser()
    bench.SUBCOMMANDS[name][2](parser)
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_tinyworld_lm_resumes_an_interrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "cache_dir", lambda: tmp_path)
    out, tok = tmp_path/"tinyworld-lm"/"micro-steps3-b2-t16-lr0.002-seed0", bench.tinyworld_tok()  # the folder of SMALL
    data = PackedDataset(build_token_file(tinyworld()/"pretrain.jsonl", tok), 16)
    model = bench.MiniMindForCausalLM(bench.MiniMindConfig.from_preset("micro", vocab_size=len(tok)))
    Trainer(model, data, bench.causal_lm_loss,  # a run of SMALL that stopped after step 2, with a checkpoint
            bench.TrainConfig(out_dir=out, steps=3, stop_at=2, micro_batch=2, lr=2e-3, progress=False)).fit()
    fits, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fits.append(self.step) or fit(self))
    bench.tinyworld_lm(**SMALL)
    assert fits == [2]  # continued from the checkpoint of step 2, not from scratch
    assert bench.load_checkpoint(bench.latest_checkpoint(out/"checkpoints"))["step"] == 3


def test_decode_report_stays_within_its_bound_and_compares_with_transformers(capsys):
    pytest.importorskip("transformers")
    r = bench.main(["decode", "--preset", "micro", "--batch", "1", "4", "--rounds", "2", "--new-tokens", "4"])
    assert [x["batch"] for x in r["rows"]] == [1, 4]
    assert all(0 < x["fp32_of_bound"] <= 1 for x in r["rows"]), r["rows"]  # the bound bounds the engine at every batch
    assert all(x["peer_tok_s"] > 0 and x["fp32_vs_peer"] > 0 for x in r["rows"])
    out = capsys.readouterr().out
    assert "| fp32 / transformers |" in out and f"transformers {r['peer']}" in out


def test_decode_report_without_the_peer_says_so(capsys):
    r = bench.main(["decode", "--preset", "micro", "--batch", "2", "--rounds", "1", "--new-tokens", "2", "--no-peer"])
    assert r["peer"] is None and "peer_tok_s" not in r["rows"][0]
    assert "transformers" not in capsys.readouterr().out.splitlines()[0]  # no column


def test_the_bound_times_the_products_a_step_does_both_ways():
    model = micro().eval()
    flat, stacked = bench.linear_weights(model), bench.stacked_weights(model)
    assert sum(w.numel() for w in flat) == sum(w.numel() for w in stacked)  # the same weights, fewer products
    x = torch.randn(3, model.config.hidden_size)
    attn = model.model.layers[0].self_attn
    qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    assert any(w.shape[0] == qkv.shape[-1] and torch.allclose(bench.linear(x, w), qkv, atol=1e-6) for w in stacked)
    with pytest.raises(ValueError, match="MoE"): bench.decode_report("tiny-moe")


def test_the_peer_is_timed_over_the_same_steps_as_ours(tmp_path):
    pytest.importorskip("transformers")
    model = micro().eval()
    hf, prompt, clock = bench.transformers_peer(model, tmp_path), bench.random_prompt(512, 2, 5), bench.StepClock()
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, do_sample=False, streamer=clock)
    assert len(clock.times) == 1 + 7  # the prompt, then one per step: times[1:] span the 6 steps after the first token
    assert torch.equal(out[:, 5:], generate(model, prompt, max_new_tokens=7, stop_ids=[])[:, 5:])  # the same model

"""Chapter 09: verifiable rewards, tag-weighted distillation, and the `reason` stage of the command line (then chapter
09b's `grpo` stage from its model)."""
import json
import shutil

import pytest
import torch

from minimind.reason import (answer_correct, extract_answer, final_answer, format_ok, partial_credit, read_problems,
                             reason_loss, reward, tag_weights)

from conftest import micro, run_cli

GOOD = "<think>\nOnes: 2 + 7 = 9. Write 9.\nSo 12 + 7 = 19.\n</think>\n<answer>\n19\n</answer>"

# --- rewards ---

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),                                            # right answer, right layout
    (GOOD.replace("19\n</answer>", "18\n</answer>"), 0.1),  # wrong answer, right layout
    (GOOD.replace("</think>", ""), 0.9),                    # malformed: no </think>, the answer still counts
    (GOOD.replace("<think>", "<think><think>"), 0.9),       # a tag twice
    ("12 + 7 = 19.", 0.0),                                  # no tags at all: no answer
    (GOOD.replace("<answer>\n19\n</answer>", "19"), 0.0),   # think but no answer block
    (GOOD + "\nAnything else?", 0.9),                       # extra text after the answer breaks the layout only
    ("Sure! " + GOOD, 0.9),                                 # ... and before the think block
    (GOOD + "<answer>19</answer>", 0.0),                    # two answer blocks are no answer
    (GOOD.replace("\n19\n", "  "), 0.0),                    # an empty answer
    ("<think>\n</think><answer>19</answer>", 0.9),          # an empty think block is not the layout
])
def test_reward_on_hand_written_completions(completion, expected):
    assert reward(completion, "19") == pytest.approx(expected)

def test_reward_parts():
    assert extract_answer(GOOD) == "19" and format_ok(GOOD)
    assert extract_answer("<answer> 3、5 ,7 </answer>") == "3、5 ,7"
    assert answer_correct("3、5 ,7", "3, 5, 7") and not answer_correct("3, 7, 5", "3, 5, 7") and not answer_correct(None, "3")
    assert not answer_correct("19.", "19")  # exact: the answer block holds the answer and nothing else
    assert reward(GOOD, "19", format_weight=0.0) == 1.0 and reward("<answer>19</answer>", "19", format_weight=0.0) == 1.0
    assert partial_credit("1259", "1269") == 0.75 and partial_credit("269", "1269") == 0.75
    assert partial_credit("3, 2, 1", "1, 2, 3") == pytest.approx(1 / 3) and partial_credit(None, "4") == 0
    wrong = GOOD.replace("19\n</answer>", "18\n</answer>")  # 18 for 19: one digit of two
    assert reward(wrong, "19", partial_weight=0.5) == pytest.approx(0.9 * 0.25 + 0.1)
    assert reward(GOOD, "19", partial_weight=0.5) == 1.0  # partial credit never exceeds a right answer

def test_final_answer_falls_back_to_the_last_numbers_without_tags():
    assert final_answer("6 - 2 = 4.", "4") == "4"
    assert final_answer("the order is 3, 5 and 7", "3, 5, 7") == "3, 5, 7"
    assert final_answer("<answer>5</answer> 4", "4") == "5"  # an answer block wins
    assert final_answer("<answer>5 and 4", "4") is None  # an unclosed block is no answer, not a fallback
    assert final_answer("no numbers", "4") is None

def test_read_problems_names_file_and_line(tmp_path):
    from minimind.data import DataError
    rec = {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": ""}], "answer": "2"}
    bad = tmp_path / "rl.jsonl"
    bad.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "answer": 2}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: answer"): read_problems(bad)
    bad.write_text(json.dumps({k: v for k, v in rec.items() if k != "answer"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:1: answer"): read_problems(bad)

# --- distillation ---

def test_tag_weighting_changes_only_tag_positions():
    model = micro()
    ids = torch.randint(11, 512, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[0, 4], labels[1, 7], labels[1, 2] = 3, 6, 4  # tag targets
    labels[:, :2] = -100
    w = tag_weights(labels, [3, 4, 5, 6], 10.0)
    assert torch.equal(w != 1, (labels == -100) | torch.isin(labels, torch.tensor([3, 4, 5, 6])))
    grads = {}
    for W in (1.0, 10.0):
        logits = model(ids).logits.detach().requires_grad_()
        class Fixed(torch.nn.Module):
            def forward(self, _, logits_to_keep): return type("O", (), {"logits": logits[logits_to_keep], "aux_loss": torch.zeros(())})()
        loss, metrics = reason_loss(Fixed(), {"input_ids": ids, "labels": labels}, [3, 4, 5, 6], W)
        loss.backward(); grads[W] = logits.grad
        if W == 1: assert metrics["ce"].item() == pytest.approx(loss.item())
        else: assert loss.item() > metrics["ce"].item()
    tag = torch.isin(labels, torch.tensor([3, 4, 5, 6]))
    torch.testing.assert_close(grads[10.0][~tag], grads[1.0][~tag], rtol=0, atol=0)
    torch.testing.assert_close(grads[10.0][tag], 10 * grads[1.0][tag])
    assert grads[1.0][tag].abs().sum() > 0

# --- the stages, through the command line ---

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    "A copy of the book's quick run folder (TinyWorld, tokenizer, pretrain, sft, dpo at their quick sizes)."
    from minimind.dpo import DPO
    from minimind.runs import require
    src = require(DPO, quick=True).parent
    run = tmp_path_factory.mktemp("quick") / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("checkpoints", ".lock", "reason", "grpo"))
    return run

def test_reason_then_grpo_stages_with_quick_args(quick_run):
    from minimind.grpo import GRPO_QUICK_ARGS
    from minimind.reason import REASON_QUICK_ARGS
    r = run_cli("--run-dir", quick_run, "reason", *REASON_QUICK_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy" in r.stdout and str(quick_run / "reason" / "model") in r.stdout
    assert (quick_run / "reason" / "model" / "model.safetensors").exists() and (quick_run / "reason" / "done.json").exists()
    numbers = json.loads((quick_run / "reason" / "done.json").read_text())["numbers"]
    assert " -> " in numbers["accuracy"] and numbers["steps"] == 4
    g = run_cli("--run-dir", quick_run, "grpo", *GRPO_QUICK_ARGS)
    assert g.returncode == 0, g.stderr[-3000:]
    assert f"from {quick_run / 'reason' / 'model'}" in g.stdout  # grpo starts from the reason stage's model
    assert (quick_run / "grpo" / "model" / "model.safetensors").exists()
    numbers = json.loads((quick_run / "grpo" / "done.json").read_text())["numbers"]
    assert " -> " in numbers["accuracy"] and " -> " in numbers["reward"] and numbers["rounds"] == 2
    rounds = [json.loads(l) for l in (quick_run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(k in rounds[0] for k in ("reward", "kl", "clip_frac", "length"))

def test_grpo_bad_problem_file_names_file_and_line(quick_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rec = {"conversations": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": ""}], "answer": "2"}
    bad.write_text(json.dumps(rec) + "\n" + json.dumps({"conversations": rec["conversations"]}) + "\n", encoding="utf-8")
    out = run_cli("--run-dir", quick_run, "grpo", "--init", quick_run / "pretrain" / "model", "--data", bad,
                  "--out", tmp_path / "out", "--steps", "1")
    assert out.returncode != 0 and f"{bad}:2: answer" in out.stderr

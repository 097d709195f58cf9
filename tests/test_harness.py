"lm-evaluation-harness on our Hugging Face export scores TinyWorld's multiple choice as `python -m minimind.eval` does."
import pytest
import torch

from minimind.eval import choice_scores, main as eval_main, parse_choice_record, read_choices, tinyworld_choices, token_logprobs
from minimind.harness import choice_task_yaml, harness_choice, harness_command, write_choice_task
from minimind.hub import export_hf

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def records():
    "32 TinyWorld questions, English and Chinese, with four or three options."
    return [parse_choice_record(r) for r in tinyworld_choices()][:32]


@pytest.fixture(scope="module")
def exported(quick, tmp_path_factory):
    "The book's quick pretrained model, written by `export_hf` (Qwen3 layout) with its tokenizer."
    return export_hf(quick.model, tmp_path_factory.mktemp("hf"), quick.tokenizer)


def test_task_files_round_trip(tmp_path, records):
    task = write_choice_task(records, tmp_path/"tasks", name="tw")
    assert task.name == "tw.yaml" and read_choices(task.with_suffix(".jsonl")) == records  # our reader reads the harness's file
    text = task.read_text()
    assert text == choice_task_yaml("tw", task.with_suffix(".jsonl"))
    assert 'target_delimiter: "\\n"' in text and "output_type: multiple_choice" in text


@pytest.mark.parametrize("chat", [False, True])
def test_harness_agrees_with_minimind_eval(tmp_path, monkeypatch, quick, exported, records, chat):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = write_choice_task(records, tmp_path/"tasks")
    h = harness_choice(exported, task, chat=chat)
    assert h["n"] == len(records) and [len(ll) for ll in h["loglikelihoods"]] == [len(r["choices"]) for r in records]
    fmt = "chat" if chat else "text"
    ours = eval_main(["--model", str(exported), "--task", "choice", "--data", str(task.with_suffix(".jsonl")), "--format", fmt])
    assert abs(h["acc"] - ours["choice acc (sum)"]) <= 0.005  # both pick the option with the largest summed log-likelihood

    # item by item: the harness scores the context's final newline too, the same term for every option of a question
    tok, model = quick.tokenizer, quick.model
    ctx = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=True) if chat
           else tok.encode(r["question"] + "\n") for r in records]
    newline = [float(lp[-1]) for lp in token_logprobs(model, ctx)]
    for (sums, _), nl, theirs, req, r in zip(choice_scores(model, tok, records, fmt), newline, h["loglikelihoods"], h["requests"], records):
        assert [(c + cont).endswith("\n" + o) for (c, cont), o in zip(req, r["choices"])] == [True] * len(sums)
        assert max(abs(t - (s + nl)) for s, t in zip(sums, theirs)) < 1e-4
        assert max(theirs) - min(theirs) > 1e-3  # the options differ: the agreement is not between constants


def test_command_line_names_the_same_run(tmp_path):
    cmd = harness_command(tmp_path/"model", tmp_path/"tasks"/"tw.yaml", chat=True)
    assert cmd[:3] == ["lm_eval", "--model", "hf"] and cmd[cmd.index("--tasks") + 1] == "tw"
    assert cmd[cmd.index("--include_path") + 1] == str(tmp_path/"tasks") and "--apply_chat_template" in cmd


def test_not_a_model_folder(tmp_path, records):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        harness_choice(tmp_path, write_choice_task(records[:2], tmp_path/"tasks"))

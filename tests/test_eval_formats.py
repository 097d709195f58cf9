"""Public benchmarks in their published layouts: each reader on a tiny file of that layout, scored against a hand
computation of lm-evaluation-harness's `acc` and `acc_norm`; GSM8K's answer extraction; bad layouts; the command line."""
import json

import pytest
import torch

from conftest import run_cli, sharp_micro
from minimind.data import DataError, write_jsonl
from minimind.eval import (benchmark_eval, benchmark_files, gsm8k_extract, gsm8k_normalize, main, read_benchmark)
from minimind.hub import export_hf


@pytest.fixture(scope="module")
def model(tok):
    "A random model with clearly different log-probabilities for different tokens, sized for the small tokenizer."
    return sharp_micro(0, vocab_size=len(tok))


def option_logprob(model, tok, ctx:str, option:str)->float:
    "log p(' ' + option | ctx) as lm-eval computes it: the option's tokens are those encode(ctx + ' ' + option) has beyond encode(ctx)."
    whole, n = tok.encode(ctx + " " + option), len(tok.encode(ctx))
    with torch.no_grad(): lp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(lp[t - 1, whole[t]].item() for t in range(n, len(whole)))


def hand_scores(model, tok, items:list[tuple[str, list[str], int]])->tuple[float, float]:
    "acc (argmax of the summed log-probs) and acc_norm (argmax of log-prob / characters), over (context, options, answer) items."
    acc = norm = 0
    for ctx, options, gold in items:
        lls = [option_logprob(model, tok, ctx, o) for o in options]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == gold
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(options[i])) == gold
    return acc / len(items), norm / len(items)


def write_csv(path, text:str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_acc_and_acc_norm_disagree_on_a_short_and_a_long_option(model, tok):
    "The items below rely on it: by the sum the short option wins, per character the long one (else the test proves nothing)."
    short, long = "no", "a white cat who lives in Maple Town and likes fish"
    lls = [option_logprob(model, tok, "Question: Who is Mimi?\nAnswer:", o) for o in (short, long)]
    assert lls[0] > lls[1] and lls[0] / len(short) < lls[1] / len(long)


# ---- multiple choice, one layout at a time --------------------------------------------------------------------------

def test_ceval_val_folder_with_dev_shots(model, tok, tmp_path):
    write_csv(tmp_path / "ceval" / "val" / "computer_network_val.csv",
              'id,question,A,B,C,D,answer\n0,"咪咪住在哪个地方？",芦苇村,枫叶镇,松林村,云城,B\n'
              '1,"第一行\n第二行",a,"b, c",c,d,D\n2,1+1=?,1,2,3,4,B\n')
    write_csv(tmp_path / "ceval" / "dev" / "computer_network_dev.csv", "id,question,A,B,C,D,answer,explanation\n0,2+2=?,3,4,5,6,B,因为\n")
    write_csv(tmp_path / "ceval" / "test" / "computer_network_test.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n")  # not scored: no answers
    r = benchmark_eval(model, tok, "ceval", tmp_path / "ceval", fewshot=1)
    head = "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n2+2=?\nA. 3\nB. 4\nC. 5\nD. 6\n答案： B\n\n"
    items = [(head + "咪咪住在哪个地方？\nA. 芦苇村\nB. 枫叶镇\nC. 松林村\nD. 云城\n答案：", list("ABCD"), 1),
             (head + "第一行\n第二行\nA. a\nB. b, c\nC. c\nD. d\n答案：", list("ABCD"), 3),
             (head + "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：", list("ABCD"), 1)]
    acc, norm = hand_scores(model, tok, items)
    assert r["n"] == 3 and list(r["subjects"]) == ["computer_network"] and r["chance"] == 0.25
    assert r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(norm) == pytest.approx(acc)  # one-letter options


def test_cmmlu_test_folder_by_subject(model, tok, tmp_path):
    write_csv(tmp_path / "cmmlu" / "test" / "agronomy.csv", ",Question,A,B,C,D,Answer\n0,牛的发情周期平均为,16天,21天,28天,19天,B\n"
                                                             "1,羊肉哪里好,胸,肩,后腿,小腿,C\n")
    write_csv(tmp_path / "cmmlu" / "test" / "zz_unknown.csv", ",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,A\n")
    r = benchmark_eval(model, tok, "cmmlu", tmp_path / "cmmlu")
    per = {"agronomy": [("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n牛的发情周期平均为\nA. 16天\nB. 21天\nC. 28天\nD. 19天\n答案：", list("ABCD"), 1),
                        ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n羊肉哪里好\nA. 胸\nB. 肩\nC. 后腿\nD. 小腿\n答案：", list("ABCD"), 2)],
           "zz_unknown": [("以下是关于zz unknown的单项选择题，请直接给出正确答案的选项。\n\n问题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：", list("ABCD"), 0)]}
    hand = {s: hand_scores(model, tok, items)[0] for s, items in per.items()}
    assert {s: v["acc"] for s, v in r["subjects"].items()} == pytest.approx(hand)
    assert r["acc"] == pytest.approx((2 * hand["agronomy"] + hand["zz_unknown"]) / 3)  # lm-eval's group: weighted by size
    assert r["subject_mean"]["acc"] == pytest.approx((hand["agronomy"] + hand["zz_unknown"]) / 2)


def arc_line(stem, texts, labels, key):
    return {"id": stem[:8], "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]}, "answerKey": key}


def test_arc_jsonl_letter_and_number_labels(model, tok, tmp_path):
    long = ["no", "a white cat who lives in Maple Town and likes fish"]
    f = write_jsonl(tmp_path / "ARC-Easy" / "ARC-Easy-Test.jsonl", [
        arc_line("Who is Mimi?", long, "AB", "B"),  # the per-character pick (see the first test): acc and acc_norm disagree
        arc_line("Which is a colour?", ["red", "seven", "Maple Town"], "123", "1"),
        arc_line("What do cats drink?", ["milk", "water from a bowl", "stones", "air", "sand"], "ABCDE", "B")])
    r = benchmark_eval(model, tok, "arc", f.parent)
    items = [("Question: Who is Mimi?\nAnswer:", long, 1), ("Question: Which is a colour?\nAnswer:", ["red", "seven", "Maple Town"], 0),
             ("Question: What do cats drink?\nAnswer:", ["milk", "water from a bowl", "stones", "air", "sand"], 1)]
    acc, norm = hand_scores(model, tok, items)
    assert r["n"] == 3 and r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(norm) and acc != norm
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 5) / 3)


def test_arc_and_openbookqa_in_the_hubs_flattened_layout(tok, tmp_path):
    arc = write_jsonl(tmp_path / "arc.jsonl", [{"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}])
    obqa = write_jsonl(tmp_path / "obqa.jsonl", [{"question_stem": "The sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
                                                  "answerKey": " A"}])
    assert read_benchmark("arc", arc) == [{"question": "Question: Q?\nAnswer:", "choices": ["x", "y"], "answer": 1, "subject": ""}]
    assert read_benchmark("openbookqa", obqa) == [{"question": "The sun is", "choices": ["hot", "cold"], "answer": 0, "subject": ""}]


def test_openbookqa_asks_the_bare_stem(model, tok, tmp_path):
    f = write_jsonl(tmp_path / "Main" / "test.jsonl", [arc_line("When birds migrate south for the winter, they do it because",
                                                                ["they are genetically called to", "their children ask"], "AB", "A"),
                                                       arc_line("A compass points", ["north", "to the sky above us"], "AB", "B")])
    r = benchmark_eval(model, tok, "openbookqa", f.parent)
    acc, norm = hand_scores(model, tok, [("When birds migrate south for the winter, they do it because", ["they are genetically called to", "their children ask"], 0),
                                         ("A compass points", ["north", "to the sky above us"], 1)])
    assert r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(norm)


def test_piqa_answers_come_from_the_labels_file(model, tok, tmp_path):
    goals = [{"goal": "Dry wet hands", "sol1": "use a towel", "sol2": "use a bucket of water"},
             {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout"}]
    f = write_jsonl(tmp_path / "dev.jsonl", goals)
    (tmp_path / "dev-labels.lst").write_text("0\n0\n", encoding="utf-8")
    r = benchmark_eval(model, tok, "piqa", tmp_path)
    acc, norm = hand_scores(model, tok, [(f"Question: {g['goal']}\nAnswer:", [g["sol1"], g["sol2"]], 0) for g in goals])
    assert r["n"] == 2 and r["chance"] == 0.5 and r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(norm)
    (tmp_path / "dev-labels.lst").write_text("0\n", encoding="utf-8")
    with pytest.raises(DataError, match="1 labels for the 2 questions"): read_benchmark("piqa", f)
    (tmp_path / "dev-labels.lst").write_text("0\n2\n", encoding="utf-8")
    with pytest.raises(DataError) as e: read_benchmark("piqa", f)
    assert str(e.value).startswith(f"{tmp_path / 'dev-labels.lst'}:2: expected 0 or 1")
    (tmp_path / "dev-labels.lst").unlink()
    with pytest.raises(FileNotFoundError, match="dev-labels.lst: no such file"): read_benchmark("piqa", f)


def test_hellaswag_context_and_endings_are_cleaned_as_lm_eval_does(model, tok, tmp_path):
    f = write_jsonl(tmp_path / "hellaswag_val.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                     "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
        {"ind": 7, "activity_label": "Personal Care", "ctx_a": "[header] How to wash hands [title] Get some water.", "ctx_b": "",
         "label": "0", "endings": ["[step] Rub soap on them.", "Eat the soap."]}])
    recs = read_benchmark("hellaswag", f)
    assert [r["question"] for r in recs] == ["Roof shingle removal: A man is sitting on a roof. He",
                                             "Personal Care: How to wash hands. Get some water."]
    assert recs[1]["choices"] == [" Rub soap on them.", "Eat the soap."]  # lm-eval strips before it removes markers
    assert [r["answer"] for r in recs] == [3, 0]
    r = benchmark_eval(model, tok, "hellaswag", tmp_path)
    acc, norm = hand_scores(model, tok, [(r_["question"], r_["choices"], r_["answer"]) for r_ in recs])
    assert r["acc"] == pytest.approx(acc) and r["acc_norm"] == pytest.approx(norm)


# ---- GSM8K -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,strict,flexible", [
    ("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,234", "1,234", "1,234"),
    ("The answer is $18.", None, "$18."),
    ("#### 72 and then 5 more", "72", "5"),
    ("It is -5.", None, "-5."),
    ("no number here", None, None),
])
def test_gsm8k_answer_extraction(text, strict, flexible):
    assert gsm8k_extract(text, strict=True) == strict and gsm8k_extract(text) == flexible


def test_gsm8k_exact_match_compares_cleaned_numbers():
    ref = gsm8k_normalize("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72")
    assert ref == "72"
    assert gsm8k_normalize("$72.") == ref and gsm8k_normalize("72") == ref and gsm8k_normalize("1,072") == "1072"
    assert gsm8k_normalize("72.5") != ref and gsm8k_normalize("7.2") != ref


def test_gsm8k_file_greedy_solutions_and_their_grades(model, tok, tmp_path):
    problems = [{"question": "Pip has 3 eggs and gets 4 more. How many eggs?", "answer": "3 + 4 = 7.\n#### 7"},
                {"question": "Dot has 9 fish and gives away 2. How many fish?", "answer": "9 - 2 = 7\n#### 7"}]
    write_jsonl(tmp_path / "test.jsonl", problems)
    write_jsonl(tmp_path / "train.jsonl", [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}])
    r = benchmark_eval(model, tok, "gsm8k", tmp_path, fewshot=1, max_new_tokens=6)
    assert r["n"] == 2 and len(r["completions"]) == 2
    want = sum(x is not None and gsm8k_normalize(x) == "7" for x in map(gsm8k_extract, r["completions"])) / 2
    assert r["exact_match"] == want


# ---- bad layouts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("benchmark,name,content,where,msg", [
    ("ceval", "x_test.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n", 1, "no column answer (the header has id, question, A, B, C, D) (C-Eval's test"),
    ("ceval", "x_val.csv", 'id,question,A,B,C,D,answer\n0,"two\nlines",a,b,c,d,A\n1,q,a,b,c,A\n', 4, "expected 7 fields, got 6"),
    ("ceval", "x_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", 2, "answer: expected a letter A-D"),
    ("ceval", "x_val.csv", "", 1, "empty file"),
    ("cmmlu", "x.csv", ",Question,A,B,C,D,Answer\n", 2, "no records"),
    ("cmmlu", "x.csv", ",Question,A,B,C,D\n0,q,a,b,c,d\n", 1, "no column Answer"),
    ("arc", "x.jsonl", json.dumps(arc_line("q", ["a", "b"], "AB", "A")) + "\n{\"question\": \n", 2, "bad JSON"),
    ("arc", "x.jsonl", json.dumps(arc_line("q", ["a", "b"], "AB", "C")) + "\n", 1, "answerKey: expected one of the labels A, B, got 'C'"),
    ("arc", "x.jsonl", '{"question": {"stem": "q", "choices": "a b"}, "answerKey": "A"}\n', 1, "question.choices: expected a list"),
    ("openbookqa", "x.jsonl", "", 1, "no records"),
    ("hellaswag", "x.jsonl", '{"activity_label": "a", "ctx": "b", "endings": ["c", "d"]}\n', 1, "label: missing"),
    ("gsm8k", "x.jsonl", '{"question": "q", "answer": "7"}\n', 1, "answer: expected a worked solution ending in '#### N'"),
    ("gsm8k", "x.jsonl", '{"question": "q", "answer": "#### 7"}\n[1]\n', 2, "expected a JSON object"),
])
def test_bad_files_name_the_file_and_line(tmp_path, benchmark, name, content, where, msg):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e: read_benchmark(benchmark, f)
    assert str(e.value).startswith(f"{f}:{where}: {msg}")


def test_files_not_in_utf8_and_folders_without_the_layout(tmp_path):
    f = tmp_path / "x_val.csv"
    f.write_bytes("id,question,A,B,C,D,answer\n0,问,a,b,c,d,A\n".encode("gbk"))
    with pytest.raises(DataError, match=r"x_val.csv:2: not valid UTF-8"): read_benchmark("ceval", f)
    with pytest.raises(FileNotFoundError, match=r"no val/\*_val.csv in this folder"): benchmark_files("ceval", tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"): benchmark_files("arc", tmp_path / "nowhere")


# ---- the command line --------------------------------------------------------------------------------------------

def test_command_line_scores_a_benchmark_folder(model, tok, tmp_path, capsys):
    folder = export_hf(model, tmp_path / "model", tok)
    tok.save(folder)
    write_jsonl(tmp_path / "arc" / "ARC-Easy-Test.jsonl", [arc_line("Who is Mimi?", ["no", "a white cat"], "AB", "B"),
                                                           arc_line("Which is a colour?", ["red", "seven"], "AB", "A")])
    r = main(["--model", str(folder), "--benchmark", "arc", "--data", str(tmp_path / "arc"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| benchmark | n | acc | acc_norm | chance |" in out and "| arc | 2 |" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["acc"] == pytest.approx(r["acc"]) and saved["acc"] == pytest.approx(benchmark_eval(model, tok, "arc", tmp_path / "arc")["acc"])


@pytest.mark.parametrize("args,msg", [
    (["--benchmark", "arc"], "error: --benchmark arc needs --data"),
    (["--benchmark", "arc", "--data", "NOWHERE"], "error: --data NOWHERE: no such file or folder"),
    (["--benchmark", "arc", "--task", "ppl", "--data", "."], "error: give --task"),
    (["--benchmark", "arc", "--fewshot", "2", "--data", "."], "error: --fewshot is for --benchmark ceval, cmmlu or gsm8k"),
    (["--fewshot", "2"], "error: --fewshot needs --benchmark"),
])
def test_bad_flags_are_one_error_line(args, msg):
    with pytest.raises(SystemExit) as e: main(["--model", "unused", *args])
    assert str(e.value.code).startswith(msg)


def test_a_bad_file_is_one_error_line_from_the_real_command(model, tok, tmp_path):
    bad = write_csv(tmp_path / "ceval" / "val" / "x_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,Z\n")
    folder = export_hf(model, tmp_path / "model", tok)
    tok.save(folder)
    out = run_cli("--model", folder, "--benchmark", "ceval", "--data", tmp_path / "ceval", module="minimind.eval")
    assert out.returncode == 1 and out.stderr.strip() == f"error: {bad}:2: answer: expected a letter A-D (or an index), got 'Z'"

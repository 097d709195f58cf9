"""Put one pipeline run on the book's index page: its results table, time per stage, loss curves and final chats.

    python .ci/index_results.py RUN_DIR --commit SHA --cpu "2-core AMD EPYC" --wall "20 min 40 s"

RUN_DIR is a folder `python -m minimind.train --run-dir RUN_DIR` finished (its report.md, curves.png, seconds.png).
The figures are copied to nbs/images/pipeline_*.png and the section "## One run of the whole pipeline" of
nbs/_py/index.py (the index's jupytext twin) is written anew; then `jupytext --sync nbs/_py/index.py` updates the notebook.
"""
import argparse
import re
import shutil
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = "# ## One run of the whole pipeline"


def section(report:str, commit:str, cpu:str, wall:str)->str:
    "The index's section, as jupytext percent-format markdown, from a run's report.md."
    body = report.split("\n", 1)[1].strip()  # drop the report's own title
    body = body.replace("](curves.png)", "](images/pipeline_curves.png)").replace("](seconds.png)", "](images/pipeline_seconds.png)")
    intro = (f"Everything below comes from one run of `python -m minimind.train` from an empty run folder: every stage at its "
             f"defaults on TinyWorld, on a {cpu} CPU with no GPU, at commit `{commit}`, {wall} from start to report. It is "
             "the run's `report.md`: each stage's held-out numbers before and after it (the same seed gives the same "
             "table), the seconds each stage took, the training and held-out loss of every training stage, and greedy answers "
             "of the final models, wrong ones included. The chapters explain every number; chapter 12 compares the models side by side.")
    text = f"## One run of the whole pipeline\n\n{textwrap.fill(intro, 114)}\n\n{body}\n"
    return "# %% [markdown]\n" + "\n".join(("# " + l).rstrip() for l in text.splitlines()) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--commit", required=True)
    p.add_argument("--cpu", required=True)
    p.add_argument("--wall", required=True)
    a = p.parse_args(argv)
    files = {f: a.run_dir/f for f in ("report.md", "curves.png", "seconds.png")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing: sys.exit(f"error: {', '.join(missing)} missing: run `python -m minimind.train --run-dir {a.run_dir}` to the end first")
    for f in ("curves", "seconds"): shutil.copy(files[f"{f}.png"], ROOT/"nbs"/"images"/f"pipeline_{f}.png")
    twin = ROOT/"nbs"/"_py"/"index.py"
    cells = re.split(r"\n(?=# %%)", twin.read_text(encoding="utf-8"))
    new = section(files["report.md"].read_text(encoding="utf-8"), a.commit, a.cpu, a.wall)
    at = [i for i, c in enumerate(cells) if c.startswith(f"# %% [markdown]\n{HEAD}\n")]
    if at: cells[at[0]] = new
    else: cells.insert(next(i for i, c in enumerate(cells) if "# ## The chapters" in c), new)  # before the chapter list
    twin.write_text("\n".join(c.rstrip("\n") + "\n" for c in cells), encoding="utf-8")
    print(f"wrote {twin.relative_to(ROOT)} and nbs/images/pipeline_{{curves,seconds}}.png")


if __name__ == "__main__": main()

"""The rendered-page check of CI (.ci/check_pages.py) catches what a reader of the site takes as broken."""
import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

spec = importlib.util.spec_from_file_location("check_pages", Path(__file__).parents[1]/".ci"/"check_pages.py")
check_pages = importlib.util.module_from_spec(spec); spec.loader.exec_module(check_pages)

PNG = {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure size 640x480 with 1 Axes>"}

def cell(source, *outputs): return new_code_cell(source, outputs=list(outputs))

def test_a_clean_page_has_no_problems():
    nb = new_notebook(cells=[cell("print(1 + 1)", new_output("stream", name="stdout", text="2\n")),
                             cell("fig, ax = plt.subplots()\nax.plot([1, 2])", new_output("display_data", data=PNG)),
                             cell("plot_curves(log)  # a helper that draws", new_output("display_data", data=PNG)),
                             cell("work = cache_dir()/'04-run'\nprint('runs/tinyworld')", new_output("stream", name="stdout", text="runs/tinyworld\n"))])
    assert check_pages.problems(nb) == []

def test_each_broken_output_is_named_with_its_cell():
    nb = new_notebook(cells=[
        cell("1/0", new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=["..."])),
        cell("warnings.warn('x')", new_output("stream", name="stderr", text="UserWarning: x\n")),
        cell("print(path)", new_output("stream", name="stdout", text="saved to /root/.cache/minimind/run\n")),
        cell("log", new_output("execute_result", data={"text/plain": "Traceback (most recent call last):\n  File ..."}, execution_count=1)),
        cell("import matplotlib.pyplot as plt", new_output("display_data", data=PNG)),  # the figure of the cell below
        cell("x = 1", new_output("display_data", data=PNG)),
    ])
    found = check_pages.problems(nb)
    assert [f.split(":")[0] for f in found] == [f"cell {i} ({s!r})" for i, s in
                                               enumerate(["1/0", "warnings.warn('x')", "print(path)", "log", "import matplotlib.pyplot as plt", "x = 1"])]
    assert "ZeroDivisionError" in found[0] and "stderr output: UserWarning: x" in found[1] and "/root/.cache" in found[2]
    assert "traceback" in found[3] and all("does not draw" in f for f in found[4:])

def test_the_script_renders_pages_and_fails_on_a_problem(tmp_path, capsys):
    folder = tmp_path/"_proc"; folder.mkdir()
    nbformat.write(new_notebook(cells=[cell("print(2)", new_output("stream", name="stdout", text="2\n"))]), folder/"01_ok.ipynb")
    with pytest.raises(SystemExit) as ok: check_pages.main([str(folder), "--html", str(tmp_path/"html")])
    assert ok.value.code == 0
    assert "<html" in (tmp_path/"html"/"01_ok.html").read_text()
    nbformat.write(new_notebook(cells=[cell("run('/home/ann/data')")]), folder/"02_bad.ipynb")  # a path in the source
    with pytest.raises(SystemExit) as bad: check_pages.main([str(folder), "--html", str(tmp_path/"html")])
    assert bad.value.code == 1
    assert "02_bad.ipynb: a machine path on the page" in capsys.readouterr().out

def test_the_roadmap_figures_are_the_script_s_and_every_chapter_shows_its_own():
    spec = importlib.util.spec_from_file_location("roadmaps", Path(__file__).parents[1]/".ci"/"roadmaps.py")
    roadmaps = importlib.util.module_from_spec(spec); spec.loader.exec_module(roadmaps)
    roadmaps.main(["--check"])  # exits with the stale names if a committed figure is not what the script writes
    nbs = Path(__file__).parents[1]/"nbs"
    chapters = sorted(p.stem for p in nbs.glob("*.ipynb") if p.stem != "index")
    assert sorted(roadmaps.chapters()) == chapters  # every chapter has a box, and no box names a missing chapter
    for c in chapters: assert f"images/roadmap_{c}.svg" in (nbs/f"{c}.ipynb").read_text(), c
    assert 'fill="#f39c12"' in roadmaps.svg("05_sft") and roadmaps.svg("05_sft").count('fill="#f39c12"') == 1

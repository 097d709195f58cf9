"""Render every processed notebook (`nbdev-proc-nbs` wrote them to _proc/) to HTML the way a reader meets it, and fail
on what a reader takes as broken: a saved traceback or error, a stderr stream (a warning), an absolute path of the
machine that ran it, or a figure saved under a cell that does not draw one.

Usage: python .ci/check_pages.py [_proc] [--html DIR]   (exit 1 and one line per problem when any is found)
"""
import argparse, json, re, sys, tempfile
from pathlib import Path

from nbconvert import HTMLExporter
import nbformat

MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|root|home|work|Users|content|private|var/folders)/[\w.-]")  # /tmp/x, /root/.cache, ...
DRAWS = re.compile(r"\b(?:plt|fig|ax\w*|axes|sns)\b|\.plot\w*\(|imshow|display\(|Image\(|show_\w+\(|draw\w*\(|plot\w*\(|chart\w*\(|figure")

def code_lines(source:str)->list[str]: # the cell's code, without imports, comments, directives and blank lines
    lines = [l.split("#")[0].rstrip() for l in source.splitlines()]
    return [l for l in lines if l.strip() and not re.match(r"\s*(import|from)\s", l)]

def output_text(o:dict)->str:
    return "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("data", {}).get("text/html", ""))

def problems(nb:dict)->list[str]: # one line per problem, naming the cell
    found = []
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "code": continue
        where = f"cell {i} ({(c['source'].strip().splitlines() or [''])[0][:40]!r})"
        for o in c.get("outputs", []):
            if o["output_type"] == "error": found.append(f"{where}: a saved {o.get('ename', 'error')}")
            elif o["output_type"] == "stream" and o["name"] == "stderr":
                found.append(f"{where}: stderr output: {''.join(o['text']).strip().splitlines()[0][:100] if ''.join(o['text']).strip() else '(blank)'}")
            text = output_text(o)
            if "Traceback (most recent call last)" in text: found.append(f"{where}: a traceback in the output")
            if (m := MACHINE_PATH.search(text)): found.append(f"{where}: a machine path in the output: ...{text[max(0, m.start() - 30):m.end() + 30]!r}")
            if "image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {}):
                code = code_lines(c["source"])
                if not code or not any(DRAWS.search(l) for l in code): found.append(f"{where}: a figure under a cell that does not draw one")
    return found

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="_proc", type=Path)
    p.add_argument("--html", type=Path, default=None, help="write the pages here (default: a temporary folder)")
    args = p.parse_args(argv)
    nbs = sorted(args.folder.glob("*.ipynb"))
    if not nbs: sys.exit(f"error: no notebooks in {args.folder} (run nbdev-proc-nbs first)")
    out = args.html or Path(tempfile.mkdtemp(prefix="pages-"))
    out.mkdir(parents=True, exist_ok=True)
    exporter, bad = HTMLExporter(), 0
    for path in nbs:
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells: c.metadata.pop("execution", None)  # nbdev-proc-nbs's timings, which nbformat's schema refuses
        html, _ = exporter.from_notebook_node(nb)
        (out/path.with_suffix(".html").name).write_text(html)
        found = problems(nb)
        text = re.sub(r"<[^>]+>", "", html)  # the page's text
        if (m := MACHINE_PATH.search(text)) and not any("machine path" in f for f in found):
            found.append(f"a machine path on the page: ...{text[max(0, m.start() - 30):m.end() + 30]!r}")
        for f in found: print(f"{path.name}: {f}")
        bad += len(found)
    print(f"{len(nbs)} pages rendered to {out}; {bad} problem(s)")
    sys.exit(1 if bad else 0)

if __name__ == "__main__": main()

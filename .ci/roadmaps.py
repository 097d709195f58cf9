"""The roadmap figure at the top of each chapter: the book's pipeline and pieces, with the chapter's box lit.

Writes nbs/images/roadmap_<chapter>.svg for every chapter (`python .ci/roadmaps.py`); `--check` fails if a
committed figure differs from what this script writes (tests/test_pages.py runs it)."""
import sys
from pathlib import Path

ROWS = [  # (label, boxes): a box is (name, chapters it lights)
    ("the pipeline: python -m minimind.train", [("data", "00_data 00b_world 00c_tinyworld"), ("tokenizer", "01_tokenizer"),
        ("pretrain", "04c_pretrain"), ("SFT", "05_sft"), ("LoRA", "06_lora"), ("DPO", "07_dpo"), ("distill", "08_distill"),
        ("reason", "09_reasoning"), ("GRPO", "09b_grpo"), ("tools", "13_tools"), ("agent", "13b_agent")]),
    ("what every stage uses", [("decoder", "02_model"), ("generation", "02b_generate"), ("weights", "02c_weights"),
        ("int8 decode", "02d_decode_speed"), ("MoE", "03_moe"), ("token shards", "04a_shards"), ("compute", "04b0_compute"),
        ("engine", "04b_engine"), ("runs", "89_runs")]),
    ("using a model, and the command line", [("chat", "10_chat"), ("API formats", "10b_api"), ("serve", "11_serve"),
        ("eval", "12_eval"), ("harness", "12b_harness"), ("bench", "95_bench"), ("estimates", "95b_estimate"),
        ("CLI", "90_cli")]),
]
W, H, GAP, X0 = 72, 26, 6, 10  # box width and height, gap, left margin

def svg(chapter:str)->str:
    "The roadmap with `chapter`'s boxes lit."
    out, y = [], 8
    for label, boxes in ROWS:
        out.append(f'<text x="{X0}" y="{y + 10}" font-size="11" fill="#555">{label}</text>')
        y += 16
        for i, (name, chapters) in enumerate(boxes):
            x, lit = X0 + i * (W + GAP), chapter in chapters.split()
            out.append(f'<rect x="{x}" y="{y}" width="{W}" height="{H}" rx="5" fill="{"#f39c12" if lit else "#eef1f5"}" '
                       f'stroke="{"#b9770e" if lit else "#c5ccd6"}"/>')
            out.append(f'<text x="{x + W / 2}" y="{y + 17}" font-size="11" text-anchor="middle" '
                       f'font-weight="{"bold" if lit else "normal"}" fill="{"#000" if lit else "#445"}">{name}</text>')
            if label.startswith("the pipeline") and i: out.append(f'<path d="M{x - GAP} {y + H / 2} h{GAP - 1}" stroke="#889" marker-end="url(#a)"/>')
        y += H + 12
    width = X0 * 2 + max(len(b) for _, b in ROWS) * (W + GAP) - GAP
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" viewBox="0 0 {width} {y}" '
            f'font-family="sans-serif"><defs><marker id="a" markerWidth="4" markerHeight="4" refX="3" refY="2" orient="auto">'
            f'<path d="M0,0 L4,2 L0,4 z" fill="#889"/></marker></defs>')
    return head + "".join(out) + "</svg>\n"

def chapters()->list[str]: return [c for _, boxes in ROWS for _, cs in boxes for c in cs.split()]

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(__file__).parents[1]/"nbs"/"images"
    folder.mkdir(exist_ok=True)
    stale = []
    for c in chapters():
        path = folder/f"roadmap_{c}.svg"
        if "--check" in argv: stale += [] if path.exists() and path.read_text() == svg(c) else [path.name]
        else: path.write_text(svg(c))
    if stale: sys.exit(f"error: roadmaps differ from .ci/roadmaps.py's: {', '.join(stale)} (run python .ci/roadmaps.py)")

if __name__ == "__main__": main()

"The installed package needs only its runtime requirements: no module imports a dev-only package."
import configparser
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import minimind

ROOT = Path(__file__).parents[1]
cfg = configparser.ConfigParser(delimiters=["="])
cfg.read(ROOT/"settings.ini", encoding="utf-8")
RUNTIME = set(cfg["DEFAULT"]["requirements"].split())
DEV = {r.split(">")[0].split("=")[0] for r in cfg["DEFAULT"]["dev_requirements"].split()}
# dev requirements and what they bring along (nbdev brings fastcore, execnb, IPython), unless the package needs it
DEV_ONLY = (DEV | {"fastcore", "execnb", "IPython", "fastprogress", "wandb"}) - RUNTIME
MODULES = sorted(m.name for m in pkgutil.iter_modules(minimind.__path__) if not m.name.startswith("_"))

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED: raise ImportError(f"dev-only package imported: {{name}}")
BLOCKED = {blocked!r}
sys.meta_path.insert(0, Block())
import minimind.{module}
"""

def test_dev_only_packages_are_known():
    assert {"nbdev", "transformers", "hypothesis", "openai", "ipywidgets"} <= DEV_ONLY
    assert {"matplotlib", "fastapi", "uvicorn"} <= RUNTIME  # the pipeline report and the server need them
    assert {"data", "tokenizer", "model", "engine", "train"} <= set(MODULES)

@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_dev_packages(module):
    code = BLOCKER.format(blocked=DEV_ONLY, module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


POSIX_ONLY = ("resource", "fcntl")  # standard modules Windows lacks; the package must import without them

@pytest.mark.parametrize("module", ["shards", "train", "engine", "sft", "bench"])
def test_module_imports_without_posix_only_modules(module):
    code = f"import sys; sys.modules.update(dict.fromkeys({POSIX_ONLY!r})); import minimind.{module}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# --- the house: a module imports only from the modules below it ---

def imports_of(module:str)->set[str]:
    "The minimind modules `module`'s source names in an import (relative or absolute, at any depth)."
    from minimind.runs import imported_modules
    return {m.split(".")[1] for m in imported_modules(ROOT/"minimind"/f"{module}.py")} - {module}

def test_the_import_graph_has_no_circle():
    graph = {m: imports_of(m) & set(MODULES) for m in MODULES}
    done, path = set(), []
    def visit(m):
        assert m not in path, f"import circle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done: return
        path.append(m)
        for n in sorted(graph[m]): visit(n)
        path.pop(); done.add(m)
    for m in MODULES: visit(m)

def test_nothing_imports_the_command_line():
    assert [m for m in MODULES if "train" in imports_of(m)] == []

def test_modules_stay_readable():
    "No module over 600 lines: a module that grows past it is doing two jobs."
    long = {m: n for m in MODULES if (n := len((ROOT/"minimind"/f"{m}.py").read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}

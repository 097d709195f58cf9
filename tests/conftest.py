"""What several test files share: a temporary cache for the whole session, one torch thread, seeded `micro` models,
the small TinyWorld tokenizer, the book's quick pretrained model, and the command line run as a user runs it.

Fixtures here reach every test by name; test files import the plain helpers with `from conftest import ...`
(pytest puts `tests/` on `sys.path`)."""
import os
import shutil
import subprocess
import sys
import tempfile

# Every test, and every process a test starts (the CLI, torchrun), writes into a temporary cache, never into the
# user's ~/.cache/minimind. It is set here, when pytest loads this file, before anything imports minimind, so every
# module and every subprocess sees it. A cache the caller set (CI sets a fresh temporary folder) is used as it is.
OWN_CACHE = not os.environ.get("MINIMIND_CACHE")
if OWN_CACHE: os.environ["MINIMIND_CACHE"] = tempfile.mkdtemp(prefix="minimind-test-cache-")

import pytest
import torch

import minimind.engine as engine
from minimind.compute import Compute
from minimind.chat import load_chat_model
from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.tokenizer import MiniMindTokenizer, tinyworld_tokenizer


def pytest_unconfigure(config):
    "The temporary cache goes when the session ends (one the caller set stays)."
    if OWN_CACHE: shutil.rmtree(os.environ["MINIMIND_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    "Tiny models on a shared 2-core CPU: one thread avoids OpenMP contention, which can slow these runs tenfold."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALL_WAYS = engine.cpu_candidates  # every way the engine can compute on this CPU

@pytest.fixture(autouse=True)
def fp32_engine(monkeypatch):
    """Training in this process computes in fp32 on PyTorch's kernels, the same numbers on every machine, instead
    of the fastest way timed here. Tests of that choice put `ALL_WAYS` back; commands a test starts as a user
    would (the CLI, torchrun) choose as usual."""
    monkeypatch.setattr(engine, "cpu_candidates", lambda: [Compute()])


# ---- models and tokenizers -------------------------------------------------------------------------------------

def micro(seed:int=0, # torch's global seed, set before the weights are drawn
          **overrides, # config fields to change, e.g. vocab_size
         )->MiniMindForCausalLM: # in training mode, as PyTorch builds it: call `.eval()` for inference
    "A random `micro` model (2 layers, 64 wide, 512 tokens), the same for the same seed."
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig.from_preset("micro", **overrides))


def sharp_micro(seed:int=0, **overrides)->MiniMindForCausalLM: # in eval mode
    "A `micro` model whose matrices are redrawn from N(0, 0.1), larger than the init, so logits differ clearly between tokens."
    m = micro(seed, **overrides).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2: p.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def tok():
    """The small TinyWorld tokenizer (trained on first use, cached). Files that test other tokenizers (test_generate,
    test_shards, test_tokenizer) define a `tok` of their own, which pytest uses there instead."""
    return MiniMindTokenizer.load(tinyworld_tokenizer(small=True))


@pytest.fixture(scope="module")
def quick():
    "The book's quick pretrained model and its tokenizer, a `ChatModel` (trained on first use, a few seconds)."
    from minimind.pretrain import PRETRAIN
    from minimind.runs import require
    return load_chat_model(require(PRETRAIN, quick=True) / "model")


# ---- the command line ------------------------------------------------------------------------------------------

def run_cli(*args, # the command line's arguments (paths and numbers are turned into text)
            module:str="minimind.train", # the package module whose command line runs
            launcher=(sys.executable, "-m"), # e.g. (torchrun, "--standalone", "--nproc_per_node", "2", "-m")
            stdin:str|None=None, # typed into the program
            cwd=None, # the folder it runs in
            timeout:float=900, # seconds before the test fails instead of hanging
           )->subprocess.CompletedProcess: # with text stdout and stderr
    "Run `module`'s command line as a user would, with one OpenMP thread, and return the finished process."
    return subprocess.run([*launcher, module, *map(str, args)], input=stdin, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)

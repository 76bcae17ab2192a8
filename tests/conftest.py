import io
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "2")
# amp auto's measurements (utils/train/precision.py) cached for this session only, not in the user's home
CACHE_DIR = os.environ["KIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="kit-cache-")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs scripts end to end (left out by make test-fast)")


def pytest_unconfigure(config):
    import gc
    import shutil

    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    gc.freeze()  # as utils.config.run_command does for the scripts: the exit's final collections skip torch's objects


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small generated dataset in the competition layout, shared by the tests (read-only)."""
    from utils.tools.demo_data import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", n_train=240, n_test=48, seed=7,
                    workers=2, progress=False, width=128)  # a quarter of the demo's width: decodes faster


# A dataset of another world than the competition's: its own categories, 1 to 3 attributes each
OTHER_WORLD = {"Bags": {"colour": ["red", "green", "blue"]},
               "Shoes": {"colour": ["red", "blue"], "sole": ["flat", "heel"], "laces": ["yes", "no"]},
               "Hats & Caps": {"brim": ["wide", "none"], "colour": ["green", "blue"]}}


@pytest.fixture(scope="session")
def other_data(tmp_path_factory) -> Path:
    """A small generated dataset in the competition layout whose categories, attribute names and
    attribute counts are not the competition's (each value drawn as a cue in the image; a fifth of
    the labels missing)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from utils.data.schema import ATTR_COLS, CATEGORY, ID, LEN
    from utils.tools.demo_data import write_tables

    out, rng = tmp_path_factory.mktemp("data") / "other", np.random.default_rng(3)
    colours = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
    tables = {}
    for split, n in (("train", 90), ("test", 24)):
        (out / f"{split}_images").mkdir(parents=True)
        rows = []
        for i in range(n):
            cat = list(OTHER_WORLD)[i % len(OTHER_WORLD)]
            labels = {a: str(rng.choice(v, p=np.arange(len(v), 0, -1) / sum(range(len(v) + 1))))  # imbalanced
                      for a, v in OTHER_WORLD[cat].items()}
            img = np.full((40, 40, 3), 128, np.uint8)
            img[8:32, 8:32] = colours[labels["colour"]] if "colour" in labels else 128
            img[32:, :] = 0 if labels.get("sole") == "heel" or labels.get("brim") == "wide" else 255
            img[:8, ::4] = 255 if labels.get("laces") == "yes" else 0
            Image.fromarray(img).save(out / f"{split}_images" / f"{i:06d}.jpg", quality=95)
            row = {ID: i, CATEGORY: cat, LEN: len(labels)}
            row.update({col: np.nan for col in ATTR_COLS})
            row.update({f"attr_{k}": v for k, v in enumerate(labels.values(), start=1)})
            rows.append(row)
        tables[split] = pd.DataFrame(rows)
    train = tables["train"]
    for col in ATTR_COLS[:3]:  # a fifth of the labels missing, none of a head entirely
        drop = (rng.random(len(train)) < 0.2) & (train.index >= 12)
        train.loc[drop, col] = np.nan
    write_tables(out, {c: list(a) for c, a in OTHER_WORLD.items()}, train, tables["test"])
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """The whole flow on the tiny data: two backbones trained on 3 folds, ensemble, export (read-only)."""
    return pipeline(tiny_data, tmp_path_factory.mktemp("run"))


# fp32: the tests on this run compare its saved logits and OOF scores with what export.py's fp32 graphs
# and a fold's best.pt compute again (amp auto may time bf16 faster for these tiny models on one CPU)
TRAIN = ["--n-folds", "3", "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--workers", "0",
         "--progress", "false", "--fold", "all", "--amp", "off"]


MODELS = ("test_byobnet", "test_efficientnet")  # timm's tiny test models (one preprocessing: a merged graph)


def pipeline(data: Path, out: Path) -> Path:
    for model in MODELS:
        run_script("train.py", "--model", model, "--data-dir", str(data), "--out-dir", str(out), *TRAIN)
    run_script("ensemble.py", "--data-dir", str(data), "--out-dir", str(out), "--sto-population", "6",
               "--sto-iterations", "3", "--compare", "equal,sto", "--progress", "false")
    run_script("export.py", "--data-dir", str(data), "--out-dir", str(out), "--timing-images", "5",
               "--parity-images", "8", "--progress", "false")
    return out


class _Output(io.StringIO):
    """A captured stream that notes when ``marker`` first appears in it."""

    def __init__(self, marker: str | None):
        super().__init__()
        self.marker, self.seen, self.tail = marker, None, ""

    def write(self, text: str) -> int:
        if self.seen is None and self.marker:  # the marker may straddle two writes
            window = self.tail + text
            if self.marker in window:
                self.seen = time.monotonic()
            self.tail = window[-len(self.marker):]
        return super().write(text)


def run_script(*args, cwd=ROOT, check=True, env=None, timeout=600, marker=None):
    """Run a top-level script (``train.py ...``) or module (``-m utils.metric ...``) as a user would,
    and return a CompletedProcess. It runs in this process (``runpy``, ``__main__``, its own argv,
    its output captured): what the command does is the same, without a new interpreter's seconds
    of imports. Code (``-c``) and a custom ``env`` get a real process; so do the tests that must
    kill, count or isolate one, which call subprocess themselves. With ``marker``, the result's
    ``after_marker_s`` is the time from the marker's first appearance in the output to the end."""
    if args[0] == "-c" or env is not None or cwd != ROOT:
        assert marker is None, "marker timing is for in-process runs"
        return run_process(*args, cwd=cwd, check=check, env=env, timeout=timeout)
    import contextlib
    import runpy
    import subprocess
    import traceback
    import warnings

    out, err, code = _Output(marker), _Output(marker), 0
    module = args[1] if args[0] == "-m" else None
    argv, sys.argv = sys.argv, [module or args[0], *args[2 if module else 1:]]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")  # as in a fresh process: no warning is "already shown"
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))  # not pytest's recorder
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / args[0]), run_name="__main__")
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        if not isinstance(end.code, int) and end.code is not None:
            err.write(str(end.code) + "\n")
    except BaseException:  # what an uncaught exception does to a process: a traceback, status 1
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
    proc = subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
    if marker is not None:
        seen = min((t for t in (out.seen, err.seen) if t is not None), default=None)
        assert seen is not None, f"{marker!r} never appeared in the output of {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        proc.after_marker_s = time.monotonic() - seen
    if check and code != 0:
        raise AssertionError(f"{args} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_process(*args, cwd=ROOT, check=True, env=None, timeout=600):
    """Run ``python *args`` in a new process and return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc

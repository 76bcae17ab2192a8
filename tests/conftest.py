import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small generated dataset in the competition layout, shared by the tests (read-only)."""
    from utils.demo_data import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", n_train=240, n_test=48, seed=7,
                    workers=2, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """The whole flow on the tiny data: two backbones trained on 3 folds, ensemble, export (read-only)."""
    return pipeline(tiny_data, tmp_path_factory.mktemp("run"))


TRAIN = ["--n-folds", "3", "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--workers", "1",
         "--progress", "false", "--fold", "all"]


def pipeline(data: Path, out: Path) -> Path:
    for model in ("resnet18", "efficientnet_b0"):
        run_script("train.py", "--model", model, "--data-dir", str(data), "--out-dir", str(out), *TRAIN)
    run_script("ensemble.py", "--data-dir", str(data), "--out-dir", str(out), "--sto-population", "6",
               "--sto-iterations", "3", "--compare", "equal,sto", "--progress", "false")
    run_script("export.py", "--data-dir", str(data), "--out-dir", str(out), "--timing-images", "5",
               "--progress", "false")
    return out


def run_script(*args, cwd=ROOT, check=True, env=None, timeout=600):
    """Run a top-level script or module as a user would, and return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end or timing-bound; left out of `make test-fast`")

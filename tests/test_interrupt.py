"""kill -9 at a random point: no half-written output, and a re-run finishes with the same outputs.

Each test runs a script once to the end (the reference, in this process, timed from a marker in
its output), then again as a new process (started before the reference, so that its imports
overlap it) whose whole process group is killed at a random moment after that marker, then once
more (with ``--resume`` where it applies) and compares. The kill moment is drawn from the
reference's own duration, so the test does not depend on the machine's speed.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT, run_script
from utils import io as io_module
from utils.data.decoded import DecodedImages
from utils.io import atomic_write_text


def start(argv: list[str], **popen) -> subprocess.Popen:
    """``python *argv`` in its own process group, stdout and stderr merged into one pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, **popen)


def warm_process(script: str) -> subprocess.Popen:
    """A new Python process in its own process group that imports ``script``'s modules at once,
    then runs ``python script ARGS`` when ``launch(..., warm=)`` hands it ARGS: started before the
    reference run, its seconds of imports overlap that run instead of following it."""
    code = (f"import json, runpy, sys\nimport {Path(script).stem}\n"
            "sys.argv = json.loads(sys.stdin.readline())\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    return start(["-c", code], stdin=subprocess.PIPE)


def launch(args, marker, kill_after=None, warm=None):
    """Run ``python *args`` in its own process group (in ``warm``, a ``warm_process`` of the same
    script, when given), stdout and stderr merged. ``kill_after`` seconds after ``marker`` first
    appears in the output, kill -9 the whole group (workers too). Returns (return code, output,
    seconds from the marker to the exit or the kill)."""
    if warm is None:
        proc = start(list(args))
    else:
        proc = warm
        try:
            proc.stdin.write((json.dumps(list(args)) + "\n").encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died importing: its output says why, below
            pass
    chunks = []

    def read():
        while chunk := os.read(proc.stdout.fileno(), 65536):
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen, deadline = None, time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if seen is None and marker in b"".join(chunks).decode(errors="replace"):
            seen = time.monotonic()
        if seen is not None and kill_after is not None and time.monotonic() - seen >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=60)
    end = time.monotonic()
    reader.join(10)
    output = b"".join(chunks).decode(errors="replace")
    assert marker in output, f"{marker!r} never appeared in the output of {args}:\n{output[-3000:]}"
    return rc, output, end - (seen or end)


def kill_midway(args, marker, reference_s, reset, seed, warm=None):
    """Kill the run at a random moment while it is still working; returns the delay used. The
    first try runs in ``warm`` when given. When it finished first (a machine much faster than
    during the reference), try earlier."""
    delay = random.Random(seed).uniform(0.05, 0.6) * reference_s
    for _ in range(4):
        reset()
        rc, output, _ = launch(args, marker, kill_after=delay, warm=warm)
        warm = None
        if rc == -signal.SIGKILL:
            return delay
        assert rc == 0, output[-3000:]
        delay /= 4
    pytest.fail(f"{args[0]} always finished before the kill (reference {reference_s:.2f} s after {marker!r})")


def assert_complete(folder):
    """Every output file in the tree (hidden temporary files aside) loads in full."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix
        if suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".csv":
            pd.read_csv(path)
        elif suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif suffix in (".png", ".jpg"):
            with Image.open(path) as im:
                im.load()
        elif suffix == ".bin":  # decode cache pixels: whole when an index names them; unused without one
            if path.with_suffix(".npz").is_file():
                assert path.stat().st_size == DecodedImages(path.with_suffix(".npz")).nbytes, path
        else:
            raise AssertionError(f"unexpected file {path}")


def no_temporary_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


pytestmark = pytest.mark.slow  # every test here runs a script twice or more, killing one run


@pytest.fixture
def seed():
    """A fresh random kill point on every run; each failure message names it."""
    return random.SystemRandom().randrange(2**32)


# ----------------------------------------------------------------------------- atomic writes

def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "ensemble.json"
    target.write_text('{"old": true}\n')
    code = (f"import time\nfrom utils.io import atomic_write\n"
            f"def write(f):\n    f.write(b'x' * 1_000_000); f.flush(); print('half', flush=True); time.sleep(60)\n"
            f"atomic_write({str(target)!r}, write)\n")
    rc, output, _ = launch(["-c", code], "half", kill_after=0.0)
    assert rc == -signal.SIGKILL
    assert target.read_text() == '{"old": true}\n'  # never the half-written bytes
    leftovers = no_temporary_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".ensemble.json.")
    assert (tmp_path / leftovers[0]).stat().st_size == 1_000_000
    # the next run's first write into the folder clears the dead writer's file
    run_script("-c", f"from utils.io import atomic_write_text; atomic_write_text({str(target)!r}, '{{\"new\": true}}\\n')")
    assert target.read_text() == '{"new": true}\n'
    assert no_temporary_files(tmp_path) == []



def test_a_dead_but_unreaped_writer_counts_as_dead(tmp_path):
    """In a container whose init does not reap, a killed pool worker stays a zombie: its pid still
    answers kill(pid, 0), yet its temporary file is stale and the next run must clear it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)  # exited, not yet waited for: a zombie
    leftover = tmp_path / f".000001.jpg.{io_module._HOST}-{child.pid}-0badc0de.tmp"
    leftover.write_bytes(b"half")
    alive = tmp_path / f".000002.jpg.{io_module._HOST}-{os.getpid()}-0badc0de.tmp"
    alive.write_bytes(b"being written")
    atomic_write_text(tmp_path / "000003.txt", "done")
    child.wait()
    assert not leftover.exists()  # the zombie's file went
    assert alive.exists()  # a live writer's file stays
# ----------------------------------------------------------------------------- the scripts

TRAIN = ["--model", "test_resnet", "--n-folds", "2", "--img-size", "32", "--batch-size", "16", "--epochs", "2",
         "--workers", "1", "--progress", "false", "--fold", "all", "--batch-aug", "on"]  # batches seeded per batch


def test_train_killed_then_resumed_matches_an_uninterrupted_run(tiny_data, tmp_path, seed):
    def args(out, *extra):
        return ["train.py", "--data-dir", str(tiny_data), "--out-dir", str(out), *TRAIN, *extra]

    marker = "fold 0 epoch 1/2"
    warm = warm_process("train.py")
    reference_s = run_script(*args(tmp_path / "ref"), marker=marker).after_marker_s
    cut = tmp_path / "cut"
    delay = kill_midway(args(cut), marker, reference_s, lambda: shutil.rmtree(cut, ignore_errors=True), seed, warm)
    why = f"killed {delay:.2f} s after {marker!r} (seed {seed})"
    assert_complete(cut)
    run_script(*args(cut, "--resume", "true"))
    for k in range(2):
        for name in ("oof_logits.npz", "test_logits.npz"):
            a, b = (np.load(d / "test_resnet" / f"fold{k}" / name) for d in (tmp_path / "ref", cut))
            assert (a["ids"] == b["ids"]).all(), why
            np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6, rtol=0, err_msg=why)
        a, b = (pd.read_csv(d / "test_resnet" / f"fold{k}" / "history.csv") for d in (tmp_path / "ref", cut))
        np.testing.assert_allclose(a.val_score, b.val_score, atol=1e-6, err_msg=why)
    a, b = (json.loads((d / "test_resnet" / "oof_score.json").read_text()) for d in (tmp_path / "ref", cut))
    assert a == pytest.approx(b), why
    assert no_temporary_files(cut) == [], why


def test_a_run_stopped_between_its_history_and_its_checkpoint_resumes_to_the_full_history(tiny_data, tmp_path,
                                                                                        monkeypatch):
    """A moment of an epoch's end that a random kill rarely hits: right after the second epoch's
    ``last.pt`` is written (the checkpoint resume takes: no epoch left to train). The resumed fold's
    history.csv has every epoch."""
    from utils.train import fold as fold_module

    class Killed(Exception):
        pass

    writes, real = [], fold_module.atomic_torch_save

    def save_then_stop(path, obj):  # stops right after the second epoch's last.pt is written
        real(path, obj)
        writes.append(path.name)
        if writes.count("last.pt") == 2:
            raise Killed

    args = ["train.py", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), *TRAIN, "--workers", "0",
            "--fold", "0"]
    monkeypatch.setattr(fold_module, "atomic_torch_save", save_then_stop)
    assert run_script(*args, check=False).returncode == 1
    monkeypatch.setattr(fold_module, "atomic_torch_save", real)
    run_script(*args, "--resume", "true")
    history = pd.read_csv(tmp_path / "test_resnet" / "fold0" / "history.csv")
    assert list(history.epoch) == [1, 2]


def test_augment_killed_then_rerun_writes_the_same_images(tiny_data, tmp_path, seed):
    def args(out):
        return ["augment.py", "--data-dir", str(tiny_data), "--out-dir", str(out), "--attr", "all",
                "--aug-percentage", "1.0", "--workers", "2"]

    marker = "augment:"  # the progress bar starts with the first image
    warm = warm_process("augment.py")
    reference_s = run_script(*args(tmp_path / "ref"), marker=marker).after_marker_s
    cut = tmp_path / "cut"
    delay = kill_midway(args(cut), marker, reference_s, lambda: shutil.rmtree(cut, ignore_errors=True), seed, warm)
    why = f"killed {delay:.2f} s after {marker!r} (seed {seed})"
    assert_complete(cut)  # every image written so far decodes in full
    run_script(*args(cut))
    ref_images = sorted(p.name for p in (tmp_path / "ref" / "train_images").iterdir())
    assert sorted(p.name for p in (cut / "train_images").iterdir()) == ref_images, why
    for name in ref_images:
        assert (cut / "train_images" / name).read_bytes() == (tmp_path / "ref" / "train_images" / name).read_bytes()
    assert (cut / "augmented_train.csv").read_bytes() == (tmp_path / "ref" / "augmented_train.csv").read_bytes()
    assert no_temporary_files(cut) == [], why


def test_ensemble_killed_then_rerun_chooses_the_same_weights(tiny_data, tiny_run, tmp_path, seed):
    def copy_oof(dst):
        """What ensemble.py reads from the run folder, and nothing it writes."""
        shutil.rmtree(dst, ignore_errors=True)
        for src in [tiny_run / "schema.json", tiny_run / "folds.csv", tiny_run / "labels.json",
                    *tiny_run.glob("*/fold*/oof_logits.npz"),
                    *tiny_run.glob("*/fold*/metrics.json"), *tiny_run.glob("*/fold*/best.pt")]:
            (dst / src.relative_to(tiny_run)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst / src.relative_to(tiny_run))

    def args(out):
        return ["ensemble.py", "--data-dir", str(tiny_data), "--out-dir", str(out), "--sto-population", "6",
                "--sto-iterations", "3", "--progress", "false"]

    marker = "ensemble of 2 run(s)"
    copy_oof(tmp_path / "ref")
    warm = warm_process("ensemble.py")
    reference_s = run_script(*args(tmp_path / "ref"), marker=marker).after_marker_s
    cut = tmp_path / "cut"
    delay = kill_midway(args(cut), marker, reference_s, lambda: copy_oof(cut), seed, warm)
    why = f"killed {delay:.2f} s after {marker!r} (seed {seed})"
    assert_complete(cut)
    run_script(*args(cut))
    a, b = (json.loads((d / "ensemble.json").read_text()) for d in (tmp_path / "ref", cut))
    for key in ("models", "method", "bias", "weights", "biases", "nested_cv_score", "oof_score_in_sample"):
        assert a[key] == b[key], f"{key}: {why}"
    assert no_temporary_files(cut) == [], why


def test_infer_killed_then_rerun_writes_the_same_submission(tiny_data, tiny_run, tmp_path, seed):
    def args(output):
        return ["infer.py", "--data-dir", str(tiny_data), "--out-dir", str(tiny_run), "--output", str(output),
                "--backend", "torch", "--batch-size", "2", "--workers", "1"]

    marker = "infer:"  # the progress bar starts with the first batch
    warm = warm_process("infer.py")
    reference_s = run_script(*args(tmp_path / "ref.csv"), marker=marker).after_marker_s
    reference = (tmp_path / "ref.csv").read_bytes()
    cut = tmp_path / "out" / "submission.csv"
    old = b"id,Category,len\n"  # a previous submission, to be replaced whole or kept whole

    def reset():
        cut.parent.mkdir(exist_ok=True)
        cut.write_bytes(old)

    delay = kill_midway(args(cut), marker, reference_s, reset, seed, warm)
    why = f"killed {delay:.2f} s after {marker!r} (seed {seed})"
    assert cut.read_bytes() in (old, reference), why
    run_script(*args(cut))
    assert cut.read_bytes() == reference, why
    assert no_temporary_files(cut.parent) == [], why


def test_tune_worker_killed_midtrial_is_failed_and_its_parameters_retried(tiny_data, tmp_path):
    import optuna

    from tests.test_tune import tiny_args

    storage = f"sqlite:///{tmp_path}/study.db"
    args = ["tune.py", *tiny_args(tiny_data, tmp_path / "run", "--epochs", "2", "--n-trials", "1",
                                  "--storage", storage, "--study-name", "s", "--heartbeat", "1", "--pruner", "none",
                                  "--batch-size", "16", "--tuned-config", str(tmp_path / "t.yaml"))]
    rc, output, _ = launch(args, "epoch 1/2", kill_after=0.0)
    assert rc == -signal.SIGKILL, output[-3000:]
    # past the grace period (2 x heartbeat) since the last heartbeat, which came before the kill, as SQLite
    # sees it: its clock (CURRENT_TIMESTAMP) has whole seconds, so only 3 s of waiting make a gap of more than 2
    time.sleep(3.25)
    run_script(*args)
    killed, retried = optuna.load_study(study_name="s", storage=storage).trials
    assert killed.state == optuna.trial.TrialState.FAIL
    assert retried.state == optuna.trial.TrialState.COMPLETE
    assert retried.params == killed.params and retried.system_attrs["failed_trial"] == killed.number
    trials = pd.read_csv(tmp_path / "run" / "tune" / "s" / "trials.csv", keep_default_na=False)
    assert "its worker stopped before the trial ended" in trials.fail_reason[0]
    assert trials.fail_reason[1] == ""

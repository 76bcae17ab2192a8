import json
import os
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from tests.conftest import ROOT, run_script
from utils.config import parse_config
from utils.errors import DataError, NonFiniteLoss
from utils.train import kfold, tune


def tiny_args(data, out, *extra):
    return ["--model", "test_resnet", "--data-dir", str(data), "--out-dir", str(out), "--config",
            "configs/tune_tiny.yaml", "--img-size", "32", "--epochs", "1", "--workers", "0", *extra]


def fake_train_fold(cfg, schema, table, data, fold, d, report=None, root=None):
    """Stands in for utils.train.kfold.train_fold: good trials score 0.8 every epoch, bad ones 0.1, and a
    learning rate above 0.5 makes the loss non-finite."""
    if cfg.lr_head > 0.5:
        raise NonFiniteLoss("loss is nan at step 3")
    score = 0.8 if cfg.lr_head > 1e-3 else 0.1
    for epoch in range(cfg.epochs):
        report(epoch, score)
    return {"val_score": score}


@pytest.fixture
def lr_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr_head: {type: float, low: 1.0e-6, high: 1.0, log: true}\n")
    return path


def _study(tmp_path, lr_values):
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for lr in lr_values:
        study.enqueue_trial({"lr_head": lr})
    return storage


@pytest.mark.slow
def test_pruning_stops_a_clearly_worse_trial(tiny_data, tmp_path, lr_space, monkeypatch):
    monkeypatch.setattr(kfold, "train_fold", fake_train_fold)
    storage = _study(tmp_path, [0.01, 0.02, 0.03, 1e-5])
    cfg = parse_config(tune.TuneConfig, tiny_args(tiny_data, tmp_path, "--n-trials", "4", "--epochs", "5",
                                                  "--space", str(lr_space), "--storage", storage,
                                                  "--study-name", "s", "--tuned-config", str(tmp_path / "t.yaml")))
    study = tune.tune(cfg)
    last = study.trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED
    assert len(last.intermediate_values) == 1  # stopped after its first epoch, not 5
    assert all(len(t.intermediate_values) == 5 for t in study.trials[:3])


@pytest.mark.slow
def test_a_failing_trial_leaves_the_study_usable(tiny_data, tmp_path, lr_space, monkeypatch):
    monkeypatch.setattr(kfold, "train_fold", fake_train_fold)
    storage = _study(tmp_path, [0.9, 0.01, 0.02])
    cfg = parse_config(tune.TuneConfig, tiny_args(tiny_data, tmp_path, "--n-trials", "3", "--pruner", "none",
                                                  "--space", str(lr_space), "--storage", storage,
                                                  "--study-name", "s", "--tuned-config", str(tmp_path / "t.yaml")))
    study = tune.tune(cfg)
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert "loss is nan" in study.trials[0].user_attrs["fail_reason"]
    assert states[1:] == [optuna.trial.TrialState.COMPLETE] * 2
    assert yaml.safe_load((tmp_path / "t.yaml").read_text())["lr_head"] in (0.01, 0.02)
    trials_csv = (tmp_path / "tune" / "s" / "trials.csv").read_text()
    assert "loss is nan" in trials_csv


def test_space_keys_must_be_train_keys(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("learning_rate: {type: float, low: 0.1, high: 1}\n")
    with pytest.raises(ValueError, match="'learning_rate' is not a train.py config key"):
        tune.load_space(str(bad))


@pytest.mark.slow
def test_three_workers_started_in_the_same_instant_on_a_fresh_storage_all_run(tiny_data, tmp_path):
    """The README's pattern with every worker released at once (after its imports, so that they
    meet at the storage's creation): two new processes and this one, on a fresh SQLite file, then
    (the same processes, their imports paid once) on a fresh journal file. None crashes, and each
    study holds the sum of their trials."""
    storages = {"sqlite": f"sqlite:///{tmp_path}/study.db", "journal": f"journal:{tmp_path}/study.journal"}
    runs = {kind: tiny_args(tiny_data, tmp_path / kind, "--n-trials", "1", "--storage", storage, "--study-name",
                            "s", "--pruner", "none", "--tuned-config", str(tmp_path / f"{kind}.yaml"),
                            "--batch-size", "16") for kind, storage in storages.items()}
    code = ("import json, os, sys, time\nfrom utils.train import tune\nfrom utils.config import run_command\n"
            "for kind, args in json.loads(sys.argv[1]).items():\n"
            "    open(os.environ['READY'] + kind, 'w').close()\n"
            "    while not os.path.exists(os.environ['GO'] + kind): time.sleep(0.001)\n"
            "    sys.argv = ['tune.py', *args]\n"
            "    run_command(tune.tune, tune.TuneConfig, tune.__doc__, model_config=True)\n"
            "    open(os.environ['READY'] + kind + '.done', 'w').close()\n")
    workers = []
    for k in range(2):
        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
               "READY": str(tmp_path / f"ready{k}_"), "GO": str(tmp_path / "go_"),
               "KIT_CACHE_DIR": os.environ["KIT_CACHE_DIR"]}  # amp auto's timings: not in the user's home
        workers.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(runs)], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def wait_for(step: str):  # every worker's file of this step (a worker that ended without it: its output)
        files = [tmp_path / f"ready{k}_{step}" for k in range(2)]
        deadline = time.monotonic() + 300
        while not all(f.exists() or w.poll() is not None for f, w in zip(files, workers)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(f.exists() for f in files), [(w.returncode, *(o[-3000:] for o in w.communicate()))
                                                for f, w in zip(files, workers) if not f.exists()]

    try:
        for kind, storage in storages.items():
            wait_for(kind)
            (tmp_path / f"go_{kind}").touch()
            run_script("tune.py", *runs[kind])  # the third worker
            wait_for(f"{kind}.done")
            study = optuna.load_study(study_name="s", storage=tune.make_storage(storage))
            assert sorted(t.number for t in study.trials) == [0, 1, 2], kind  # 1 + 1 + 1, none lost
            assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), kind
            tuned = tmp_path / f"{kind}.yaml"
            best = yaml.safe_load(tuned.read_text())
            assert best["model"] == "test_resnet" and set(best) - {"model"} == set(tune.load_space("configs/tune_space.yaml"))
            study_dir = tmp_path / kind / "tune" / "s"
            assert (study_dir / "trials.csv").is_file() and (study_dir / "history.png").stat().st_size > 0
            assert not list(study_dir.glob(".*.tmp"))
        for w in workers:
            out, err = w.communicate(timeout=600)
            assert w.returncode == 0, err[-3000:]
    finally:  # a worker left waiting for a step that will not come is stopped
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    # the written YAML is a train.py config as it is
    run_script("train.py", "--config", str(tmp_path / "journal.yaml"), "--data-dir", str(tiny_data), "--out-dir",
               str(tmp_path / "final"), "--n-folds", "3", "--img-size", "32", "--epochs", "1", "--fold", "0",
               "--workers", "0", "--progress", "false")
    assert (tmp_path / "final" / "test_resnet" / "fold0" / "oof_logits.npz").is_file()


def test_a_search_in_which_no_trial_completed_exits_non_zero(tiny_data, tmp_path, lr_space, monkeypatch):
    """Every trial failed: the command says why and fails (status 2), as any other kit error."""
    monkeypatch.setattr(kfold, "train_fold", fake_train_fold)
    storage = _study(tmp_path, [0.9, 0.8])
    proc = run_script("tune.py", *tiny_args(tiny_data, tmp_path, "--n-trials", "2", "--space", str(lr_space),
                                            "--storage", storage, "--study-name", "s",
                                            "--tuned-config", str(tmp_path / "t.yaml")), check=False)
    assert proc.returncode == 2
    assert "error: study s: no trial completed (2 x NonFiniteLoss: loss is nan at step 3)" in proc.stderr
    assert not (tmp_path / "t.yaml").exists() and (tmp_path / "tune" / "s" / "trials.csv").is_file()


@pytest.mark.slow
def test_a_students_search_takes_its_teacher_from_the_run_folder_of_the_folds(tiny_run, tiny_data, tmp_path):
    """tune.py --teacher: each trial (in tune/<study>/trialNNNN) learns from the teacher in the run
    folder its folds come from, honestly, and completes."""
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    proc = run_script("tune.py", *tiny_args(tiny_data, run, "--n-folds", "3", "--n-trials", "1", "--study-name", "st",
                                            "--teacher", str(run / "ensemble.json"), "--distill-test", "false",
                                            "--tuned-config", str(tmp_path / "t.yaml")))
    assert "1 trials {'COMPLETE': 1}" in proc.stdout
    assert (run / "tune" / "st" / "trial0000" / "test_resnet" / "fold0" / "metrics.json").is_file()
    assert (run / "test_byobnet" / "fold0" / "infold_logits.npz").is_file()  # the honest targets were made
    assert yaml.safe_load((tmp_path / "t.yaml").read_text())["model"] == "test_resnet"


def test_a_storage_whose_driver_is_missing_says_which_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psycopg(name, *args, **kwargs):
        if name.split(".")[0] == "psycopg":
            raise ModuleNotFoundError("No module named 'psycopg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(DataError, match=r"--storage postgresql://kit@127\.0\.0\.1:1/tune: its database driver is not "
                                        r"installed \(No module named 'psycopg'\); for PostgreSQL `pip install"):
        tune.make_storage("postgresql://kit@127.0.0.1:1/tune")


def _postgres_error(sqlstate_error, message):
    """The SQLAlchemy error a worker gets from PostgreSQL (psycopg) for a CREATE TABLE."""
    import sqlalchemy.exc

    wrap = sqlalchemy.exc.IntegrityError if sqlstate_error.__name__ == "UniqueViolation" else \
        sqlalchemy.exc.ProgrammingError
    return wrap("CREATE TABLE studies (...)", {}, sqlstate_error(message))


@pytest.mark.parametrize("error", ["DuplicateTable", "DuplicateObject", "UniqueViolation"])
def test_a_worker_that_loses_the_race_to_create_postgresql_tables_retries(monkeypatch, error):
    """Workers that start together on an empty PostgreSQL database race to create Optuna's tables;
    each way of losing (seen on a real server: a unique violation while both create, a table or
    type that already exists when the winner committed between the loser's check and its CREATE)
    is retried; a real SQL error is not."""
    import psycopg.errors

    calls = []

    def create_study(**kwargs):
        calls.append(kwargs["study_name"])
        if len(calls) == 1:
            raise _postgres_error(getattr(psycopg.errors, error), 'relation "studies" already exists')
        return "study"

    monkeypatch.setattr(optuna, "create_study", create_study)
    monkeypatch.setattr(tune, "make_storage", lambda url, heartbeat: None)
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)
    assert tune.open_study("s", "postgresql://kit@db/tune", 60, "none", 2) == "study" and calls == ["s", "s"]

    calls.clear()
    denied = _postgres_error(psycopg.errors.InsufficientPrivilege, "permission denied for schema public")
    monkeypatch.setattr(optuna, "create_study", lambda **kwargs: calls.append(1) or (_ for _ in ()).throw(denied))
    with pytest.raises(type(denied), match="permission denied"):
        tune.open_study("s", "postgresql://kit@db/tune", 60, "none", 2)
    assert calls == [1]

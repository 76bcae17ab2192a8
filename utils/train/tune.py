"""Optuna hyperparameter search on the real training code (``python tune.py``), shareable by many
workers.

Every train.py key works here too (they are the base of each trial). The objective is the
competition score on the fold's validation rows, from ``utils.train.kfold.train_fold`` itself, reported after
every epoch so the pruner (median or Hyperband, ``--pruner``) can stop a bad trial early. The
search space is ``configs/tune_space.yaml`` (``--space``). A trial that fails (non-finite loss,
out of memory, ...) is recorded as failed with its reason and the study goes on; a worker none of
whose study's trials completed fails (status 2) with their reasons. A trial trains in its own
folder but takes the folds, a student's ``--teacher`` and the decode and embedding caches from
``--out-dir``, the run folder they came from.

Writes: the best parameters as ``configs/tuned_<model>.yaml`` (``--tuned-config``), which
``train.py --config`` takes as it is; under ``<out-dir>/tune/<study>/``: one folder per trial,
``trials.csv``, ``history.png`` and ``importances.png``.

With an RDB storage, a worker killed mid-trial leaves no trial running forever: once its
heartbeats stop for ``2 * --heartbeat`` seconds, the next trial of any worker marks it failed and
retries its parameters once. (A journal file has no heartbeats: there such a trial stays RUNNING.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from utils.config import load_yaml, option
from utils.data.schema import read_dataset
from utils.errors import DataError, NonFiniteLoss, SearchFailed
from utils.io import atomic_write_csv, atomic_write_text
from utils.plots import pyplot, save_figure
from utils.run import RunDir
from utils.train import kfold
from utils.train.config import TrainConfig
from utils.train.distributed import Dist


@dataclass
class TuneConfig(TrainConfig):
    n_trials: int = option(20, "trials for this worker")
    timeout: Optional[float] = option(None, "seconds for this worker")
    storage: Optional[str] = option(None, "sqlite:///x.db, journal:PATH, postgresql://..., mysql://... "
                                          "(default: in memory, one worker)")
    study_name: Optional[str] = option(None, "default <name or model>_fold<k>")
    space: str = option("configs/tune_space.yaml", "the search space (YAML)")
    pruner: str = option("median", "stops a trial early when its epochs score below the others'",
                         choices=("median", "hyperband", "none"))
    tuned_config: Optional[str] = option(None, "where to write the best parameters "
                                               "(default configs/tuned_<model>.yaml)")
    heartbeat: int = option(60, "RDB storages: seconds between a running trial's heartbeats; a trial silent "
                                "for twice that (its worker was killed) is failed and its parameters retried once")


FAILURES = (NonFiniteLoss, RuntimeError, MemoryError, ValueError)  # a failed trial, not a failed study
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_space(path: str) -> dict:
    """{key: spec}; every key must be a train.py config key."""
    space = load_yaml(path)
    for key, spec in space.items():
        if key not in TRAIN_KEYS:
            raise ValueError(f"{path}: '{key}' is not a train.py config key")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ValueError(f"{path}: '{key}' needs type float, int or categorical")
    return space


def suggest(trial, space: dict) -> dict:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
        else:
            params[key] = trial.suggest_categorical(key, spec["choices"])
    return params


def make_storage(url: str | None, heartbeat: int = 60):
    """A journal file (``journal:PATH``) for shared file systems; any other URL goes to Optuna's
    RDB storage (sqlite, PostgreSQL, MySQL), with heartbeats: the next trial of any worker marks a
    trial silent for ``2 * heartbeat`` seconds as failed, and retries its parameters once."""
    import optuna

    if not url:
        return None
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                              heartbeat_stale_trial_callback=retry)
        except ImportError as err:  # the database's driver (psycopg for postgresql://, in requirements.txt)
            raise DataError(f"--storage {url}: its database driver is not installed ({err.__cause__ or err}); for "
                            f"PostgreSQL `pip install 'psycopg[binary]'`, for MySQL `pip install pymysql` and a "
                            f"mysql+pymysql:// URL") from None


def storage_file(url: str | None) -> Path | None:
    """The local file behind a storage URL (a journal or a sqlite database), else None."""
    if url and url.startswith("journal:"):
        return Path(url[len("journal:"):])
    if url and url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


@contextlib.contextmanager
def storage_lock(url: str | None):
    """Workers that start together on one local storage file open it one at a time (an exclusive
    lock on ``<file>.open.lock``), so only the first creates its tables and the study."""
    path = storage_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".open.lock"), "a") as lock:  # not <file>.lock: optuna's journal lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_study(study_name: str, storage: str | None, heartbeat: int, pruner: str, epochs: int, attempts: int = 8):
    """Create the study, or load it when another worker did. Workers started at the same instant
    on a fresh storage race to create its tables and the study: on a local file they take turns
    (``storage_lock``); on a database server the loser of a race retries after a random wait. The
    losers' errors depend on when they lost: a unique violation while both create a table, or (on
    PostgreSQL) a table or type that "already exists" when the winner committed between their check
    and their CREATE."""
    import optuna
    import sqlalchemy.exc

    races = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
             optuna.exceptions.DuplicatedStudyError)
    for attempt in range(attempts):
        try:
            with storage_lock(storage):
                return optuna.create_study(study_name=study_name, storage=make_storage(storage, heartbeat),
                                           direction="maximize", load_if_exists=True,
                                           sampler=optuna.samplers.TPESampler(seed=None),
                                           pruner=make_pruner(pruner, epochs))
        except races as err:
            if isinstance(err, sqlalchemy.exc.ProgrammingError) and "already exists" not in str(err):
                raise  # a real SQL error (permissions, a schema from another Optuna), not a lost race
            if attempt == attempts - 1:
                raise DataError(f"could not open study {study_name!r} in {storage} after {attempts} attempts: "
                                f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
            time.sleep(random.uniform(0.1, 0.5) * 2 ** attempt)


def fail_reason(trial) -> str:
    """Why a failed trial failed: the error it raised, or else its worker stopped mid-trial."""
    if trial.state.name != "FAIL":
        return ""
    return trial.user_attrs.get("fail_reason") or "its worker stopped before the trial ended (killed?)"


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    return optuna.pruners.NopPruner()


def objective_for(cfg: TuneConfig, space: dict, study_dir: Path, fold: int):
    """The objective: one fold trained by the fold trainer with the trial's parameters."""
    import optuna

    data = read_dataset(cfg.data_dir, cfg.train_csv)
    cfg.check_data(data)  # before any trial decodes an image
    run_dir = RunDir(cfg.out_dir)  # the folds, a student's teacher and the decode cache: every trial's
    schema, table = run_dir.prepare(data, cfg.n_folds, cfg.seed)
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k in TRAIN_KEYS}

    def objective(trial) -> float:
        params = suggest(trial, space)
        trial_cfg = TrainConfig(**{**base, **params, "out_dir": str(study_dir / f"trial{trial.number:04d}"),
                                         "name": cfg.run_name, "resume": False, "predict_test": False})

        def report(epoch: int, score: float) -> None:
            trial.report(score, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (val score {score:.4f})")

        try:
            metrics = kfold.train_fold(trial_cfg, schema, table, data, fold, Dist(), report=report, root=run_dir)
        except FAILURES as err:  # recorded with the trial; study.optimize(catch=...) then goes on
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            raise
        return float(metrics["val_score"])

    return objective


def tune(cfg: TuneConfig):
    """What ``python tune.py`` does: one worker's trials on the study, then its table, config and plots."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.fold == "all":
        raise ValueError("tune.py tunes on one fold: pass --fold K")
    fold = int(cfg.fold)
    space = load_space(cfg.space)
    study_name = cfg.study_name or f"{cfg.run_name}_fold{fold}"
    study_dir = Path(cfg.out_dir) / "tune" / study_name
    study = open_study(study_name, cfg.storage, cfg.heartbeat, cfg.pruner, cfg.epochs)
    study.optimize(objective_for(cfg, space, study_dir, fold), n_trials=cfg.n_trials, timeout=cfg.timeout,
                   catch=FAILURES, gc_after_trial=True)

    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    trials["fail_reason"] = trials["number"].map({t.number: fail_reason(t) for t in study.trials})
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(study_dir / "trials.csv", trials)
    states = trials["state"].value_counts().to_dict()
    complete = trials[trials["state"] == "COMPLETE"].sort_values("value", ascending=False)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(f"\nstudy {study_name}: {len(trials)} trials {states}")
        print(complete.head(5).drop(columns=["fail_reason"], errors="ignore").to_string(index=False))
    if complete.empty:
        reasons = trials.loc[trials["fail_reason"] != "", "fail_reason"].value_counts()
        why = "; ".join(f"{n} x {reason}" for reason, n in reasons.head(3).items()) or "every trial was pruned"
        raise SearchFailed(f"study {study_name}: no trial completed ({why}); every trial is in "
                           f"{study_dir / 'trials.csv'}")
    best = {"model": cfg.model, **study.best_params}
    out = Path(cfg.tuned_config or Path("configs") / f"tuned_{cfg.model}.yaml")
    atomic_write_text(out, f"# tune.py study {study_name}: best val score {study.best_value:.4f} "
                           f"(trial {study.best_trial.number})\n" + yaml.safe_dump(best, sort_keys=False))
    save_plots(study, study_dir)
    print(f"best val score {study.best_value:.4f}; wrote {out} (use: python train.py --config {out})")
    return study


def save_plots(study, study_dir: Path) -> None:
    import optuna.visualization.matplotlib as ovm

    pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, plot in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances)):
            try:
                save_figure(plot(study).figure, study_dir / f"{name}.png", bbox_inches="tight")
            except (ValueError, RuntimeError) as err:  # e.g. importances need two complete trials
                print(f"{name}.png not written: {err}")


"""Training every fold of a run: what ``python train.py`` does, and what ``tune.py`` calls for each
trial (``train_fold``). A fold (``utils.train.fold.Fold``: rows, model, record, outputs) is
fine-tuned by ``utils.train.trainer.FoldTrainer``, or, with ``frozen_backbone: true``, its heads
trained on cached embeddings by ``utils.train.frozen.FrozenFold``; either route runs through the one
epoch loop, ``fit``, which reads top to bottom.
"""
from __future__ import annotations

import json
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import pandas as pd
import torch

from utils.blend import load_oof
from utils.data.schema import ID, Dataset, Schema, read_dataset
from utils.io import atomic_write_json
from utils.metric import score_logits, summarize
from utils.run import RunDir
from utils.train.config import TrainConfig
from utils.train.distributed import Dist, setup_distributed, teardown
from utils.train.fold import Fold
from utils.train.frozen import FrozenFold
from utils.train.model import group_lrs
from utils.train.throughput import configure_device
from utils.train.trainer import FoldTrainer

Report = Callable[[int, float], Optional[int]]  # (epoch, val score) -> the fold's epochs in all as they now stand,
# or None: unchanged


def train_fold(cfg: TrainConfig, schema: Schema, train: pd.DataFrame, data: Dataset, fold: int, d: Dist,
               report: Report | None = None, root: RunDir | None = None) -> dict:
    """Train one fold into ``<out_dir>/<name>/fold<k>``; write its outputs; return its metrics
    (``{"stopped": True, ...}`` after ``stop_after``). A complete fold is skipped under ``resume``.
    ``root``: the run folder of the folds, the teacher and the caches, when it is not ``out_dir``
    (a tune.py trial trains in a folder of its own inside it)."""
    out = RunDir(cfg.out_dir)
    if cfg.resume and out.fold_complete(cfg.run_name, fold):
        done = json.loads(out.fold_file(cfg.run_name, fold, "metrics.json").read_text())
        if d.main:
            print(f"fold {fold}: already complete (val score {done['val_score']:.4f}); skipped")
        return done
    shared = Fold(cfg, schema, train, data, fold, d, root or out, out.fold_dir(cfg.run_name, fold))
    try:
        return fit(shared, (FrozenFold if cfg.frozen_backbone else FoldTrainer)(shared), report)
    finally:
        shared.close()


class BestEpoch(NamedTuple):
    """The best epoch of this process: its validation rows' logits (the OOF logits when no later
    epoch beats it) and, for a route that checkpoints once at the end, its weights."""
    epoch: int
    score: float
    idx: np.ndarray
    logits: np.ndarray
    weights: dict | None


def fit(f: Fold, route, report: Report | None = None) -> dict:
    """The epoch loop of one fold, for either route (``FoldTrainer`` or ``FrozenFold``): resume, then
    each epoch trains (the route's steps), validates (the route's predictions), is recorded, keeps
    the best weights, checkpoints, is reported and may stop the loop (patience, ``stop_after``); then
    the best checkpoint predicts the validation rows (OOF) and the test set, and the fold's files are
    written. ``report(epoch, val score)``: tune.py prunes with it (and returns None); fit.py returns
    the fold's epochs as its time now allows: no more than this epoch ends training as patience does
    (the best epoch's weights predict), and while epochs are left, another count retargets the
    schedule (``route.retarget``: the learning rate goes on from where it is to the new end)."""
    cfg, d = f.cfg, f.d
    f.resume(route.optimizer, route.scheduler, route.scaler)
    best = None  # this process's best epoch
    ran, stopped, epoch = 0, False, f.state["epoch"] + 1
    while epoch < route.epochs:
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same with or without resume
        stats = route.train_epoch(epoch)
        f.check_bad()
        idx, logits = route.validate(f.scored)
        val_score, _ = score_logits(f.schema, f.val_targets[idx], logits)
        improved = f.record(epoch, stats, val_score, group_lrs(route.optimizer))
        if improved:
            weights = None if route.save_each_epoch else {k: v.clone() for k, v in f.scored.state_dict().items()}
            best = BestEpoch(epoch, val_score, idx, logits, weights)
        if route.save_each_epoch and d.main:
            if improved:
                f.save_best(f.scored.state_dict(), epoch, val_score)
            f.save_last(route.optimizer, route.scheduler, route.scaler)
        f.log(f"fold {f.fold} epoch {epoch + 1}/{route.epochs}: loss {stats['loss']:.4f}  val {val_score:.4f}"
              f"{' *' if improved else ''}  {stats['images_per_s'] * d.world:.1f} img/s "
              f"(waiting for data {stats['data_wait']:.0%})")
        ran += 1
        epochs = report(epoch, val_score) if report is not None else None
        if epochs is not None and epochs != route.epochs and epoch + 1 < route.epochs:
            if epochs <= epoch + 1:
                f.log(f"stopped after epoch {epoch + 1}: its time is up (the best epoch's weights predict)")
                break
            f.log(f"epochs {route.epochs} -> {epochs}, as the time left allows: the schedule goes on from here")
            route.retarget(epochs)
        if cfg.patience and f.state["bad_epochs"] >= cfg.patience:
            f.log(f"early stop, no improvement for {cfg.patience} epochs")
            break
        if cfg.stop_after and ran >= cfg.stop_after and epoch + 1 < route.epochs:
            f.log(f"stopped after {ran} epoch(s) (stop_after); continue with --resume")
            stopped = True
            break
        epoch += 1
    if not route.save_each_epoch and d.main:  # the checkpoints once, when training stops
        if best is not None:  # (none when a resumed fold had no epoch left to train)
            f.save_best(best.weights, best.epoch, best.score)
        f.save_last(route.optimizer, route.scheduler, route.scaler)
    if stopped:  # with this call's best epoch's validation logits (fit.py's rate search compares them)
        val = {} if best is None else {"val_idx": best.idx, "val_logits": best.logits,
                                       "val_targets": f.val_targets[best.idx]}
        return {"stopped": True, **f.state, **val}

    d.barrier()  # best.pt is written
    reuse = best is not None and best.epoch + 1 == f.state["best_epoch"] and not cfg.tta_hflip
    model = route.best_model() if cfg.predict_test or not reuse else None
    if reuse:
        idx, oof = best.idx, best.logits  # best.pt holds the weights that made these logits: no second pass
    else:
        idx, oof = route.validate(model, mirror=cfg.tta_hflip)
    test = route.predict_test(model, mirror=cfg.tta_hflip) if cfg.predict_test else None
    return f.write_outputs(idx, oof, test)


# ----------------------------------------------------------------------------- every fold

def print_table(title: str, table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 140, "display.max_rows", 200,
                           "display.float_format", "{:.4f}".format):
        print(f"\n{title}\n{table.to_string(index=False)}")


def report_oof(run_dir: RunDir, run: str, train: pd.DataFrame) -> float | None:
    """When every fold of a run is complete: its OOF score over the whole train set, printed and
    written to ``<run>/oof_score.json`` (flagged when the run is an optimistic student, whose
    validation labels reached it through its teacher: utils/train/distill.py)."""
    if run not in run_dir.complete_runs():
        return None
    rows = run_dir.train_rows(train)
    logits = load_oof(run_dir, [run], rows[ID].to_numpy())[0]  # checks coverage
    final, table = score_logits(run_dir.schema, run_dir.schema.encode(rows), logits)
    _, per_cat = summarize(table)
    print_table(f"{run}: OOF over {len(rows)} train rows ({run_dir.n_folds} folds)", per_cat)
    note = run_dir.optimistic_note(run)
    print(f"{run} OOF score: {final:.4f}" + (f" ({note}: not comparable with other runs' scores)" if note else ""))
    atomic_write_json(run_dir.path / run / "oof_score.json",
                      {"oof_score": final, "optimistic": bool(note), "per_category": per_cat.to_dict(orient="records")})
    return final


def folds_to_train(fold: str, n_folds: int) -> list[int]:
    """``--fold``'s folds: every one of ``n_folds`` for "all", else the one it names."""
    folds = list(range(n_folds)) if fold == "all" else [int(fold)] if fold.isdigit() else [-1]
    if any(not 0 <= k < n_folds for k in folds):
        raise ValueError(f"fold must be 'all' or in 0..{n_folds - 1}, got {fold!r}")
    return folds


def train(cfg: TrainConfig, data: Dataset | None = None, report: Report | None = None) -> dict:
    """What ``python train.py`` does: prepare the run folder, train the folds asked for, print the
    per-fold table and, once every fold is done, the run's OOF score. ``data``: the dataset, when
    the caller has read it already; ``report``: called after every epoch of every fold (``fit``)."""
    data = read_dataset(cfg.data_dir, cfg.train_csv) if data is None else data
    cfg.check_data(data)
    d = setup_distributed(cfg.device)
    configure_device(d, cfg.cudnn_benchmark)
    folds = folds_to_train(cfg.fold, cfg.n_folds)
    run_dir = RunDir(cfg.out_dir)
    if d.main:  # rank 0 fits and writes schema.json and folds.csv; the others read them
        schema, table = run_dir.prepare(data, cfg.n_folds, cfg.seed)
    d.barrier()
    if not d.main:
        schema, table = run_dir.prepare(data, cfg.n_folds, cfg.seed)
    start = time.perf_counter()
    results = {k: train_fold(cfg, schema, table, data, k, d, report) for k in folds}
    if d.main:
        rows = [{"fold": k, "val_score": r.get("val_score", r.get("best_score")), "best_epoch": r.get("best_epoch")}
                for k, r in results.items()]
        print_table(f"{cfg.run_name}: folds ({time.perf_counter() - start:.0f} s)", pd.DataFrame(rows))
        report_oof(run_dir, cfg.run_name, table)
    teardown(d)
    return results

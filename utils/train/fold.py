"""One fold of a run: what both training routes share. ``Fold`` holds the fold's rows, its model
and preprocessing, what it trains on (a student's teacher targets included), the record of its
epochs, its checkpoints and the files it writes. The epoch loop (``utils/train/kfold.py``, ``fit``)
is written once for both routes: ``utils/train/trainer.py`` fine-tunes on images (``FoldTrainer``),
``utils/train/frozen.py`` trains heads on cached embeddings (``FrozenFold``).

Writes, in <out_dir>/<name>/fold<k>/ (name defaults to the model; see utils/run.py):
  best.pt            the best checkpoint; describes itself (model, args, preprocessing, schema)
  last.pt            the latest epoch's full state, for --resume
  oof_logits.npz     logits of the fold's validation rows, with their ids (utils/io.py)
  test_logits.npz    logits of every test row, with their ids
  history.csv/.png   one row per epoch: loss, val score, learning rates, images/s, data wait
  metrics.json       best epoch, val score, per-head table, bad images by split and id (written last)
  config.yaml        the resolved config
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from timm.utils import ModelEmaV3

from utils import provenance
from utils.config import save_config
from utils.data.schema import CATEGORY, ID, Dataset, Schema, row_paths
from utils.data.transforms import Preprocess
from utils.errors import ConfigError, DataError
from utils.io import atomic_torch_save, atomic_write_csv, atomic_write_json, load_torch, save_logits
from utils.metric import score_logits
from utils.plots import history_plot
from utils.run import RunDir
from utils.train.config import TrainConfig
from utils.train.distill import DistillLoss, prepare_teacher, student_rows
from utils.train.distributed import Dist
from utils.train.engine import amp_dtype
from utils.train.model import AttributeModel, HeadLoss, data_config, retarget
from utils.train.precision import measured_dtype
from utils.train.throughput import loader_workers, use_channels_last
from utils.train.tracking import Tracker


def model_args(cfg: TrainConfig, schema: Schema, knn_bank: int = 0) -> dict:
    """The arguments that rebuild the model from a checkpoint alone (``knn_bank``: the number of
    train rows a kNN head votes over)."""
    args = {"backbone": cfg.model, "head_widths": [h.width for h in schema.heads], "dropout": cfg.dropout,
            "drop_path_rate": cfg.drop_path_rate, "img_size": cfg.img_size, "keep_head": cfg.keep_head,
            "head": cfg.head, "head_hidden": cfg.head_hidden, "model_kwargs": dict(cfg.model_kwargs)}
    return {**args, "knn_bank": knn_bank, "knn_k": cfg.knn_k} if cfg.head == "knn" else args


# keys a resumed fold may take anew: how long and where it runs, not what it learns
SAFE_ON_RESUME = ("epochs", "fold", "resume", "stop_after", "patience", "workers", "device", "progress", "log",
                  "compile", "cudnn_benchmark", "decode_cache", "predict_test", "max_bad_images", "data_dir", "out_dir")


def check_resumable(cfg: TrainConfig, saved: Path) -> None:
    """``--resume`` continues the run that ``saved`` (its fold's config.yaml) records: a key outside
    SAFE_ON_RESUME that differs is an error naming it, before config.yaml is overwritten."""
    if not saved.is_file():
        return
    import yaml

    before, now = yaml.safe_load(saved.read_text()) or {}, dataclasses.asdict(cfg)
    changed = [k for k in now if k not in SAFE_ON_RESUME and k in before and before[k] != now[k]]
    if changed:
        diffs = "; ".join(f"{k}: {before[k]!r} then, {now[k]!r} now" for k in changed[:6])
        raise ConfigError(f"--resume would continue {saved.parent} with another config ({diffs}). Only "
                          f"{', '.join(SAFE_ON_RESUME)} may change on resume; start a new run (--name) "
                          f"or train this one anew (no --resume)")


def named(keys) -> str:
    """'train id 5, test id 7' for (split, id) keys."""
    return ", ".join(f"{split} id {i}" for split, i in keys)


def split_fold(train: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of a fold. Augmented copies carry their source's fold, so a
    copy of a validation image is never trained on; and only original images are validated."""
    is_original = (train["source_id"] == train[ID]) if "source_id" in train else pd.Series(True, index=train.index)
    trn = train[train["fold"] != fold].reset_index(drop=True)
    val = train[(train["fold"] == fold) & is_original].reset_index(drop=True)
    return trn, val


class Fold:
    """One fold's shared parts: rows, model, training targets, record, checkpoints and outputs."""

    def __init__(self, cfg: TrainConfig, schema: Schema, train: pd.DataFrame, data: Dataset, fold: int,
                 d: Dist, run_dir: RunDir, folder: Path | None = None):
        """``run_dir``: the run folder of the folds, the teacher and the caches; ``folder``: where
        the fold writes (default ``run_dir``'s ``<name>/fold<k>``; a tune.py trial's is its own)."""
        self.cfg, self.schema, self.data, self.fold, self.d = cfg, schema, data, fold, d
        self.run_dir, self.dir = run_dir, folder or run_dir.fold_dir(cfg.run_name, fold)
        torch.manual_seed(cfg.seed)  # the model's initialisation: the same with or without resume
        self.table = train
        self.trn, self.val = split_fold(train, fold)
        if len(self.val) == 0 or len(self.trn) == 0:
            raise DataError(f"fold {fold} has {len(self.trn)} train and {len(self.val)} validation rows")
        self.val_targets = schema.encode(self.val)
        loss = HeadLoss(schema, cfg.loss, weight_cap=cfg.weight_cap, gamma=cfg.focal_gamma,
                        tau=cfg.loss_tau, label_smoothing=cfg.label_smoothing)
        if cfg.teacher:
            loss = DistillLoss(loss, schema, cfg.distill_alpha, cfg.distill_t)
        self.model_args = model_args(cfg, schema, knn_bank=len(self.trn))
        self.model = AttributeModel(pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file, loss=loss,
                                    pretrained_resample=cfg.pretrained_resample, **self.model_args)
        mean, std = data_config(self.model.backbone)
        self.prep = Preprocess(cfg.img_size, mean, std, cfg.resize, cfg.draft, cfg.interpolation)
        self.channels_last = use_channels_last(cfg.channels_last, self.model.backbone)
        self.model.to(d.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.per_rank_batch = max(1, cfg.batch_size // d.world)
        self.dtype = amp_dtype(cfg.amp, lambda: measured_dtype(
            self.model, cfg.model, cfg.img_size, self.per_rank_batch, d.device, train=not cfg.frozen_backbone,
            channels_last=self.channels_last, total=lambda v: [t / d.world for t in d.total(v)], log=self.log))
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.csv_dir = Path(cfg.train_csv).parent if cfg.train_csv else data.root
        self.workers = loader_workers(cfg.workers, d)
        self.rows = self.training_rows()
        self.tracker = Tracker(cfg.log, dataclasses.asdict(cfg), self.dir, fold, cfg.run_name,
                               Path(cfg.out_dir) / "mlflow.db") if d.main else None
        self.state = {"epoch": -1, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
        self.bad: dict = {}

    def training_rows(self) -> dict:
        """What the fold trains on: paths, categories, targets and ids of its train rows; for a
        student also the teacher's probabilities, and the test images as unlabelled rows."""
        cfg = self.cfg
        rows = {"paths": row_paths(self.trn, self.data.train_images, self.csv_dir),
                "categories": self.trn[CATEGORY].tolist(), "targets": self.schema.encode(self.trn),
                "ids": self.trn[ID].to_numpy(), "splits": ["train"] * len(self.trn)}
        if not cfg.teacher:
            return rows
        if cfg.distill_mode == "honest":  # the teacher's fold-k predictions: rank 0 makes them once
            if self.d.main:
                prepare_teacher(cfg.teacher, self.run_dir, self.data, [self.fold], self.d.device, self.csv_dir,
                                self.workers, self.progress)
            self.d.barrier()
        rows = student_rows(rows, self.trn, self.data, self.run_dir, self.fold, teacher=cfg.teacher,
                            mode=cfg.distill_mode, t=cfg.distill_t, with_test=cfg.distill_test)
        if self.d.main:
            source = ("the teacher's fold-k models, weights fitted without fold k" if cfg.distill_mode == "honest"
                      else "teacher out of fold; optimistic")
            print(f"fold {self.fold}: a student of {cfg.teacher}: {len(self.trn)} train rows "
                  f"({source}) and {len(rows['ids']) - len(self.trn)} unlabelled test rows")
        return rows

    @property
    def progress(self) -> bool:
        return self.cfg.progress and self.d.main

    def log(self, text: str) -> None:
        if self.d.main:
            print(f"fold {self.fold}: {text}" if not text.startswith("fold") else text)

    def check_bad(self) -> None:
        """Stop when more than ``max_bad_images`` of the fold's train images were unusable (a
        student's unlabelled test rows are neither counted nor the base: both routes stop alike)."""
        bad = sorted(key for key in self.bad if key[0] == "train")
        if len(bad) > self.cfg.max_bad_images * len(self.trn):
            raise DataError(f"{len(bad)} of {len(self.trn)} train images are unreadable (more than "
                            f"max_bad_images={self.cfg.max_bad_images}), e.g. {named(bad[:5])}")

    @property
    def scored(self) -> torch.nn.Module:
        """The weights that are validated, saved as best.pt and predict: the EMA's when on."""
        return self.ema.module if self.ema is not None else self.model

    # -- resume
    def resume(self, optimizer, scheduler, scaler=None) -> None:
        """Continue from ``last.pt`` (model, the route's optimiser, scheduler and scaler, EMA, history)."""
        last_path = self.dir / "last.pt"
        if self.cfg.resume and last_path.is_file():
            check_resumable(self.cfg, self.dir / "config.yaml")
            last = load_torch(last_path)
            self.schema.check_same(Schema.from_dict(last["schema"]), f"checkpoint {last_path}")
            self.model.load_state_dict(last["state_dict"])
            optimizer.load_state_dict(last["optimizer"])
            planned = [schedule.total for schedule in scheduler.lr_lambdas]  # for this run's epochs
            scheduler.load_state_dict(last["scheduler"])  # the schedule as it was when the fold stopped
            self.continue_schedule(scheduler, planned)
            if scaler is not None and last.get("scaler"):
                scaler.load_state_dict(last["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(last["ema"])
            self.state = {k: last[k] for k in self.state}
            self.log(f"resuming after epoch {self.state['epoch']} (best {self.state['best_score']:.4f})")
        if self.d.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "metrics.json").unlink(missing_ok=True)  # incomplete until this training finishes
            save_config(self.cfg, self.dir / "config.yaml")

    def continue_schedule(self, scheduler, planned: list[int]) -> None:
        """A fold resumed with another ``epochs`` (``planned``: each group's steps for this run's)
        goes on with its learning rate where it was and decays it to the end of the new schedule,
        rather than jumping to the new cosine's value at this step (utils.train.model.WarmupCosine)."""
        step = scheduler.last_epoch
        changed = retarget(scheduler, planned)
        if changed:
            self.log(f"epochs changed: the schedule of {changed[0]} steps now ends at {changed[1]}; the learning "
                     f"rate goes on from {scheduler.lr_lambdas[0](step):.3g} of its base at step {step}, decaying "
                     f"smoothly to the new end")

    # -- the record
    def record(self, epoch: int, stats: dict, val_score: float, lrs: dict) -> bool:
        """Append the epoch to the history (and the tracker) and update best/patience; True when it
        improved."""
        self.state["history"].append({"epoch": epoch + 1, "train_loss": stats["loss"], "val_score": val_score,
                                      "lr_backbone": lrs.get("backbone", 0.0), "lr_head": lrs["head"],
                                      "images_per_s": stats["images_per_s"] * self.d.world,
                                      "seconds": stats["seconds"], "data_wait": stats["data_wait"],
                                      "frozen": epoch < self.cfg.freeze_epochs})
        if self.tracker is not None:
            self.tracker.log(self.state["history"][-1])
        improved = val_score > self.state["best_score"] or self.cfg.select == "last"
        if improved:
            self.state.update(best_score=val_score, best_epoch=epoch + 1, bad_epochs=0)
        else:
            self.state["bad_epochs"] += 1
        self.state["epoch"] = epoch
        return improved

    # -- checkpoints
    def meta(self) -> dict:
        """What a checkpoint says about itself: enough to rebuild the model and its inputs."""
        cfg, schema = self.cfg, self.schema
        return {"model": cfg.model, "model_args": self.model_args, "preprocess": self.prep.to_dict(),
                "schema": schema.to_dict(), "fingerprint": schema.fingerprint, "fold": self.fold,
                "config": dataclasses.asdict(cfg)}

    def save_best(self, state_dict: dict, epoch: int, val_score: float) -> None:
        atomic_torch_save(self.dir / "best.pt", {**self.meta(), "state_dict": state_dict, "epoch": epoch + 1,
                                                 "val_score": val_score})

    def save_last(self, optimizer, scheduler, scaler=None) -> None:
        """The history, then everything resume needs: ``last.pt`` is written last, so a run killed
        between the two resumes before this epoch and writes its history again (the other order
        left a history one epoch short when the resumed fold had no epoch left to train)."""
        history = pd.DataFrame(self.state["history"])
        atomic_write_csv(self.dir / "history.csv", history)
        history_plot(history, self.dir / "history.png")
        atomic_torch_save(self.dir / "last.pt", {
            **self.state, "state_dict": self.model.state_dict(), "schema": self.schema.to_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else {},
            "ema": self.ema.state_dict() if self.ema is not None else {}})

    # -- outputs
    def made_from(self) -> dict:
        """The fold's logits are made from its best checkpoint, the schema, the folds and the labels."""
        root = self.run_dir.path
        made_from = [p for p in (self.dir / "best.pt", root / "schema.json", root / "folds.csv", root / "labels.json")
                     if p.is_file()]
        return provenance.record(made_from, root,
                                 rebuild=f"python train.py --config {{root}}/{self.cfg.run_name}/fold{self.fold}/config.yaml "
                                         f"--out-dir {{root}} --fold {self.fold}")

    def write_outputs(self, idx, oof, test: tuple | None) -> dict:
        """Score the OOF logits of the validation rows ``idx``; write them, the test logits (``test``:
        (ids, logits), or None) and, last, metrics.json. Returns the metrics."""
        final, table = score_logits(self.schema, self.val_targets[idx], oof)
        metrics = {"fold": self.fold, "val_score": final, "best_epoch": self.state["best_epoch"],
                   "epochs_run": self.state["epoch"] + 1,
                   "bad_images": {split: {str(i): e for (s, i), e in sorted(self.bad.items()) if s == split}
                                  for split in ("train", "test")},
                   "per_head": table.to_dict(orient="records")}
        if self.d.main:
            fp, made_from = self.schema.fingerprint, self.made_from()
            save_logits(self.dir / "oof_logits.npz", self.val[ID].to_numpy()[idx], oof, fp, self.fold, made_from)
            if test is not None:
                save_logits(self.dir / "test_logits.npz", *test, fp, self.fold, made_from)
            atomic_write_json(self.dir / "metrics.json", metrics)  # written last: marks the fold complete
            if self.bad:
                print(f"fold {self.fold}: {len(self.bad)} unreadable image(s) skipped: {named(sorted(self.bad)[:10])}")
        return metrics

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

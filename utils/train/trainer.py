"""The fold trainer: k-fold training of a timm backbone with one head per (category, attribute).

One fold goes through named steps (``FoldTrainer``): setup (model, loaders, optimiser), resume
from ``last.pt``, the epoch loop (train, validate, checkpoint), and finalise (the best checkpoint
writes the fold's OOF and test logits, then ``metrics.json``, which marks the fold complete).
``utils/train/kfold.py`` runs the folds (``train.py``'s command, ``tune.py``'s trials);
``utils/train/frozen.py`` is the same steps on cached embeddings.

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
import os
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from timm.utils import ModelEmaV3

from utils import provenance
from utils.config import save_config
from utils.data.dataset import EpochSampler, ImageDataset, balanced_weights, make_loader
from utils.data.decoded import DecodedImages
from utils.train.distributed import Dist, gather_rows
from utils.train.distill import DistillLoss, prepare_teacher, student_rows
from utils.train.engine import amp_dtype, predict, train_one_epoch
from utils.errors import ConfigError, DataError
from utils.io import atomic_torch_save, atomic_write_csv, atomic_write_json, load_torch, save_logits
from utils.ensemble.metric import score_logits
from utils.train.model import (AttributeModel, HeadLoss, build_optimizer, data_config, group_lrs, load_checkpoint,
                         warmup_cosine)
from utils.train.tracking import Tracker
from utils.plots import history_plot
from utils.run import RunDir
from utils.train.throughput import loader_workers, use_channels_last
from utils.data.schema import CATEGORY, ID, Dataset, Schema, image_path, row_paths
from utils.train.config import TrainConfig
from utils.data.transforms import Preprocess


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


# ----------------------------------------------------------------------------- one fold

class FoldTrainer:
    """One fold, in named steps: ``__init__`` (setup), ``resume``, ``fit`` (the epoch loop, with
    ``checkpoint`` after each epoch) and ``finalise``. ``train_fold`` runs them in order."""

    def __init__(self, cfg: TrainConfig, schema: Schema, train: pd.DataFrame, data: Dataset, fold: int,
                 d: Dist, run_dir: RunDir):
        self.cfg, self.schema, self.data, self.fold, self.d = cfg, schema, data, fold, d
        self.run_dir, self.dir = run_dir, run_dir.fold_dir(cfg.run_name, fold)
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
        self._loaders()
        steps_per_epoch = len(self.trn_loader)
        self.optimizer = build_optimizer(self.model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay, cfg.layer_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
        self.dtype = amp_dtype(cfg.amp, d.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.net = self.model
        if d.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=cfg.freeze_epochs > 0)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.tracker = Tracker(cfg, self.dir, fold) if d.main else None
        self.state = {"epoch": -1, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
        self.bad: dict = {}

    def _loaders(self) -> None:
        cfg, d = self.cfg, self.d
        self.csv_dir = Path(cfg.train_csv).parent if cfg.train_csv else self.data.root
        self.images = self.decoded_images()
        train_tf = self.prep.transform(train=True, aug=cfg.aug, category_aug=cfg.category_aug,
                                       categories=self.schema.categories)
        self.rows = rows = self.training_rows()
        self.trn_keys = list(zip(rows["splits"], rows["ids"].tolist()))  # (split, id): train and test ids overlap
        self.trn_ds = ImageDataset(rows["paths"], rows["categories"], rows["targets"], train_tf, self.prep,
                                   augment_seed=cfg.seed + self.fold, soft=rows.get("soft"),
                                   soft_heads=rows.get("soft_heads"), images=self.images)
        weights = balanced_weights(rows["targets"], self.schema, cap=cfg.weight_cap) if cfg.balanced_sampler else None
        self.sampler = EpochSampler(len(self.trn_ds), cfg.seed + self.fold, d.rank, d.world, weights)
        self.per_rank_batch = max(1, cfg.batch_size // d.world)
        self.workers = loader_workers(cfg.workers, d)
        self.trn_loader = make_loader(self.trn_ds, self.per_rank_batch, self.workers, self.sampler,
                                      drop_last=len(self.trn_ds) > self.per_rank_batch, persistent=True,
                                      device=d.device)
        self.val_loader = self._shard(self.val, self.data.train_images, self.csv_dir, persistent=True)
        if self.workers and not cfg.frozen_backbone:  # fork the validation workers now, while this process is
            iter(self.val_loader)  # small: forked after an epoch, every page the next step writes is copied (1-3 s)

    def decoded_images(self):
        """The run folder's decode cache of every train and test image (utils/data/decoded.py), or None
        with ``decode_cache: false``: rank 0 builds it with every core before the first fold, or
        finds it; the other ranks wait, then map the same files."""
        if not self.cfg.decode_cache:
            return None
        paths = (row_paths(self.table, self.data.train_images, self.csv_dir)
                 + [image_path(self.data.test_images, i) for i in self.data.test[ID]])
        folder = self.run_dir.path / "decoded"
        if self.d.main:
            images = DecodedImages.build_or_load(folder, paths, self.prep, os.cpu_count() or 1, self.progress, self.log)
        self.d.barrier()
        return images if self.d.main else DecodedImages.find(folder, paths, self.prep)

    def training_rows(self) -> dict:
        """What the fold trains on: paths, categories, targets and ids of its train rows; for a
        student also the teacher's probabilities, and the test images as unlabelled rows."""
        rows = {"paths": row_paths(self.trn, self.data.train_images, self.csv_dir),
                "categories": self.trn[CATEGORY].tolist(), "targets": self.schema.encode(self.trn),
                "ids": self.trn[ID].to_numpy(), "splits": ["train"] * len(self.trn)}
        if self.cfg.teacher:
            if self.cfg.distill_mode == "honest":  # the teacher's fold-k predictions: rank 0 makes them once
                if self.d.main:
                    prepare_teacher(self.cfg.teacher, self.run_dir, self.data, [self.fold], self.d.device,
                                    self.csv_dir, loader_workers(self.cfg.workers, self.d), self.progress)
                self.d.barrier()
            rows = student_rows(rows, self.trn, self.data, self.run_dir, self.cfg, self.fold)
            if self.d.main:
                source = ("the teacher's fold-k models, weights fitted without fold k" if self.cfg.distill_mode == "honest"
                          else "teacher out of fold; optimistic")
                print(f"fold {self.fold}: a student of {self.cfg.teacher}: {len(self.trn)} train rows "
                      f"({source}) and {len(rows['ids']) - len(self.trn)} unlabelled test rows")
        return rows

    def _shard(self, table: pd.DataFrame, images_dir: Path, base: Path | None = None, persistent: bool = False):
        """An evaluation loader over this rank's share of ``table``'s rows."""
        ds = ImageDataset(row_paths(table, images_dir, base), table[CATEGORY], None, self.prep.transform(), self.prep,
                          images=self.images)
        part = torch.utils.data.Subset(ds, list(range(self.d.rank, len(ds), self.d.world)))
        return make_loader(part, self.per_rank_batch, self.workers, persistent=persistent, device=self.d.device)

    @property
    def progress(self) -> bool:
        return self.cfg.progress and self.d.main

    def log(self, text: str) -> None:
        if self.d.main:
            print(f"fold {self.fold}: {text}" if not text.startswith("fold") else text)

    # -- resume
    def resume(self) -> None:
        """Continue from ``last.pt`` (model, optimiser, scheduler, scaler, history)."""
        last_path = self.dir / "last.pt"
        if self.cfg.resume and last_path.is_file():
            check_resumable(self.cfg, self.dir / "config.yaml")
            last = load_torch(last_path)
            self.schema.check_same(Schema.from_dict(last["schema"]), f"checkpoint {last_path}")
            self.model.load_state_dict(last["state_dict"])
            self.optimizer.load_state_dict(last["optimizer"])
            self.scheduler.load_state_dict(last["scheduler"])
            if self.scaler is not None and last.get("scaler"):
                self.scaler.load_state_dict(last["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(last["ema"])
            self.state = {k: last[k] for k in self.state}
            self.log(f"resuming after epoch {self.state['epoch']} (best {self.state['best_score']:.4f})")
        if self.d.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "metrics.json").unlink(missing_ok=True)  # incomplete until this training finishes
            save_config(self.cfg, self.dir / "config.yaml")

    # -- the epoch loop
    def fit(self, report: Callable[[int, float], None] | None = None) -> bool:
        """Train the remaining epochs; ``report(epoch, val_score)`` after each (tune.py prunes
        with it). Returns False when stopped early by ``stop_after`` (the fold is not finished)."""
        cfg, epochs_this_run = self.cfg, 0
        for epoch in range(self.state["epoch"] + 1, cfg.epochs):
            stats, val_score = self.train_epoch(epoch)
            improved = self.record(epoch, stats, val_score)
            self.checkpoint(improved, epoch, val_score)
            self.log(f"fold {self.fold} epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f}  val "
                     f"{val_score:.4f}{' *' if improved else ''}  {stats['images_per_s'] * self.d.world:.1f} img/s "
                     f"(waiting for data {stats['data_wait']:.0%})")
            if report is not None:
                report(epoch, val_score)
            epochs_this_run += 1
            if cfg.patience and self.state["bad_epochs"] >= cfg.patience:
                self.log(f"early stop, no improvement for {cfg.patience} epochs")
                break
            if cfg.stop_after and epochs_this_run >= cfg.stop_after and epoch + 1 < cfg.epochs:
                self.log(f"stopped after {epochs_this_run} epoch(s) (stop_after); continue with --resume")
                return False
        return True

    def check_bad(self, n_train: int) -> None:
        """Stop when more than ``max_bad_images`` of the fold's ``n_train`` train images were unusable."""
        if len(self.bad) > self.cfg.max_bad_images * n_train:
            raise DataError(f"{len(self.bad)} of {n_train} train images are unreadable (more than "
                            f"max_bad_images={self.cfg.max_bad_images}), e.g. {named(sorted(self.bad)[:5])}")

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One epoch of training, then the validation score."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same with or without resume
        self.sampler.set_epoch(epoch)  # the epoch reaches the workers with each row's key
        self.model.freeze_backbone(epoch < cfg.freeze_epochs)
        stats = train_one_epoch(self.net, self.trn_loader, self.optimizer, self.scheduler, self.d.device,
                                prep=self.prep, amp_dtype=self.dtype, scaler=self.scaler, clip_grad=cfg.clip_grad,
                                grad_accum=cfg.grad_accum, ema=self.ema, channels_last=self.channels_last,
                                keys=self.trn_keys, bad=self.bad,
                                desc=f"fold {self.fold} epoch {epoch + 1}/{cfg.epochs}", progress=self.progress)
        self.check_bad(len(self.trn_ds))
        idx, logits = gather_rows(*predict(self.scored, self.val_loader, self.d.device, prep=self.prep,
                                           amp_dtype=self.dtype, channels_last=self.channels_last,
                                           desc="validate", progress=self.progress), self.d)
        val_score, _ = score_logits(self.schema, self.val_targets[idx], logits)
        self.last_validation = (epoch, idx, logits)  # the OOF logits, when this epoch is the best
        return stats, val_score

    @property
    def scored(self) -> torch.nn.Module:
        """The weights that are validated, saved as best.pt and predict: the EMA's when on."""
        return self.ema.module if self.ema is not None else self.model

    def record(self, epoch: int, stats: dict, val_score: float) -> bool:
        """Append the epoch to the history and update best/patience; True when it improved."""
        lrs = group_lrs(self.optimizer)
        self.state["history"].append({"epoch": epoch + 1, "train_loss": stats["loss"], "val_score": val_score,
                                      "lr_backbone": lrs.get("backbone", 0.0), "lr_head": lrs["head"],
                                      "images_per_s": stats["images_per_s"] * self.d.world,
                                      "seconds": stats["seconds"], "data_wait": stats["data_wait"],
                                      "frozen": epoch < self.cfg.freeze_epochs})
        improved = val_score > self.state["best_score"]
        if improved:
            self.state.update(best_score=val_score, best_epoch=epoch + 1, bad_epochs=0)
        else:
            self.state["bad_epochs"] += 1
        self.state["epoch"] = epoch
        return improved

    # -- checkpoint
    def meta(self) -> dict:
        """What a checkpoint says about itself: enough to rebuild the model and its inputs."""
        cfg, schema = self.cfg, self.schema
        return {"model": cfg.model, "model_args": self.model_args, "preprocess": self.prep.to_dict(),
                "schema": schema.to_dict(), "fingerprint": schema.fingerprint, "fold": self.fold,
                "config": dataclasses.asdict(cfg)}

    def checkpoint(self, improved: bool, epoch: int, val_score: float) -> None:
        """best.pt when the epoch improved; last.pt (everything resume needs) and the history always."""
        if not self.d.main:
            return
        if improved:
            self.save_best(self.scored.state_dict(), epoch, val_score)
        self.save_last()
        self.save_history()
        if self.tracker is not None:
            self.tracker.log(self.state["history"][-1])

    def save_best(self, state_dict: dict, epoch: int, val_score: float) -> None:
        atomic_torch_save(self.dir / "best.pt", {**self.meta(), "state_dict": state_dict, "epoch": epoch + 1,
                                                 "val_score": val_score})

    def save_last(self) -> None:
        atomic_torch_save(self.dir / "last.pt", {
            **self.state, "state_dict": self.model.state_dict(), "schema": self.schema.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "ema": self.ema.state_dict() if self.ema is not None else {}})

    def save_history(self) -> None:
        history = pd.DataFrame(self.state["history"])
        atomic_write_csv(self.dir / "history.csv", history)
        history_plot(history, self.dir / "history.png")

    # -- finalise
    def made_from(self) -> dict:
        """The fold's logits are made from its best checkpoint, the schema, the folds and the labels."""
        root = self.run_dir.path  # (a tune.py trial's folder holds no schema.json or folds.csv of its own)
        made_from = [p for p in (self.dir / "best.pt", root / "schema.json", root / "folds.csv", root / "labels.json")
                     if p.is_file()]
        return provenance.record(made_from, root,
                                 rebuild=f"python train.py --config {{root}}/{self.cfg.run_name}/fold{self.fold}/config.yaml "
                                         f"--out-dir {{root}} --fold {self.fold}")

    def finalise(self) -> dict:
        """The best checkpoint predicts the fold's validation rows (OOF) and the test set; writes
        both logits files, then metrics.json (its presence marks the fold complete)."""
        cfg, d = self.cfg, self.d
        d.barrier()
        best, _ = load_checkpoint(self.dir / "best.pt", self.schema)
        best.to(d.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        run = lambda loader, desc: gather_rows(*predict(best, loader, d.device, prep=self.prep, amp_dtype=self.dtype,
                                                        hflip=cfg.tta_hflip, channels_last=self.channels_last,
                                                        desc=desc, progress=self.progress), d)
        last = getattr(self, "last_validation", None)
        if last is not None and last[0] + 1 == self.state["best_epoch"] and not cfg.tta_hflip:
            idx, oof = last[1], last[2]  # best.pt holds the weights that just validated: no second pass
        else:
            idx, oof = run(self.val_loader, "OOF")
        test = None
        if cfg.predict_test:
            test_idx, test_logits = run(self._shard(self.data.test, self.data.test_images), "test")
            test = (self.data.test[ID].to_numpy()[test_idx], test_logits)
        return self.write_outputs(idx, oof, test)

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

"""The fold trainer: k-fold training of a timm backbone with one head per (category, attribute).

``train.py`` is its command line and ``tune.py`` calls ``train_fold`` once per trial. One fold
goes through named steps (``FoldTrainer``): setup (model, loaders, optimiser), resume from
``last.pt``, the epoch loop (train, validate, checkpoint), and finalise (the best checkpoint
writes the fold's OOF and test logits, then ``metrics.json``, which marks the fold complete).

Writes, in <out_dir>/<name>/fold<k>/ (name defaults to the model; see utils/run.py):
  best.pt            the best checkpoint; describes itself (model, args, preprocessing, schema)
  last.pt            the latest epoch's full state, for --resume
  oof_logits.npz     logits of the fold's validation rows, with their ids (utils/io.py)
  test_logits.npz    logits of every test row, with their ids
  history.csv/.png   one row per epoch: loss, val score, learning rates, images/s
  metrics.json       best epoch, val score, per-head table, bad images (written last)
  config.yaml        the resolved config
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from utils.config import CommonConfig, option, save_config
from utils.data import EpochSampler, ImageDataset, balanced_weights, make_loader
from utils.distributed import Dist, gather_rows, setup_distributed, teardown
from utils.engine import AMP, amp_dtype, predict, train_one_epoch
from utils.errors import DataError
from utils.io import atomic_torch_save, atomic_write_csv, atomic_write_json, load_torch, save_logits
from utils.metric import score_logits, summarize
from utils.model import LOSSES, AttributeModel, HeadLoss, build_optimizer, data_config, load_checkpoint, warmup_cosine
from utils.plots import history_plot
from utils.run import RunDir
from utils.schema import CATEGORY, ID, Dataset, Schema, image_path, read_dataset
from utils.transforms import DEFAULT_AUG, DEFAULT_CATEGORY_AUG, INTERPOLATIONS, RESIZES, Preprocess


@dataclass
class TrainConfig(CommonConfig):
    model: str = option("efficientnet_b0", "any timm model name; configs/<model>.yaml is applied when it exists")
    name: Optional[str] = option(None, "run name under out_dir (default: the model name)")
    fold: str = option("0", "a fold number, or 'all' for every fold in turn")
    n_folds: int = option(5, "K of the multilabel-stratified K-fold (fixed by the first run in out_dir)")
    train_csv: Optional[str] = option(None, "replaces <data_dir>/train.csv, e.g. augment.py's augmented_train.csv")
    # model
    pretrained: bool = option(False, "timm weights from the Hugging Face hub (needs network)")
    pretrained_file: Optional[str] = option(None, "or a local weights file (.pth / .safetensors state dict)")
    dropout: float = option(0.2, "dropout before the heads")
    drop_path_rate: float = option(0.0, "stochastic depth rate of the backbone (where timm supports it)")
    # preprocessing: stored in every checkpoint, and served from there
    img_size: int = option(224, "square input size in pixels")
    resize: str = option("squash", "squash to a square (as the seed), or pad keeping the aspect ratio",
                         choices=RESIZES)
    draft: bool = option(True, "decode JPEGs at a reduced DCT scale when the target size allows (faster)")
    interpolation: str = option("area", "resize interpolation", choices=tuple(INTERPOLATIONS))
    aug: dict = option(help="online augmentations: {name: {p, params}}; p: 0 switches one off "
                            "(see utils/transforms.py)", factory=lambda: dict(DEFAULT_AUG))
    category_aug: dict = option(help="per-category overrides of aug (the seed's category-aware augmentations)",
                                factory=lambda: dict(DEFAULT_CATEGORY_AUG))
    # optimisation
    epochs: int = option(10, "epochs per fold")
    batch_size: int = option(32, "images per optimiser step, over all processes")
    lr_backbone: float = option(3e-4, "AdamW learning rate of the backbone")
    lr_head: float = option(1e-3, "AdamW learning rate of the heads")
    weight_decay: float = option(0.01, "AdamW weight decay (not on norms and biases)")
    warmup_epochs: float = option(1.0, "linear warm-up, then cosine decay")
    freeze_epochs: int = option(0, "gradual unfreezing: train the heads alone for this many epochs")
    clip_grad: float = option(1.0, "gradient norm clipping; 0 = off")
    amp: str = option("auto", "mixed precision; auto = bf16 on CUDA and on CPUs with native bf16, else off",
                      choices=AMP)
    # class imbalance
    loss: str = option("ce", "training loss (compared in BENCHMARKS.md)", choices=LOSSES)
    loss_tau: float = option(1.0, "logit_adjusted: strength of the prior shift")
    weight_cap: float = option(10.0, "weighted_ce and the balanced sampler: largest class weight")
    focal_gamma: float = option(2.0, "focal: the focusing exponent")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    balanced_sampler: bool = option(False, "draw rows in proportion to their rarest label's weight")
    # control
    patience: int = option(3, "early stopping after this many epochs without a better val score; 0 = off")
    tta_hflip: bool = option(False, "OOF and test logits average the image and its mirror")
    predict_test: bool = option(True, "write test_logits.npz (tune.py turns it off)")
    max_bad_images: float = option(0.01, "stop when a larger share of the train images is unreadable")
    workers: int = option(2, "data loader worker processes")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    resume: bool = option(False, "skip complete folds; continue a fold from its last.pt")
    stop_after: int = option(0, "stop cleanly after this many epochs in this run (then --resume); 0 = never")
    progress: bool = option(True, "progress bars")

    @property
    def run_name(self) -> str:
        return self.name or self.model


def model_args(cfg: TrainConfig, schema: Schema) -> dict:
    """The arguments that rebuild the model from a checkpoint alone."""
    return {"backbone": cfg.model, "head_widths": [h.width for h in schema.heads],
            "dropout": cfg.dropout, "drop_path_rate": cfg.drop_path_rate}


def row_paths(table: pd.DataFrame, images_dir: Path, csv_dir: Path | None = None) -> list[Path]:
    """Image path of every row: ``image`` column (relative to the CSV) when present, else by id."""
    if "image" in table and csv_dir is not None:
        return [csv_dir / p if isinstance(p, str) else image_path(images_dir, i)
                for p, i in zip(table["image"], table[ID])]
    return [image_path(images_dir, i) for i in table[ID]]


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
        self.dir = run_dir.fold_dir(cfg.run_name, fold)
        torch.manual_seed(cfg.seed)  # the model's initialisation: the same with or without resume
        self.trn, self.val = split_fold(train, fold)
        if len(self.val) == 0 or len(self.trn) == 0:
            raise DataError(f"fold {fold} has {len(self.trn)} train and {len(self.val)} validation rows")
        self.val_targets = schema.encode(self.val)
        loss = HeadLoss(schema, cfg.loss, weight_cap=cfg.weight_cap, gamma=cfg.focal_gamma,
                        tau=cfg.loss_tau, label_smoothing=cfg.label_smoothing)
        self.model = AttributeModel(pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file, loss=loss,
                                    **model_args(cfg, schema))
        mean, std = data_config(self.model.backbone)
        self.prep = Preprocess(cfg.img_size, mean, std, cfg.resize, cfg.draft, cfg.interpolation)
        self.model.to(d.device)
        self._loaders()
        steps_per_epoch = len(self.trn_loader)
        self.optimizer = build_optimizer(self.model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
        self.dtype = amp_dtype(cfg.amp, d.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.net = self.model
        if d.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=cfg.freeze_epochs > 0)
        self.state = {"epoch": -1, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
        self.bad: dict = {}

    def _loaders(self) -> None:
        cfg, d = self.cfg, self.d
        self.csv_dir = Path(cfg.train_csv).parent if cfg.train_csv else self.data.root
        train_tf = self.prep.transform(train=True, aug=cfg.aug, category_aug=cfg.category_aug,
                                       categories=self.schema.categories)
        trn_targets = self.schema.encode(self.trn)
        self.trn_ds = ImageDataset(row_paths(self.trn, self.data.train_images, self.csv_dir), self.trn[CATEGORY],
                                   trn_targets, train_tf, self.prep, augment_seed=cfg.seed + self.fold)
        weights = balanced_weights(trn_targets, self.schema, cap=cfg.weight_cap) if cfg.balanced_sampler else None
        self.sampler = EpochSampler(len(self.trn_ds), cfg.seed + self.fold, d.rank, d.world, weights)
        self.per_rank_batch = max(1, cfg.batch_size // d.world)
        self.trn_loader = make_loader(self.trn_ds, self.per_rank_batch, cfg.workers, self.sampler,
                                      drop_last=len(self.trn_ds) > self.per_rank_batch)
        self.val_loader = self._shard(self.val, self.data.train_images, self.csv_dir)

    def _shard(self, table: pd.DataFrame, images_dir: Path, base: Path | None = None):
        """An evaluation loader over this rank's share of ``table``'s rows."""
        ds = ImageDataset(row_paths(table, images_dir, base), table[CATEGORY], None, self.prep.transform(), self.prep)
        part = torch.utils.data.Subset(ds, list(range(self.d.rank, len(ds), self.d.world)))
        return make_loader(part, self.per_rank_batch, self.cfg.workers)

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
            last = load_torch(last_path)
            self.schema.check_same(Schema.from_dict(last["schema"]), f"checkpoint {last_path}")
            self.model.load_state_dict(last["state_dict"])
            self.optimizer.load_state_dict(last["optimizer"])
            self.scheduler.load_state_dict(last["scheduler"])
            if self.scaler is not None and last.get("scaler"):
                self.scaler.load_state_dict(last["scaler"])
            self.state = {k: last[k] for k in self.state}
            self.log(f"resuming after epoch {self.state['epoch']} (best {self.state['best_score']:.4f})")
        if self.d.main:
            self.dir.mkdir(parents=True, exist_ok=True)
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
                     f"{val_score:.4f}{' *' if improved else ''}  {stats['images_per_s'] * self.d.world:.1f} img/s")
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

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One epoch of training, then the validation score."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same with or without resume
        self.sampler.set_epoch(epoch)
        self.trn_ds.set_epoch(epoch)
        self.model.freeze_backbone(epoch < cfg.freeze_epochs)
        stats = train_one_epoch(self.net, self.trn_loader, self.optimizer, self.scheduler, self.d.device,
                                amp_dtype=self.dtype, scaler=self.scaler, clip_grad=cfg.clip_grad,
                                ids=self.trn[ID].to_numpy(), bad=self.bad,
                                desc=f"fold {self.fold} epoch {epoch + 1}/{cfg.epochs}", progress=self.progress)
        if len(self.bad) > cfg.max_bad_images * len(self.trn):
            raise DataError(f"{len(self.bad)} of {len(self.trn)} train images are unreadable (more than "
                            f"max_bad_images={cfg.max_bad_images}), e.g. ids {sorted(self.bad)[:5]}")
        idx, logits = gather_rows(*predict(self.model, self.val_loader, self.d.device, amp_dtype=self.dtype,
                                           desc="validate", progress=self.progress), self.d)
        val_score, _ = score_logits(self.schema, self.val_targets[idx], logits)
        return stats, val_score

    def record(self, epoch: int, stats: dict, val_score: float) -> bool:
        """Append the epoch to the history and update best/patience; True when it improved."""
        lrs = self.scheduler.get_last_lr()
        self.state["history"].append({"epoch": epoch + 1, "train_loss": stats["loss"], "val_score": val_score,
                                      "lr_backbone": lrs[0], "lr_head": lrs[2],
                                      "images_per_s": stats["images_per_s"] * self.d.world,
                                      "seconds": stats["seconds"], "frozen": epoch < self.cfg.freeze_epochs})
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
        return {"model": cfg.model, "model_args": model_args(cfg, schema), "preprocess": self.prep.to_dict(),
                "schema": schema.to_dict(), "fingerprint": schema.fingerprint, "fold": self.fold,
                "config": dataclasses.asdict(cfg)}

    def checkpoint(self, improved: bool, epoch: int, val_score: float) -> None:
        """best.pt when the epoch improved; last.pt (everything resume needs) and the history always."""
        if not self.d.main:
            return
        if improved:
            atomic_torch_save(self.dir / "best.pt", {**self.meta(), "state_dict": self.model.state_dict(),
                                                     "epoch": epoch + 1, "val_score": val_score})
        atomic_torch_save(self.dir / "last.pt", {
            **self.state, "state_dict": self.model.state_dict(), "schema": self.schema.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {}})
        history = pd.DataFrame(self.state["history"])
        atomic_write_csv(self.dir / "history.csv", history)
        history_plot(history, self.dir / "history.png")

    # -- finalise
    def finalise(self) -> dict:
        """The best checkpoint predicts the fold's validation rows (OOF) and the test set; writes
        both logits files, then metrics.json (its presence marks the fold complete)."""
        cfg, d = self.cfg, self.d
        d.barrier()
        best, _ = load_checkpoint(self.dir / "best.pt", self.schema)
        best.to(d.device)
        run = lambda loader, desc: gather_rows(*predict(best, loader, d.device, amp_dtype=self.dtype,
                                                        hflip=cfg.tta_hflip, desc=desc, progress=self.progress), d)
        idx, oof = run(self.val_loader, "OOF")
        if cfg.predict_test:
            test_idx, test_logits = run(self._shard(self.data.test, self.data.test_images), "test")
        final, table = score_logits(self.schema, self.val_targets[idx], oof)
        metrics = {"fold": self.fold, "val_score": final, "best_epoch": self.state["best_epoch"],
                   "epochs_run": self.state["epoch"] + 1,
                   "bad_images": {str(k): v for k, v in sorted(self.bad.items())},
                   "per_head": table.to_dict(orient="records")}
        if d.main:
            fp = self.schema.fingerprint
            save_logits(self.dir / "oof_logits.npz", self.val[ID].to_numpy()[idx], oof, fp, self.fold)
            if cfg.predict_test:
                save_logits(self.dir / "test_logits.npz", self.data.test[ID].to_numpy()[test_idx], test_logits,
                            fp, self.fold)
            atomic_write_json(self.dir / "metrics.json", metrics)  # written last: marks the fold complete
            if self.bad:
                print(f"fold {self.fold}: {len(self.bad)} unreadable image(s) skipped: ids {sorted(self.bad)[:10]}")
        return metrics


def train_fold(cfg: TrainConfig, schema: Schema, train: pd.DataFrame, data: Dataset, fold: int, d: Dist,
               report: Callable[[int, float], None] | None = None) -> dict:
    """Train one fold; write its outputs; return its metrics (``{"stopped": True, ...}`` after
    ``stop_after``). A complete fold is skipped under ``resume``."""
    run_dir = RunDir(cfg.out_dir)
    if cfg.resume and run_dir.fold_complete(cfg.run_name, fold):
        done = json.loads(run_dir.fold_file(cfg.run_name, fold, "metrics.json").read_text())
        if d.main:
            print(f"fold {fold}: already complete (val score {done['val_score']:.4f}); skipped")
        return done
    trainer = FoldTrainer(cfg, schema, train, data, fold, d, run_dir)
    trainer.resume()
    if not trainer.fit(report):
        return {"stopped": True, **trainer.state}
    return trainer.finalise()


# ----------------------------------------------------------------------------- every fold

def print_table(title: str, table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 140, "display.max_rows", 200,
                           "display.float_format", "{:.4f}".format):
        print(f"\n{title}\n{table.to_string(index=False)}")


def report_oof(run_dir: RunDir, run: str, train: pd.DataFrame) -> float | None:
    """When every fold of a run is complete: its OOF score over the whole train set, printed and
    written to ``<run>/oof_score.json``."""
    from utils.blend import load_oof

    if run not in run_dir.complete_runs():
        return None
    rows = run_dir.train_rows(train)
    logits = load_oof(run_dir, [run], rows[ID].to_numpy())[0]  # checks coverage
    final, table = score_logits(run_dir.schema, run_dir.schema.encode(rows), logits)
    _, per_cat = summarize(table)
    print_table(f"{run}: OOF over {len(rows)} train rows ({run_dir.n_folds} folds)", per_cat)
    print(f"{run} OOF score: {final:.4f}")
    atomic_write_json(run_dir.path / run / "oof_score.json",
                      {"oof_score": final, "per_category": per_cat.to_dict(orient="records")})
    return final


def folds_to_train(cfg: TrainConfig) -> list[int]:
    folds = list(range(cfg.n_folds)) if cfg.fold == "all" else [int(cfg.fold)] if cfg.fold.isdigit() else [-1]
    if any(not 0 <= k < cfg.n_folds for k in folds):
        raise ValueError(f"fold must be 'all' or in 0..{cfg.n_folds - 1}, got {cfg.fold!r}")
    return folds


def train(cfg: TrainConfig) -> dict:
    """What ``python train.py`` does: prepare the run folder, train the folds asked for, print the
    per-fold table and, once every fold is done, the run's OOF score."""
    d = setup_distributed(cfg.device)
    if d.world > 1 or cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    folds = folds_to_train(cfg)
    data = read_dataset(cfg.data_dir, cfg.train_csv)
    run_dir = RunDir(cfg.out_dir)
    if d.main:  # rank 0 fits and writes schema.json and folds.csv; the others read them
        schema, table = run_dir.prepare(data, cfg.n_folds, cfg.seed)
    d.barrier()
    if not d.main:
        schema, table = run_dir.prepare(data, cfg.n_folds, cfg.seed)
    start = time.perf_counter()
    results = {k: train_fold(cfg, schema, table, data, k, d) for k in folds}
    if d.main:
        rows = [{"fold": k, "val_score": r.get("val_score", r.get("best_score")), "best_epoch": r.get("best_epoch")}
                for k, r in results.items()]
        print_table(f"{cfg.run_name}: folds ({time.perf_counter() - start:.0f} s)", pd.DataFrame(rows))
        report_oof(run_dir, cfg.run_name, table)
    teardown(d)
    return results

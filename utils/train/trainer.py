"""The fine-tuned route of one fold (``FoldTrainer``): the backbone and heads trained end to end on
images, fed by the decode cache. Its loop: train an epoch over the fold's images, validate, keep
the best weights; then the best checkpoint predicts the fold's validation rows (OOF) and the test
set. What it shares with the frozen route (rows, model, record, checkpoints, outputs) is the
``Fold`` it is given (utils/train/fold.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from utils.data.dataset import EpochSampler, ImageDataset, balanced_weights, make_loader
from utils.data.decoded import DecodedImages
from utils.data.schema import CATEGORY, ID, image_path, row_paths
from utils.metric import score_logits
from utils.train.distributed import gather_rows
from utils.train.engine import predict, train_one_epoch
from utils.train.fold import Fold
from utils.train.model import WarmupCosine, build_optimizer, load_checkpoint


class FoldTrainer:
    """Fine-tunes ``fold``: ``resume``, ``fit`` (the epoch loop, checkpointing each epoch), ``finalise``."""

    def __init__(self, fold: Fold):
        self.fold = f = fold
        cfg, d = f.cfg, f.d
        self.images = self.decoded_images()
        train_tf = f.prep.transform(train=True, aug=cfg.aug, category_aug=cfg.category_aug,
                                    categories=f.schema.categories)
        rows = f.rows
        self.trn_keys = list(zip(rows["splits"], rows["ids"].tolist()))  # (split, id): train and test ids overlap
        self.trn_ds = ImageDataset(rows["paths"], rows["categories"], rows["targets"], train_tf, f.prep,
                                   augment_seed=cfg.seed + f.fold, soft=rows.get("soft"),
                                   soft_heads=rows.get("soft_heads"), images=self.images)
        weights = balanced_weights(rows["targets"], f.schema, cap=cfg.weight_cap) if cfg.balanced_sampler else None
        self.sampler = EpochSampler(len(self.trn_ds), cfg.seed + f.fold, d.rank, d.world, weights)
        self.trn_loader = make_loader(self.trn_ds, f.per_rank_batch, f.workers, self.sampler,
                                      drop_last=len(self.trn_ds) > f.per_rank_batch, persistent=True,
                                      device=d.device)
        self.val_loader = self.shard(f.val, f.data.train_images, f.csv_dir, persistent=True)
        if f.workers:  # fork the validation workers now, while this process is small: forked after an
            iter(self.val_loader)  # epoch, every page the next step writes is copied (1-3 s)
        steps_per_epoch = len(self.trn_loader)
        self.optimizer = build_optimizer(f.model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay, cfg.layer_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
        self.scaler = torch.amp.GradScaler("cuda") if f.dtype == torch.float16 else None
        self.net = f.model
        if d.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                f.model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=cfg.freeze_epochs > 0)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def decoded_images(self):
        """The run folder's decode cache of every train and test image (utils/data/decoded.py), or None
        with ``decode_cache: false``: rank 0 builds it with every core before the first fold, or
        finds it; the other ranks wait, then map the same files."""
        f = self.fold
        if not f.cfg.decode_cache:
            return None
        paths = (row_paths(f.table, f.data.train_images, f.csv_dir)
                 + [image_path(f.data.test_images, i) for i in f.data.test[ID]])
        folder = f.run_dir.path / "decoded"
        if f.d.main:
            images = DecodedImages.build_or_load(folder, paths, f.prep, os.cpu_count() or 1, f.progress, f.log)
        f.d.barrier()
        return images if f.d.main else DecodedImages.find(folder, paths, f.prep)

    def shard(self, table: pd.DataFrame, images_dir: Path, base: Path | None = None, persistent: bool = False):
        """An evaluation loader over this rank's share of ``table``'s rows."""
        f = self.fold
        ds = ImageDataset(row_paths(table, images_dir, base), table[CATEGORY], None, f.prep.transform(), f.prep,
                          images=self.images)
        part = torch.utils.data.Subset(ds, list(range(f.d.rank, len(ds), f.d.world)))
        return make_loader(part, f.per_rank_batch, f.workers, persistent=persistent, device=f.d.device)

    def resume(self) -> None:
        self.fold.resume(self.optimizer, self.scheduler, self.scaler)

    def fit(self, report: Callable[[int, float], None] | None = None) -> bool:
        return self.fold.epochs(self.train_epoch, self.checkpoint, self.optimizer, report)

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One epoch of training, then the validation score."""
        f, cfg = self.fold, self.fold.cfg
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same with or without resume
        self.sampler.set_epoch(epoch)  # the epoch reaches the workers with each row's key
        f.model.freeze_backbone(epoch < cfg.freeze_epochs)
        stats = train_one_epoch(self.net, self.trn_loader, self.optimizer, self.scheduler, f.d.device,
                                prep=f.prep, amp_dtype=f.dtype, scaler=self.scaler, clip_grad=cfg.clip_grad,
                                grad_accum=cfg.grad_accum, ema=f.ema, channels_last=f.channels_last,
                                keys=self.trn_keys, bad=f.bad,
                                desc=f"fold {f.fold} epoch {epoch + 1}/{cfg.epochs}", progress=f.progress)
        f.check_bad()
        idx, logits = gather_rows(*predict(f.scored, self.val_loader, f.d.device, prep=f.prep,
                                           amp_dtype=f.dtype, channels_last=f.channels_last,
                                           desc="validate", progress=f.progress), f.d)
        val_score, _ = score_logits(f.schema, f.val_targets[idx], logits)
        self.last_validation = (epoch, idx, logits)  # the OOF logits, when this epoch is the best
        return stats, val_score

    def checkpoint(self, improved: bool, epoch: int, val_score: float) -> None:
        """best.pt when the epoch improved; last.pt (everything resume needs) and the history always."""
        f = self.fold
        if not f.d.main:
            return
        if improved:
            f.save_best(f.scored.state_dict(), epoch, val_score)
        f.save_last(self.optimizer, self.scheduler, self.scaler)

    def finalise(self) -> dict:
        """The best checkpoint predicts the fold's validation rows (OOF) and the test set; writes
        both logits files, then metrics.json (its presence marks the fold complete)."""
        f, cfg, d = self.fold, self.fold.cfg, self.fold.d
        d.barrier()
        best, _ = load_checkpoint(f.dir / "best.pt", f.schema)
        best.to(d.device, memory_format=torch.channels_last if f.channels_last else torch.contiguous_format)
        run = lambda loader, desc: gather_rows(*predict(best, loader, d.device, prep=f.prep, amp_dtype=f.dtype,
                                                        hflip=cfg.tta_hflip, channels_last=f.channels_last,
                                                        desc=desc, progress=f.progress), d)
        last = getattr(self, "last_validation", None)
        if last is not None and last[0] + 1 == f.state["best_epoch"] and not cfg.tta_hflip:
            idx, oof = last[1], last[2]  # best.pt holds the weights that just validated: no second pass
        else:
            idx, oof = run(self.val_loader, "OOF")
        test = None
        if cfg.predict_test:
            test_idx, test_logits = run(self.shard(f.data.test, f.data.test_images), "test")
            test = (f.data.test[ID].to_numpy()[test_idx], test_logits)
        return f.write_outputs(idx, oof, test)

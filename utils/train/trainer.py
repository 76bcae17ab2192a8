"""The fine-tuned route of one fold (``FoldTrainer``): the backbone and heads trained end to end on
images, fed by the decode cache. It gives the epoch loop (``utils/train/kfold.py``, ``fit``) an
epoch of training over the fold's images, its predictions of the validation and test images, and
the best checkpoint's model; the loop owns the rest. What it shares with the frozen route (rows,
model, record, checkpoints, outputs) is the ``Fold`` it is given (utils/train/fold.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler

from utils.data.batched import BatchAugment, per_image_only
from utils.data.dataset import Batches, EpochSampler, ImageDataset, balanced_weights, make_loader
from utils.data.decoded import DecodedImages
from utils.data.schema import CATEGORY, ID, image_path, row_paths
from utils.train.distributed import gather_rows
from utils.train.engine import predict, train_one_epoch
from utils.train.fold import Fold
from utils.train.model import WarmupCosine, build_optimizer, load_checkpoint, retarget
from utils.train.throughput import input_rate


class FoldTrainer:
    """Fine-tunes ``fold``: its images, loaders, optimiser and schedule, and what the epoch loop asks of
    a route: an epoch of training, validation and test predictions, the best checkpoint's model."""

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
        self.trn_loader, self.augment = self.train_input()
        self.val_loader = self.shard(f.val, f.data.train_images, f.csv_dir, persistent=True)
        if f.workers:  # fork the validation workers now, while this process is small: forked after an
            iter(self.val_loader)  # epoch, every page the next step writes is copied (1-3 s)
        self.epochs, steps = cfg.epochs, len(self.trn_loader)  # (``retarget`` may change the epochs)
        self.steps_per_epoch = steps
        self.optimizer = build_optimizer(f.model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay, cfg.layer_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.epochs * steps, int(cfg.warmup_epochs * steps)))
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

    def train_input(self):
        """(the train loader, the batched path's ``BatchAugment`` or None): images augmented one by
        one in the loader workers, or gathered a batch at a time from the decode cache and augmented
        on the device, as ``batch_aug`` says (auto: measured on CUDA; utils/train/throughput.py)."""
        f, cfg = self.fold, self.fold.cfg
        drop_last = len(self.trn_ds) > f.per_rank_batch
        per_image = make_loader(self.trn_ds, f.per_rank_batch, f.workers, self.sampler, drop_last=drop_last,
                                persistent=True, device=f.d.device)
        if cfg.batch_aug == "off" or (cfg.batch_aug == "auto" and f.d.device.type != "cuda"):
            return per_image, None
        unbatchable = per_image_only(cfg.aug, cfg.category_aug, cfg.resize) or (
            [] if self.images is not None else ["the images without a decode cache"])
        if unbatchable:
            f.log(f"augmented image by image: the batched path (batch_aug: {cfg.batch_aug}) cannot apply "
                  f"{', '.join(unbatchable)}")
            return per_image, None
        augment = BatchAugment(cfg.img_size, cfg.aug, cfg.category_aug, f.schema.categories)
        batched = make_loader(Batches(self.trn_ds), None, f.workers,
                              BatchSampler(self.sampler, f.per_rank_batch, drop_last), persistent=True,
                              device=f.d.device)
        if cfg.batch_aug == "on":
            f.log("augmented per batch on the device (batch_aug: on)")
            return batched, augment
        rates = f.d.total([input_rate(per_image, f.d.device), input_rate(batched, f.d.device, augment)])
        faster = rates[1] > rates[0]
        f.log(f"input measured: {rates[0] / f.d.world:,.0f} img/s augmented image by image, "
              f"{rates[1] / f.d.world:,.0f} per batch on the device; "
              f"{'per batch' if faster else 'image by image'} (batch_aug: auto)")
        return (batched, augment) if faster else (per_image, None)

    def shard(self, table: pd.DataFrame, images_dir: Path, base: Path | None = None, persistent: bool = False):
        """An evaluation loader over this rank's share of ``table``'s rows."""
        f = self.fold
        ds = ImageDataset(row_paths(table, images_dir, base), table[CATEGORY], None, f.prep.transform(), f.prep,
                          images=self.images)
        part = torch.utils.data.Subset(ds, list(range(f.d.rank, len(ds), f.d.world)))
        return make_loader(part, f.per_rank_batch, f.workers, persistent=persistent, device=f.d.device)

    # -- what the epoch loop (utils/train/kfold.py) asks of a route
    save_each_epoch = True  # an epoch takes long: best.pt and last.pt after each, for --resume

    def retarget(self, epochs: int) -> None:
        """The fold's schedule ends after ``epochs`` epochs instead (its caller's new count: fit.py's time
        left), its learning rate going on from where it is (utils.train.model.retarget)."""
        retarget(self.scheduler, [epochs * self.steps_per_epoch] * len(self.scheduler.lr_lambdas))
        self.epochs = epochs

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the fold's train images: {"loss", "images_per_s", "seconds", "data_wait"}."""
        f, cfg = self.fold, self.fold.cfg
        self.sampler.set_epoch(epoch)  # the epoch reaches the workers with each row's key
        f.model.freeze_backbone(epoch < cfg.freeze_epochs)
        return train_one_epoch(self.net, self.trn_loader, self.optimizer, self.scheduler, f.d.device,
                               prep=f.prep, amp_dtype=f.dtype, scaler=self.scaler, clip_grad=cfg.clip_grad,
                               grad_accum=cfg.grad_accum, ema=f.ema, channels_last=f.channels_last,
                               keys=self.trn_keys, bad=f.bad, augment=self.augment,
                               desc=f"fold {f.fold} epoch {epoch + 1}/{self.epochs}", progress=f.progress)

    def predict(self, model, loader, desc: str, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        f = self.fold
        return gather_rows(*predict(model, loader, f.d.device, prep=f.prep, amp_dtype=f.dtype, hflip=mirror,
                                    channels_last=f.channels_last, desc=desc, progress=f.progress), f.d)

    def validate(self, model, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the fold's validation rows, logits), gathered from every rank."""
        return self.predict(model, self.val_loader, "validate", mirror)

    def predict_test(self, model, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(test ids, logits) of every test row."""
        f = self.fold
        idx, logits = self.predict(model, self.shard(f.data.test, f.data.test_images), "test", mirror)
        return f.data.test[ID].to_numpy()[idx], logits

    def best_model(self):
        f = self.fold
        best, _ = load_checkpoint(f.dir / "best.pt", f.schema)
        return best.to(f.d.device, memory_format=torch.channels_last if f.channels_last else torch.contiguous_format)

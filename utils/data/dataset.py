"""The image dataset and samplers shared by training, OOF prediction and inference."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from utils.data.batched import batch_seed
from utils.data.schema import IGNORE_INDEX, Schema, image_path
from utils.data.transforms import Preprocess, Transform


def read_or_placeholder(path, prep: Preprocess) -> tuple[np.ndarray, str]:
    """(pixels, "") for a usable image, decoded and sized as ``prep`` says (uint8 [S, S, 3]);
    (grey square, reason) for a missing, empty, truncated, non-image or degenerate (under 2x2
    pixels) file. Callers decide what a bad image means."""
    try:
        image = prep.decode(path)
        if image.shape[0] < 2 or image.shape[1] < 2:
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} pixels")
        return prep.size(image), ""
    except Exception as err:  # unreadable, truncated, missing, not an image, degenerate
        return placeholder(prep.img_size), f"{type(err).__name__}: {err}"


def placeholder(size: int) -> np.ndarray:
    """The grey square that stands for an unusable image."""
    return np.full((size, size, 3), 127, dtype=np.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """Rows of (image path, category, targets). An image that cannot be read is replaced by a
    grey square and flagged (``ok`` False, ``error`` set); its targets become IGNORE_INDEX so it
    never trains, and the caller decides what else a bad image means. With ``images`` (a
    ``utils.data.decoded.DecodedImages`` holding every path), the decoded pixels are read from that
    cache instead of decoded again: the same arrays, reasons included.

    With ``augment_seed``, a row's augmentation is seeded by (augment_seed, epoch, row): the key
    is ``(row, epoch)``, as ``EpochSampler`` yields it, so the epoch reaches loader workers that
    persist across epochs, and the same row gets the same pixels whatever the worker layout."""

    def __init__(self, paths: list, categories: list[str], targets: np.ndarray | None,
                 transform: Transform, prep: Preprocess, augment_seed: int | None = None,
                 soft: np.ndarray | None = None, soft_heads: np.ndarray | None = None, images=None):
        self.paths, self.categories, self.targets = list(paths), list(categories), targets
        self.images, self.slots = images, None if images is None else images.slots(self.paths)
        self.transform, self.prep = transform, prep
        self.augment_seed = augment_seed  # None: evaluation, no per-sample randomness
        self.soft, self.soft_heads = soft, soft_heads  # a teacher's probabilities (utils/train/distill.py)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> dict:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.images is not None:
            image, error = self.images.read(self.slots[i])
        else:
            image, error = read_or_placeholder(self.paths[i], self.prep)
        seed = None
        if self.augment_seed is not None:
            seed = (self.augment_seed * 1_000_003 + epoch * 100_003 + i) % 2**32
        x = torch.from_numpy(self.transform(image, self.categories[i], seed))
        item = {"image": x, "index": i, "ok": not error, "error": error}
        if self.targets is not None:
            item["target"] = self.target(i, np.array(not error))
        return item

    def target(self, rows, ok: np.ndarray):
        """The training target of ``rows`` (a row, or an array of them): the labels, IGNORE_INDEX for
        an unusable image; for a student also the teacher's probabilities."""
        t = np.where(ok[..., None], self.targets[rows], IGNORE_INDEX)
        hard = torch.as_tensor(t, dtype=torch.long)
        if self.soft is None:
            return hard
        return {"hard": hard, "soft": torch.as_tensor(self.soft[rows], dtype=torch.float32),  # a bad image
                "soft_heads": torch.as_tensor(self.soft_heads[rows] & ok[..., None])}  # learns nothing from it

    def gather(self, keys: list) -> dict:
        """A whole batch of ``(row, epoch)`` keys read from the decode cache in one copy, not
        augmented: the batched path's item (``Batches``; utils/data/batched.py augments it on the
        device with each row's category and the batch's ``seed``). The keys of the per-image items,
        collated, plus "category" and "seed"; "image" is uint8 [B, 3, S, S] in NHWC memory."""
        rows = np.array([k[0] for k in keys], dtype=np.int64)
        pixels, errors = self.images.gather(self.slots[rows])
        ok = np.array([not e for e in errors])
        batch = {"image": torch.from_numpy(pixels).permute(0, 3, 1, 2), "index": torch.from_numpy(rows),
                 "ok": torch.from_numpy(ok), "error": errors, "category": [self.categories[i] for i in rows],
                 "seed": batch_seed(self.augment_seed or 0, keys[0][1] if keys else 0, rows)}
        if self.targets is not None:
            batch["target"] = self.target(rows, ok)
        return batch


class Batches(torch.utils.data.Dataset):
    """The batched path's dataset: ``dataset.gather`` of each batch of keys that a
    ``BatchSampler`` yields (a loader over it takes ``batch_size=None``)."""

    def __init__(self, dataset: ImageDataset):
        if dataset.images is None:
            raise ValueError("the batched path reads the decode cache; this dataset has none")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, keys: list) -> dict:
        return self.dataset.gather(keys)


class EpochSampler(Sampler):
    """Shuffled (or class-balanced) ``(row, epoch)`` keys for one rank, reproducible from
    (seed, epoch).

    Without ``weights`` it is a plain shuffle split across ranks (DistributedSampler-like, with
    padding so every rank gets the same number of batches). With ``weights`` it draws
    ``len(weights)`` rows with replacement in proportion to them (a class-balanced sampler)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, weights: np.ndarray | None = None):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.per_rank = -(-n // world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        order = torch.cat([order, order[: self.per_rank * self.world - self.n]])
        return iter([(i, self.epoch) for i in order[self.rank::self.world].tolist()])

    def __len__(self) -> int:
        return self.per_rank


def balanced_weights(targets: np.ndarray, schema: Schema, power: float = 0.5, cap: float = 10.0) -> np.ndarray:
    """Row weight = the largest class weight (``Schema.class_weights``) over the row's given
    labels: a row carrying a rare class is drawn more often."""
    w = np.ones(len(targets))
    for j, h in enumerate(schema.heads):
        boost = schema.class_weights(h.name, power, cap)
        given = targets[:, j] >= 0
        w[given] = np.maximum(w[given], boost[targets[given, j]])
    return w


def init_worker(worker_id: int, background: bool = False) -> None:
    """A loader worker decodes and augments: one compute thread, no OpenCV thread pool, so that
    workers and the training step do not oversubscribe the cores. With ``background`` (training
    on CPU, whose step keeps every core busy) the worker runs in Linux's idle scheduling class:
    it takes the cores the step leaves idle (waits, the Python between kernels, a drained queue)
    instead of preempting a compute thread mid-kernel, which stalls its partners at the next
    barrier. Nothing is lost when no core is idle: the step then waits for a batch, and the
    workers run."""
    import random

    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    if background and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # not allowed here: the worker keeps the default class
            pass
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, sampler: Sampler | None = None,
                drop_last: bool = False, persistent: bool = False, device: torch.device | None = None) -> DataLoader:
    """A DataLoader with its own random generator (it never draws from the global one, which
    drives dropout: resume gives the same result) and, with ``persistent``, workers that live
    across epochs (no restart cost per epoch). ``device``, where the batches go: pinned memory
    for CUDA; for the CPU, workers in the background (``init_worker``)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, drop_last=drop_last,
                      worker_init_fn=functools.partial(init_worker, background=device.type == "cpu"),
                      generator=torch.Generator().manual_seed(0), persistent_workers=persistent and workers > 0,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def warn_bad(batch: dict, keys, bad: dict) -> None:
    """Record (and warn once about) the unreadable images of a batch: ``keys[row]`` is the row's
    (split, id), since train and test ids overlap."""
    for k in np.flatnonzero(~batch["ok"].numpy()):
        split, row_id = keys[int(batch["index"][k])]
        if (split, row_id) not in bad:
            bad[(split, row_id)] = batch["error"][k]
            warnings.warn(f"{split} image of id {row_id} could not be used ({batch['error'][k]}); "
                          f"it is skipped", stacklevel=2)


class TestImages(torch.utils.data.Dataset):
    """Each test image decoded once per distinct preprocessing, exactly as its checkpoint's
    training decoded and transformed its validation images: uint8 pixels, normalised in the main
    process by each ``Preprocess``."""

    def __init__(self, ids, images_dir: Path, preps: list[Preprocess]):
        self.ids, self.images_dir, self.preps = list(ids), images_dir, preps
        self.transforms = [p.transform() for p in preps]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        images, error = [], ""
        for prep, tf in zip(self.preps, self.transforms):
            image, problem = read_or_placeholder(image_path(self.images_dir, self.ids[i]), prep)
            error = error or problem
            images.append(torch.from_numpy(tf(image)))
        return {"images": images, "index": i, "ok": not error, "error": error}

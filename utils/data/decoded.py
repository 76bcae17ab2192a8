"""The decode cache: every image of a run decoded once, then read instead of decoded at every epoch.

Decoding a JPEG was half of a loader item's cost and the loader's work takes cores from the
training step on a CPU (BENCHMARKS.md, "Training throughput"). So before its first fold the
trainer decodes every train and test image once, with every core, and sizes it to the model's
input, exactly as ``read_or_placeholder`` does (draft scale, resize policy), into

    <out_dir>/decoded/<key>.bin    the pixels: uint8 RGB arrays one after the other
    <out_dir>/decoded/<key>.npz    paths, offsets, shapes and, for an unusable image, the reason
                                   (written last: it marks the cache complete)

Loader workers map the ``.bin`` into memory and augment from there. The arrays are the very ones
``read_or_placeholder`` returns, so a run trains to the same weights with the cache or without
it; an unusable image keeps its reason and becomes the same grey placeholder. The key hashes the
decoding settings (size, resize, draft, interpolation) and every image's path, size and
modification time: an image that changes gets a new cache, and folds, epochs and runs that
decode alike share one. A cache that would leave the disk nearly full is abandoned with a
warning, and training decodes on the fly (``decode_cache: false`` does that from the start).
Delete the folder to reclaim it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.data.dataset import init_worker, placeholder, read_or_placeholder
from utils.data.transforms import Preprocess
from utils.io import atomic_path, atomic_write
from utils.provenance import files_digest

LAYOUT = 2  # the files' own format: raised when it changes, so an older cache is rebuilt, not misread
IN_PROCESS_BELOW = 1000  # images: fewer decode in the calling process before workers would have started


def decode_workers(n_images: int, workers: int) -> int:
    """The worker processes that decode ``n_images`` when ``workers`` are offered."""
    return workers if n_images >= IN_PROCESS_BELOW else 0


def cache_key(paths: list[str], prep: Preprocess) -> str:
    """A hash of the decoding settings (every ``Preprocess`` field but the normalisation's mean and
    std, which the cached pixels do not depend on) and of every image's path, size and
    modification time."""
    decoding = {k: v for k, v in prep.to_dict().items() if k not in ("mean", "std")}
    settings = json.dumps({"layout": LAYOUT, **decoding}, sort_keys=True)
    return hashlib.sha256((settings + files_digest(paths, key=str)).encode()).hexdigest()[:16]


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], prep: Preprocess):
        self.paths, self.prep = paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        return read_or_placeholder(self.paths[i], self.prep)


class DecodedImages:
    """The cache of one set of images (see above): ``slots(paths)`` once, then ``read(slot)``.
    Picklable: each loader worker maps the pixels file on its first read."""

    def __init__(self, index: Path):
        with np.load(index, allow_pickle=False) as z:
            self.paths, self.offsets, self.shapes, self.errors = z["paths"], z["offsets"], z["shapes"], z["errors"]
            self.img_size = int(z["img_size"])
        self.bin = index.with_suffix(".bin")
        self.position = {str(p): k for k, p in enumerate(self.paths)}
        self._pixels = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # a worker maps the file itself

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    @property
    def pixels(self) -> np.memmap:
        """The pixels file, mapped on first use (in each loader worker)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.bin, dtype=np.uint8, mode="r")
        return self._pixels

    def slots(self, paths) -> np.ndarray:
        """The cache's slot of each path; raises KeyError naming a path it does not hold."""
        out = np.empty(len(paths), dtype=np.int64)
        for k, p in enumerate(paths):
            try:
                out[k] = self.position[os.path.abspath(p)]
            except KeyError:
                raise KeyError(f"{p} is not in the decode cache {self.bin}") from None
        return out

    def read(self, slot: int) -> tuple[np.ndarray, str]:
        """(image, "") or (grey placeholder, reason): what ``read_or_placeholder`` returned for it."""
        if self.errors[slot]:
            return placeholder(self.img_size), str(self.errors[slot])
        h, w = self.shapes[slot]
        start = self.offsets[slot]
        return np.array(self.pixels[start:start + h * w * 3]).reshape(h, w, 3), ""  # a writable copy

    def gather(self, slots) -> tuple[np.ndarray, list[str]]:
        """(uint8 [B, S, S, 3], reasons) of many slots in one copy, for the batched path
        (utils/data/batched.py): every usable image of the cache is S x S (``Preprocess.size``), so
        the file is an array of them; an unusable one is the grey placeholder, its reason kept."""
        slots = np.asarray(slots, dtype=np.int64)
        s = self.img_size
        usable = self.errors[slots] == ""
        if not (self.shapes[slots[usable]] == s).all():
            raise ValueError(f"{self.bin} holds images other than {s} x {s}; it cannot be read a batch at a time")
        stack = self.pixels[: self.nbytes].reshape(-1, s, s, 3)
        rows = self.offsets[slots[usable]] // (s * s * 3)  # an unusable image takes no bytes
        if usable.all():
            out = np.take(stack, rows, axis=0)
        else:
            out = np.broadcast_to(placeholder(s), (len(slots), s, s, 3)).copy()
            out[usable] = stack[rows]
        return out, [str(e) for e in self.errors[slots]]

    @staticmethod
    def index_path(folder: Path, paths, prep: Preprocess) -> tuple[Path, list[str]]:
        paths = sorted({os.path.abspath(p) for p in paths})
        return Path(folder) / f"{cache_key(paths, prep)}.npz", paths

    @classmethod
    def find(cls, folder: Path, paths, prep: Preprocess) -> "DecodedImages | None":
        """The complete cache of exactly these images and settings in ``folder``, or None."""
        index, _ = cls.index_path(folder, paths, prep)
        return cls(index) if index.is_file() else None

    @classmethod
    def build_or_load(cls, folder: Path, paths, prep: Preprocess, workers: int, progress: bool = True,
                      log=print) -> "DecodedImages | None":
        """The cache of ``paths`` in ``folder``: loaded when its key matches, else built with
        ``workers`` processes. None (with a warning) when the disk would be left nearly full."""
        index, paths = cls.index_path(folder, paths, prep)
        if index.is_file():
            cache = cls(index)
            log(f"decoded images reused from {cache.bin} ({len(cache):,} images, {cache.nbytes / 1e6:,.0f} MB)")
            return cache
        index.parent.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(index.parent)
        room = disk.free - max(2 << 30, disk.total // 20)  # leave 2 GB or 5 % of the disk free
        start = time.perf_counter()
        offsets, shapes, errors = [0], [], []
        workers = decode_workers(len(paths), workers)
        loader = torch.utils.data.DataLoader(_Decode(paths, prep), batch_size=16, num_workers=workers,
                                             collate_fn=list, worker_init_fn=init_worker)
        try:
            with atomic_path(index.with_suffix(".bin")) as tmp, open(tmp, "xb") as f:
                for batch in tqdm(loader, desc="decode cache", total=len(loader), leave=False, disable=not progress,
                                  dynamic_ncols=True):
                    for image, error in batch:
                        image = image[:0] if error else image
                        f.write(np.ascontiguousarray(image).data)
                        offsets.append(offsets[-1] + image.nbytes)
                        shapes.append(image.shape[:2])
                        errors.append(error)
                    if offsets[-1] > room:
                        raise _NoRoom
        except (_NoRoom, OSError) as err:
            if isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            warnings.warn(f"the decode cache of {len(paths):,} images would leave less than 2 GB or 5 % of the disk "
                          f"of {index.parent} free; training decodes images on the fly instead "
                          f"(decode_cache: false says so from the start)", stacklevel=2)
            return None
        arrays = {"paths": np.array(paths), "offsets": np.array(offsets, dtype=np.int64),
                  "shapes": np.array(shapes, dtype=np.int32).reshape(-1, 2), "errors": np.array(errors),
                  "img_size": np.int64(prep.img_size)}
        atomic_write(index, lambda f: np.savez(f, **arrays))
        seconds = time.perf_counter() - start
        log(f"decoded {len(paths):,} images once in {seconds:.1f} s ({len(paths) / seconds:,.0f} img/s, "
            f"{workers} workers) into {index.with_suffix('.bin')} ({offsets[-1] / 1e6:,.0f} MB); "
            f"every epoch reads them from there")
        return cls(index)


class _NoRoom(Exception):
    pass


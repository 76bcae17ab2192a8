"""Atomic file writes and the prediction-file contract.

Every output of the kit is written to a temporary file in the same folder and then renamed
over the target, so a killed process never leaves a half-written checkpoint, logits file,
``ensemble.json`` or ``submission.csv`` behind: the target is either the old file or the new one.

Prediction files (``oof_logits.npz``, ``test_logits.npz``) hold:
  ids      int64 [N]        the row ids, in the order of the rows of ``logits``
  logits   float32 [N, L]   raw logits, laid out by the schema's heads (offset, width)
  schema   str              the schema fingerprint the logits were made with
  fold     int              the fold (-1 for a file that merges folds)
  provenance str            JSON: the inputs it was made from (utils/provenance.py)
Whoever reads them checks ids and fingerprint and fails loudly on a mismatch.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Callable

import numpy as np

from utils.errors import DataError

_HOST = socket.gethostname().replace(".", "_")
_SWEPT: set[Path] = set()  # folders this process has cleared of dead writers' temporary files


def _stale(tmp: Path) -> bool:
    """A temporary file left by a writer on this host that no longer runs (killed mid-write)."""
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2].split("-")[-2])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, IndexError, OSError):  # not our name, or alive under another user
        return False
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but was not reaped (an orphaned pool worker in a container whose
    init does not reap) still answers ``kill(pid, 0)``; /proc says it is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # reaped since kill(pid, 0) answered; or a system without /proc
        return Path("/proc/self/stat").is_file()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``,
    and when it fails, remove it. For writers that need a file name (savefig, ONNX, PIL).

    The temporary name is ``.<name>.<host>-<pid>-<random>.tmp``. A process killed with ``kill -9``
    leaves only that hidden file; the first write of a later process into the same folder removes
    it (the folder is listed once per process: a folder of 50,000 images is not listed per image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _SWEPT:
        _SWEPT.add(path.parent)
        for old in path.parent.glob(f".*.{glob.escape(_HOST)}-*.tmp"):
            if _stale(old):
                old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_csv(path: str | Path, df) -> None:
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def atomic_torch_save(path: str | Path, obj) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint, read with ``torch.load(weights_only=True)``: tensors and plain containers
    only. A file holding any other Python object is refused, and nothing in it runs. With ``mmap``
    the tensors are memory-mapped, read only where used (a file of torch's zip format)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
        raise DataError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                        f"containers, which could run code" + (f" ({lines[0].strip()})" if lines else "")) from None


def save_logits(path: str | Path, ids: np.ndarray, logits: np.ndarray, fingerprint: str,
                fold: int, provenance: dict | None = None) -> None:
    """Write a logits file; ``provenance`` (utils.provenance.record) is stored as JSON text."""
    ids = np.asarray(ids, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32)
    if len(ids) != len(logits):
        raise ValueError(f"{path}: {len(ids)} ids but {len(logits)} logit rows")
    extra = {"provenance": json.dumps(provenance)} if provenance is not None else {}
    atomic_write(path, lambda f: np.savez(f, ids=ids, logits=logits, schema=fingerprint,
                                          fold=np.int64(fold), **extra))


def load_logits(path: str | Path, fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ids, logits)``; raise when the file was made with another schema."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"logits file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        ids, logits, found = z["ids"], z["logits"], str(z["schema"])
    if fingerprint is not None and found != fingerprint:
        raise ValueError(f"{path}: made with schema {found}, but this run's schema is "
                         f"{fingerprint}; the heads or vocabularies differ")
    return ids, logits

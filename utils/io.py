"""Atomic file writes and the prediction-file contract.

Every output of the kit is written to a temporary file in the same folder and then renamed
over the target, so a killed process never leaves a half-written checkpoint, logits file,
``ensemble.json`` or ``submission.csv`` behind: the target is either the old file or the new one.

Prediction files (``oof_logits.npz``, ``test_logits.npz``) hold:
  ids      int64 [N]        the row ids, in the order of the rows of ``logits``
  logits   float32 [N, L]   raw logits, laid out by the schema's heads (offset, width)
  schema   str              the schema fingerprint the logits were made with
  fold     int              the fold (-1 for a file that merges folds)
Whoever reads them checks ids and fingerprint and fails loudly on a mismatch.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_csv(path: str | Path, df) -> None:
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def atomic_torch_save(path: str | Path, obj) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def save_logits(path: str | Path, ids: np.ndarray, logits: np.ndarray, fingerprint: str,
                fold: int) -> None:
    ids = np.asarray(ids, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float32)
    if len(ids) != len(logits):
        raise ValueError(f"{path}: {len(ids)} ids but {len(logits)} logit rows")
    atomic_write(path, lambda f: np.savez(f, ids=ids, logits=logits, schema=fingerprint,
                                          fold=np.int64(fold)))


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

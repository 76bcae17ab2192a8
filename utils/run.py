"""The run folder: one object that knows every file the pipeline writes there.

    runs/<name>/
      schema.json, folds.csv             fitted once by the first script, then only read
      labels.json                        a digest of the train labels they were made with; checked by every reader
      <run>/fold<k>/                     one fold of one trained run (see utils/train/fold.py)
        best.pt, last.pt, oof_logits.npz, test_logits.npz, history.csv, metrics.json, config.yaml
      <run>/oof_score.json               when every fold is done
      decoded/<key>.bin, .npz            every image decoded and sized once, for training (utils/data/decoded.py)
      ensemble.json, ensemble_heads.png  ensemble.py
      onnx/manifest.json, onnx/*.onnx    export.py

A fold is complete when its ``metrics.json`` exists: train.py writes it last, after the
checkpoint and both logits files. A run is complete when all its folds are. Scripts ask this
object for paths, the schema, the folds and the complete runs; none re-derives them.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from utils.data.folds import make_folds
from utils.data.schema import ID, Dataset, Schema
from utils.errors import DataError
from utils.io import atomic_write_csv, atomic_write_json


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- the files
    @property
    def schema_path(self) -> Path:
        return self.path / "schema.json"

    @property
    def folds_path(self) -> Path:
        return self.path / "folds.csv"

    @property
    def ensemble_path(self) -> Path:
        return self.path / "ensemble.json"

    @property
    def onnx_dir(self) -> Path:
        return self.path / "onnx"

    @property
    def manifest_path(self) -> Path:
        return self.onnx_dir / "manifest.json"

    def fold_dir(self, run: str, fold: int) -> Path:
        return self.path / run / f"fold{fold}"

    def fold_file(self, run: str, fold: int, name: str) -> Path:
        """``best.pt``, ``last.pt``, ``oof_logits.npz``, ``test_logits.npz``, ``metrics.json``..."""
        return self.fold_dir(run, fold) / name

    # -- schema and folds
    @cached_property
    def schema(self) -> Schema:
        if not self.schema_path.is_file():
            raise DataError(f"{self.schema_path} not found: {self.path} is not a run folder yet; "
                            f"run train.py with --out-dir {self.path} first")
        return Schema.load(self.schema_path)

    @cached_property
    def folds(self) -> pd.DataFrame:
        """``id, fold`` of every original train row."""
        if not self.folds_path.is_file():
            raise DataError(f"{self.folds_path} not found: run train.py with --out-dir {self.path} first")
        return pd.read_csv(self.folds_path)

    @property
    def n_folds(self) -> int:
        return int(self.folds["fold"].nunique())

    def prepare(self, data: Dataset, n_folds: int, seed: int) -> tuple[Schema, pd.DataFrame]:
        """Load (or, the first time, fit and write) ``schema.json`` and ``folds.csv``.

        Returns the schema and the train table with a ``fold`` column. A run folder whose schema
        no longer matches the data, or whose folds were made for other ids or another k, is an
        error, never silently rebuilt. Rows of an augmented train CSV (``source_id`` column) take
        the fold of their source image."""
        fitted = Schema.fit(data.train, data.category_attrs)
        if self.schema_path.is_file():
            schema = Schema.load(self.schema_path)
            schema.check_same(fitted, f"{data.root}'s train.csv, against {self.schema_path},")
        else:
            schema = fitted
            schema.save(self.schema_path)
        self.__dict__["schema"] = schema

        train = data.train
        source = train["source_id"] if "source_id" in train else train[ID]
        originals = train[source == train[ID]]
        if self.folds_path.is_file():
            folds = pd.read_csv(self.folds_path)
            if folds["fold"].nunique() != n_folds:
                raise DataError(f"{self.folds_path} has {folds['fold'].nunique()} folds but n_folds is "
                                f"{n_folds}; use another --out-dir or delete the file")
            unknown = ~originals[ID].isin(folds[ID])
            if unknown.any():
                raise DataError(f"{self.folds_path}: {int(unknown.sum())} train id(s) have no fold, e.g. "
                                f"{originals[ID][unknown].head(3).tolist()}; the train data changed")
        else:
            folds = make_folds(originals, schema, n_folds, seed)
            atomic_write_csv(self.folds_path, folds)
        self.__dict__["folds"] = folds
        fold_of = dict(zip(folds[ID], folds["fold"]))
        train = train.copy()
        train["fold"] = source.map(fold_of)
        if train["fold"].isna().any():
            bad = train[train["fold"].isna()]
            raise DataError(f"{bad[ID].iloc[0]}: augmented row whose source id "
                            f"{source[train['fold'].isna()].iloc[0]} has no fold")
        train["fold"] = train["fold"].astype(np.int64)
        if self.labels_path.is_file():
            self.check_labels(originals)
        else:
            atomic_write_json(self.labels_path, {"rows": len(originals), "digest": self.labels_digest(originals)})
        return schema, train

    def train_rows(self, train: pd.DataFrame) -> pd.DataFrame:
        """The original train rows this folder's folds cover, with their ``fold``, in train order
        (the rows OOF logits are about); their labels must be the ones the folder was made with."""
        rows = train[train[ID].isin(self.folds[ID])].reset_index(drop=True)
        rows["fold"] = rows[ID].map(dict(zip(self.folds[ID], self.folds["fold"]))).astype(np.int64)
        if self.labels_path.is_file():
            self.check_labels(rows)
        return rows

    # -- the labels the folds and runs were made with
    @property
    def labels_path(self) -> Path:
        return self.path / "labels.json"

    def labels_digest(self, rows: pd.DataFrame) -> str:
        """SHA-256 of the rows' ids and encoded targets, in id order: a relabelled train.csv with the
        same vocabularies (which the schema does not see) gives another digest."""
        rows = rows.sort_values(ID)
        h = hashlib.sha256(rows[ID].to_numpy(np.int64).tobytes())
        h.update(self.schema.encode(rows).astype(np.int64).tobytes())
        return h.hexdigest()

    def check_labels(self, rows: pd.DataFrame) -> None:
        recorded = json.loads(self.labels_path.read_text())
        if self.labels_digest(rows) != recorded["digest"]:
            raise DataError(f"the train labels differ from those {self.path} was made with ({self.labels_path}): "
                            f"its folds, OOF logits, ensemble and exports were fitted on the old labels. Train on "
                            f"the new labels in a new --out-dir, or restore the train.csv this folder was made from")

    # -- complete runs
    def fold_complete(self, run: str, fold: int) -> bool:
        return self.fold_file(run, fold, "metrics.json").is_file()

    def complete_runs(self) -> list[str]:
        """Every run whose folds are all complete, sorted by name."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_dir() and all(self.fold_complete(p.name, k) for k in range(self.n_folds)))

    def optimistic_student(self, run: str) -> bool:
        """Whether ``run`` is a student trained with ``distill_mode: optimistic``, whose scores saw its
        validation labels through its teacher (utils/train/distill.py)."""
        import yaml

        path = self.fold_file(run, 0, "config.yaml")
        cfg = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
        return bool(cfg.get("teacher")) and cfg.get("distill_mode", "optimistic") == "optimistic"

    def optimistic_note(self, run: str) -> str:
        """What a printed score of ``run`` must say when it is an optimistic student's, else ''."""
        return "optimistic: a student that saw its validation labels" if self.optimistic_student(run) else ""

    def require_complete(self, runs: list[str]) -> None:
        """Raise, naming the folds, when a run is not complete."""
        for run in runs:
            missing = [k for k in range(self.n_folds) if not self.fold_complete(run, k)]
            if missing:
                raise DataError(f"run {run} in {self.path}: fold(s) {missing} not complete (no "
                                f"metrics.json); run train.py --model ... --name {run} --fold all --resume")

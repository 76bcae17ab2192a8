"""Multilabel-stratified folds, built once per run folder and cached as ``folds.csv``.

The stratification target of a row is the one-hot of its category and of every
(category, attribute, value) it carries, missing labels as zeros, so each fold keeps the share of
every frequent class, rare classes as well as the split allows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from utils.io import atomic_write_csv
from utils.schema import CATEGORY, ID, DataError, Dataset, Schema


def stratification_matrix(train: pd.DataFrame, schema: Schema) -> np.ndarray:
    cats = schema.category_index(train[CATEGORY])
    categories = np.eye(len(schema.categories), dtype=np.uint8)[cats]
    return np.concatenate([categories, schema.one_hot(schema.encode(train), np.uint8)], axis=1)


def make_folds(train: pd.DataFrame, schema: Schema, n_folds: int, seed: int) -> pd.DataFrame:
    """DataFrame ``id, fold``, deterministic for (rows, n_folds, seed)."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    y = stratification_matrix(train, schema)
    fold = np.full(len(train), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(train)), y)):
        fold[val] = k
    return pd.DataFrame({ID: train[ID].to_numpy(), "fold": fold})


def prepare_run(data: Dataset, out_dir: str | Path, n_folds: int, seed: int) -> tuple[Schema, pd.DataFrame]:
    """Load (or, the first time, fit and write) the run's ``schema.json`` and ``folds.csv``.

    Returns the schema and the train table with a ``fold`` column. A run folder whose schema no
    longer matches the data, or whose folds were made for other ids or another k, is an error,
    never silently rebuilt. Rows of an augmented train CSV (``source_id`` column) take the
    fold of their source image.
    """
    out_dir = Path(out_dir)
    fitted = Schema.fit(data.train, data.category_attrs)
    schema_path = out_dir / "schema.json"
    if schema_path.is_file():
        schema = Schema.load(schema_path)
        schema.check_same(fitted, f"{data.root}'s train.csv, against {schema_path},")
    else:
        schema = fitted
        schema.save(schema_path)

    train = data.train
    source = train["source_id"] if "source_id" in train else train[ID]
    originals = train[source == train[ID]] if "source_id" in train else train
    folds_path = out_dir / "folds.csv"
    if folds_path.is_file():
        folds = pd.read_csv(folds_path)
        if folds["fold"].nunique() != n_folds:
            raise DataError(f"{folds_path} has {folds['fold'].nunique()} folds but n_folds is "
                            f"{n_folds}; use another --out-dir or delete the file")
        unknown = ~originals[ID].isin(folds[ID])
        if unknown.any():
            raise DataError(f"{folds_path}: {int(unknown.sum())} train id(s) have no fold, e.g. "
                            f"{originals[ID][unknown].head(3).tolist()}; the train data changed")
    else:
        folds = make_folds(originals, schema, n_folds, seed)
        atomic_write_csv(folds_path, folds)
    fold_of = dict(zip(folds[ID], folds["fold"]))
    train = train.copy()
    train["fold"] = source.map(fold_of)
    if train["fold"].isna().any():
        bad = train[train["fold"].isna()]
        raise DataError(f"{bad[ID].iloc[0]}: augmented row whose source id "
                        f"{source[train['fold'].isna()].iloc[0]} has no fold")
    train["fold"] = train["fold"].astype(np.int64)
    return schema, train

"""Multilabel-stratified folds (built once per run folder and cached as ``folds.csv`` by
``utils.run.RunDir.prepare``).

The stratification target of a row is the one-hot of its category and of every
(category, attribute, value) it carries, missing labels as zeros, so each fold keeps the share of
every frequent class, rare classes as well as the split allows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from utils.data.schema import CATEGORY, ID, Schema


def stratification_matrix(train: pd.DataFrame, schema: Schema) -> np.ndarray:
    cats = schema.category_index(train[CATEGORY])
    categories = np.eye(len(schema.categories), dtype=np.uint8)[cats]
    return np.concatenate([categories, schema.one_hot(schema.encode(train), np.uint8)], axis=1)


def make_folds(train: pd.DataFrame, schema: Schema, n_folds: int, seed: int) -> pd.DataFrame:
    """DataFrame ``id, fold``, deterministic for (rows, n_folds, seed)."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold  # scikit-learn: ~0.7 s of imports, paid here only

    y = stratification_matrix(train, schema)
    fold = np.full(len(train), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(train)), y)):
        fold[val] = k
    return pd.DataFrame({ID: train[ID].to_numpy(), "fold": fold})

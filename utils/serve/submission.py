"""Turning logits into a validated submission.csv (written atomically)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from utils.data.schema import ATTR_COLS, CATEGORY, ID, LEN, Schema
from utils.io import atomic_write_csv
from utils.metric import validate_submission


def make_submission(ids, categories, logits: np.ndarray, schema: Schema) -> pd.DataFrame:
    """One row per id: its category's heads decoded by argmax, ``dummy_value`` past len."""
    return submission_from_predictions(ids, categories, schema.predict(logits), schema)


def submission_from_predictions(ids, categories, pred: np.ndarray, schema: Schema) -> pd.DataFrame:
    """The same from ``schema.predict``'s class indices (what infer.py keeps while it streams)."""
    decoded = schema.labels(pred, categories)
    decoded.insert(0, ID, np.asarray(ids, dtype=np.int64))
    return decoded[[ID, CATEGORY, LEN] + ATTR_COLS]


def write_submission(sub: pd.DataFrame, test: pd.DataFrame, schema: Schema, path: str | Path) -> None:
    """Validate against test.csv and the schema, then write; refuse to write an invalid file."""
    problems = validate_submission(sub, test, schema)
    if problems:
        raise ValueError(f"refusing to write an invalid submission to {path}:\n  "
                         + "\n  ".join(problems))
    atomic_write_csv(path, sub)


def majority_logits(schema: Schema, n_rows: int) -> np.ndarray:
    """Logits whose argmax is each head's most frequent train class."""
    return np.tile(schema.prior_logits(), (n_rows, 1))

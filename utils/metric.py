"""The competition score, and the submission validator.

For every (category, attribute) head, over the rows of that category whose true value is given:
  micro-F1 (= accuracy for single-label classes), and
  macro-F1 with scikit-learn's ``average="macro"`` semantics: the mean F1 over the labels that
  occur in the truth or in the prediction. A prediction outside the vocabulary (``dummy_value``
  included) is simply a label that never occurs in the truth: it is wrong, and it adds a
  zero-F1 label to the macro mean.
The head's score is the harmonic mean of the two (0 when both are 0). A head whose truth is
empty for every row is left out (F1 is undefined there). A category scores the mean of its heads;
the final score is the mean of the categories.

    python -m utils.metric --submission submission.csv --solution data/demo/test_solution.csv

prints the per-category table, then the final score alone on its last line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.config import option, run_command
from utils.data.schema import ATTR_COLS, CATEGORY, DUMMY, ID, LEN, read_category_attributes, read_submission


@dataclass
class MetricConfig:
    submission: str = option("submission.csv", "the submission to score")
    solution: str = option("data/demo/test_solution.csv", "the true labels, in the submission layout")
    per_head: bool = option(False, "also print the per-head table")


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> tuple[float, float, float]:
    """(micro-F1, macro-F1, harmonic mean) of integer labels in [0, n_labels)."""
    if len(y_true) == 0:
        return float("nan"), float("nan"), float("nan")
    hit = y_true == y_pred
    micro = float(hit.mean())
    tp = np.bincount(y_true[hit], minlength=n_labels)
    support = np.bincount(y_true, minlength=n_labels) + np.bincount(y_pred, minlength=n_labels)
    present = support > 0
    macro = float((2.0 * tp[present] / support[present]).mean())
    score = 2 * micro * macro / (micro + macro) if micro + macro > 0 else 0.0
    return micro, macro, score


def f1_score_rows(y_true: np.ndarray, y_preds: np.ndarray, n_labels: int) -> np.ndarray:
    """``f1_scores(y_true, p, n_labels)[2]`` of every row ``p`` of ``y_preds`` [S, N] at once (to
    float rounding): the bias search scores a whole grid of candidate predictions in one call."""
    if len(y_true) == 0:
        return np.full(len(y_preds), np.nan)
    rows = y_preds.shape[0]
    hit = y_preds == y_true
    micro = hit.mean(axis=1)
    flat = y_preds + (np.arange(rows) * n_labels)[:, None]  # each row's labels in its own block
    tp = np.bincount(flat[hit], minlength=rows * n_labels).reshape(rows, n_labels)
    support = (np.bincount(flat.ravel(), minlength=rows * n_labels).reshape(rows, n_labels)
               + np.bincount(y_true, minlength=n_labels))
    present = support > 0
    macro = np.where(present, 2.0 * tp / np.maximum(support, 1), 0.0).sum(axis=1) / present.sum(axis=1)
    total = micro + macro
    return np.where(total > 0, 2 * micro * macro / np.where(total > 0, total, 1.0), 0.0)


def final_score(head_scores: np.ndarray, head_category: np.ndarray) -> float:
    """Mean over categories of the mean of their heads' scores; NaN heads (no truth) left out."""
    head_scores = np.asarray(head_scores, dtype=np.float64)
    keep = ~np.isnan(head_scores)
    if not keep.any():
        return 0.0
    cats, inverse = np.unique(np.asarray(head_category)[keep], return_inverse=True)
    sums = np.bincount(inverse, weights=head_scores[keep], minlength=len(cats))
    return float((sums / np.bincount(inverse, minlength=len(cats))).mean())


def summarize(table: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    """Final score and per-category table from a per-head table (columns category, score, ...)."""
    scored = table.dropna(subset=["score"])
    per_cat = scored.groupby("category", sort=False).agg(
        heads=("score", "size"), micro_f1=("micro_f1", "mean"), macro_f1=("macro_f1", "mean"),
        score=("score", "mean")).reset_index()
    return final_score(table["score"].to_numpy(), table["category"].to_numpy()), per_cat


def score_logits(schema, targets: np.ndarray, logits: np.ndarray) -> tuple[float, pd.DataFrame]:
    """Final score and per-head table of logits [N, L] against encoded targets [N, n_heads]
    (``Schema.encode``): each head decoded by argmax over its own slice, on its given rows."""
    rows = []
    for j, head in enumerate(schema.heads):
        given = np.flatnonzero(targets[:, j] >= 0)
        pred = logits[given, head.logits].argmax(axis=1)
        micro, macro, s = f1_scores(targets[given, j], pred, head.width)
        rows.append({"category": head.category, "attribute": head.attribute, "n": len(given),
                     "micro_f1": micro, "macro_f1": macro, "score": s})
    table = pd.DataFrame(rows)
    final, _ = summarize(table)
    return final, table


def score(solution: pd.DataFrame, submission: pd.DataFrame,
          attribute_names: dict[str, list[str]] | None = None) -> tuple[float, pd.DataFrame]:
    """Final score and per-head table of a submission against a solution (both in the
    submission layout). The submission must hold every solution id."""
    sub = submission.drop_duplicates(ID).set_index(ID)
    missing = ~solution[ID].isin(sub.index)
    if missing.any():
        raise ValueError(f"submission lacks {int(missing.sum())} solution id(s), "
                         f"e.g. {solution[ID][missing].head(5).tolist()}")
    pred = sub.loc[solution[ID].to_numpy()].reset_index()
    rows = []
    for cat, idx in solution.groupby(CATEGORY, sort=False).indices.items():
        n_attrs = (int(solution[LEN].iloc[idx].max()) if LEN in solution
                   else int(solution.iloc[idx][ATTR_COLS].notna().any().sum()))
        names = (attribute_names or {}).get(cat) or [f"attr_{k}" for k in range(1, n_attrs + 1)]
        for slot in range(1, n_attrs + 1):
            col = f"attr_{slot}"
            truth = solution[col].to_numpy()[idx]
            given = pd.notna(truth) & (truth != DUMMY)
            guess = pred[col].to_numpy()[idx][given].astype(object)
            codes, _ = pd.factorize(np.concatenate([truth[given].astype(str), guess.astype(str)]))
            n = int(given.sum())
            micro, macro, s = f1_scores(codes[:n], codes[n:], int(codes.max(initial=-1)) + 1)
            rows.append({"category": cat, "attribute": names[slot - 1], "n": n,
                         "micro_f1": micro, "macro_f1": macro, "score": s})
    table = pd.DataFrame(rows)
    final, _ = summarize(table)
    return final, table


def solution_score(data_dir: Path, sub: pd.DataFrame, category_attrs) -> float | None:
    """The score of ``sub`` against ``<data_dir>/test_solution.csv``, or None without one."""
    path = Path(data_dir) / "test_solution.csv"
    if not path.is_file():
        return None
    final, _ = score(read_submission(path), sub, category_attrs)
    return final


def validate_submission(sub: pd.DataFrame, test: pd.DataFrame, schema) -> list[str]:
    """Every problem of a submission against test.csv and the schema (empty list = valid)."""
    problems = []
    expected = [ID, CATEGORY, LEN] + ATTR_COLS
    if list(sub.columns) != expected:
        problems.append(f"columns are {list(sub.columns)}, expected {expected}")
        if not set(expected) <= set(sub.columns):
            return problems
    ids = pd.to_numeric(sub[ID], errors="coerce")
    if ids.isna().any():
        problems.append(f"{int(ids.isna().sum())} id(s) are not integers")
    dup = ids[ids.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} duplicate id(s), e.g. {dup.head(5).astype(int).tolist()}")
    test_ids = set(test[ID].tolist())
    missing = test_ids - set(ids.dropna().astype(int))
    if missing:
        problems.append(f"{len(missing)} test id(s) missing, e.g. {sorted(missing)[:5]}")
    extra = set(ids.dropna().astype(int)) - test_ids
    if extra:
        problems.append(f"{len(extra)} id(s) not in test.csv, e.g. {sorted(extra)[:5]}")
    empty = sub[expected].isna() | (sub[expected].astype(str).apply(lambda c: c.str.strip()) == "")
    if empty.any().any():
        cols = [c for c in expected if empty[c].any()]
        problems.append(f"{int(empty.to_numpy().sum())} empty cell(s), in columns {cols}")
    truth_cat = dict(zip(test[ID], test[CATEGORY]))
    cat_of = ids.map(truth_cat)
    wrong_cat = cat_of.notna() & (cat_of != sub[CATEGORY])
    if wrong_cat.any():
        problems.append(f"{int(wrong_cat.sum())} row(s) with a Category other than test.csv's, "
                        f"e.g. id {ids[wrong_cat].astype(int).head(3).tolist()}")
    n_attrs = sub[CATEGORY].map({c: len(a) for c, a in schema.category_attrs.items()})
    unknown = n_attrs.isna()
    if unknown.any():
        problems.append(f"{int(unknown.sum())} row(s) with an unknown Category, e.g. "
                        f"{sub[CATEGORY][unknown].unique()[:3].tolist()}")
    lens = pd.to_numeric(sub[LEN], errors="coerce")
    bad_len = ~unknown & (lens != n_attrs)
    if bad_len.any():
        problems.append(f"{int(bad_len.sum())} row(s) whose len is not their category's, e.g. "
                        f"id {ids[bad_len].head(3).tolist()}")
    for slot, col in enumerate(ATTR_COLS, start=1):
        past = ~unknown & (slot > n_attrs)
        not_dummy = past & (sub[col] != DUMMY)
        if not_dummy.any():
            problems.append(f"{col}: {int(not_dummy.sum())} row(s) past len without "
                            f"'{DUMMY}', e.g. id {ids[not_dummy].head(3).tolist()}")
    for head in schema.heads:
        rows = sub[CATEGORY] == head.category
        outside = rows & ~sub[head.column].isin(head.vocab)
        if outside.any():
            values = sub.loc[outside, head.column].unique()[:3].tolist()
            problems.append(f"{head.column} ({head.name}): {int(outside.sum())} value(s) outside "
                            f"the vocabulary, e.g. {values}")
    return problems


def _print_tables(final: float, table: pd.DataFrame) -> None:
    _, per_cat = summarize(table)
    with pd.option_context("display.width", 120, "display.max_rows", 200,
                           "display.float_format", "{:.4f}".format):
        print(per_cat.to_string(index=False))
    print(f"{final:.6f}")


def main(cfg: MetricConfig) -> float:
    solution, submission = read_submission(cfg.solution), read_submission(cfg.submission)
    parquet = Path(cfg.solution).parent / "category_attributes.parquet"
    names = read_category_attributes(parquet) if parquet.is_file() else None
    final, table = score(solution, submission, names)
    if cfg.per_head:
        with pd.option_context("display.width", 120, "display.max_rows", 200,
                               "display.float_format", "{:.4f}".format):
            print(table.to_string(index=False))
    _print_tables(final, table)
    return final


if __name__ == "__main__":
    run_command(main, MetricConfig, __doc__)

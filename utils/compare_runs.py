"""Compare finished runs on their OOF predictions: the competition score, and the F1 of the rare
classes (those with less than ``--rare-share`` of their head's labelled train rows).

    python -m utils.compare_runs --data-dir data/demo --out-dir runs/demo --runs resnet18,resnet18_la

This is how the README's loss and augmentation tables were measured.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from utils.blend import load_oof
from utils.metric import score_logits
from utils.schema import ID, Schema, read_dataset


def rare_class_f1(schema: Schema, targets: np.ndarray, logits: np.ndarray, share: float) -> tuple[float, int]:
    """Mean per-class F1 over the rare classes of every head (OOF rows whose label is given)."""
    f1s = []
    for j, h in enumerate(schema.heads):
        counts = np.asarray(schema.counts[h.name], dtype=float)
        given = targets[:, j] >= 0
        y, p = targets[given, j], logits[given][:, h.logits].argmax(axis=1)
        for c in np.flatnonzero(counts < share * counts.sum()):
            tp = np.sum((y == c) & (p == c))
            denom = np.sum(y == c) + np.sum(p == c)
            if np.sum(y == c):
                f1s.append(2 * tp / denom)
    return float(np.mean(f1s)) if f1s else float("nan"), len(f1s)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--out-dir", default="runs/demo")
    parser.add_argument("--runs", required=True, help="comma-separated run names")
    parser.add_argument("--rare-share", type=float, default=0.05)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    schema = Schema.load(out / "schema.json")
    folds = pd.read_csv(out / "folds.csv")
    train = read_dataset(args.data_dir).train
    train = train[train[ID].isin(folds[ID])].reset_index(drop=True)
    targets = schema.encode(train)
    rows = []
    for run in args.runs.split(","):
        logits = load_oof(out, [run], schema, train[ID].to_numpy(), folds["fold"].nunique())[0]
        score, _ = score_logits(schema, targets, logits)
        rare, n = rare_class_f1(schema, targets, logits, args.rare_share)
        rows.append({"run": run, "oof_score": score, "rare_class_f1": rare, "rare_classes": n})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:.4f}".format))
    return table


if __name__ == "__main__":
    main()

"""Compare finished runs on their OOF predictions: the competition score, and the F1 of the rare
classes (those with less than ``--rare-share`` of their head's labelled train rows).

    python -m utils.tools.compare_runs --data-dir data/demo --out-dir runs/demo --runs resnet18,resnet18_la

This is how BENCHMARKS.md's loss and augmentation tables were measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.blend import load_oof
from utils.config import CommonConfig, option, run_command
from utils.data.schema import ID, Schema, read_dataset
from utils.metric import score_logits
from utils.run import RunDir


@dataclass
class CompareConfig(CommonConfig):
    runs: list[str] = option(help="run names to compare (a,b,c); default: every complete run", factory=list)
    rare_share: float = option(0.05, "a class is rare below this share of its head's labelled train rows")


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


def main(cfg: CompareConfig) -> pd.DataFrame:
    run_dir = RunDir(cfg.out_dir)
    schema = run_dir.schema
    rows = run_dir.train_rows(read_dataset(cfg.data_dir).train)
    targets = schema.encode(rows)
    table = []
    for run in cfg.runs or run_dir.complete_runs():
        logits = load_oof(run_dir, [run], rows[ID].to_numpy())[0]
        score, _ = score_logits(schema, targets, logits)
        rare, n = rare_class_f1(schema, targets, logits, cfg.rare_share)
        table.append({"run": run, "oof_score": score, "rare_class_f1": rare, "rare_classes": n,
                      "note": run_dir.optimistic_note(run)})
    table = pd.DataFrame(table)
    print(table.to_string(index=False, float_format="{:.4f}".format))
    return table


if __name__ == "__main__":
    run_command(main, CompareConfig, __doc__)

"""Knowledge distillation: ``train.py --teacher PATH`` makes the run a student of an ensemble
(an ``ensemble.json``) or of one run (its folder), in the same run folder.

The student's loss, per head, is ``alpha * CE(hard labels) + (1 - alpha) * T^2 * KL(teacher || student)``
with both distributions at temperature ``T`` (``distill_alpha``, ``distill_t``; Hinton et al.
2015). The teacher's distribution of a row is the softmax, per head, of its blended scores (the
ensemble's weighted per-head log-probabilities plus its biases, as infer.py decodes them):

- a train row's comes from the teacher's **out-of-fold** logits, so it was made by a teacher model
  that never trained on that row's labels;
- a test row's comes from the teacher's test logits (the mean over its folds); with
  ``distill_test`` the test images join training as unlabelled rows (soft pseudo-labels).

A row learns from the teacher on every head of its category, labelled or not. What holds: no
student fold trains on a prediction about a row made by a model that saw that row's label. What
does not: a student fold's validation labels were seen by the teacher models that predicted the
other rows it trains on (and by every model behind the test pseudo-labels), so a student's OOF
score can be slightly optimistic; the demo's held-out test score is the unbiased check
(BENCHMARKS.md). The teacher must live in the student's run folder: the same folds.csv is what
makes its OOF rows out-of-fold for the student too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import provenance
from utils.blend import blend, combine_members, head_log_softmax, load_oof, load_test_logits
from utils.errors import DataError
from utils.model import HeadLoss
from utils.run import RunDir
from utils.schema import CATEGORY, ID, IGNORE_INDEX, Schema, image_path


def teacher_spec(teacher: str, run_dir: RunDir) -> dict:
    """{"models", "weights", "biases"} of an ensemble.json or of one run's folder, which must be in
    ``run_dir`` (the student's folds)."""
    path = Path(teacher)
    if path.parent.resolve() != run_dir.path.resolve():
        raise DataError(f"teacher {teacher} is not in the student's run folder {run_dir.path}: only a teacher "
                        f"trained on the same folds.csv gives out-of-fold predictions for the student's rows")
    if path.suffix == ".json":
        if not path.is_file():
            raise DataError(f"teacher {teacher}: file not found (run ensemble.py first)")
        spec = json.loads(path.read_text())
        provenance.check(spec.get("provenance"), run_dir.path, path)
        return {"models": spec["models"], "weights": np.asarray(spec["weights"]),
                "biases": np.asarray(spec["biases"], dtype=np.float32)}
    run_dir.require_complete([path.name])
    return {"models": [path.name], "weights": np.ones(1), "biases": np.zeros(run_dir.schema.n_logits, np.float32)}


def teacher_scores(teacher: str, run_dir: RunDir, train_ids: np.ndarray, test_ids: np.ndarray):
    """The teacher's blended scores [N, L] for ``train_ids`` (out of fold) and [T, L] for ``test_ids``
    (its folds' test logits, blended as infer.py blends them)."""
    spec, schema = teacher_spec(teacher, run_dir), run_dir.schema
    oof = blend(load_oof(run_dir, spec["models"], train_ids), spec["weights"], schema, spec["biases"])
    test = combine_members({run: load_test_logits(run_dir, run, test_ids) for run in spec["models"]}, spec, schema)
    return oof, test


def soft_targets(scores: np.ndarray, schema: Schema, t: float) -> np.ndarray:
    """Per-head softmax of ``scores / t``: [N, L] probabilities, each head's summing to 1."""
    return np.exp(head_log_softmax(np.asarray(scores, dtype=np.float32) / t, schema))


class DistillLoss(nn.Module):
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``, per head. Targets are a dict:
    ``hard`` [B, H] class indices (IGNORE_INDEX where missing), ``soft`` [B, L] teacher
    probabilities and ``soft_heads`` [B, H] (whether the row has the teacher's distribution for
    the head: the heads of its category, for a usable image). CE is averaged over given labels and
    KL over (row, head) pairs, each over the whole batch (``normaliser``), so gradient
    accumulation gives the whole batch's update."""

    def __init__(self, hard: HeadLoss, schema: Schema, alpha: float, t: float):
        super().__init__()
        self.hard, self.alpha, self.t = hard, alpha, t
        self.slices = [h.logits for h in schema.heads]
        self.register_buffer("widths", torch.tensor([h.width for h in schema.heads]), persistent=False)

    def normaliser(self, targets: dict) -> tuple[int, int]:
        return self.hard.normaliser(targets["hard"]), int(targets["soft_heads"].sum())

    def kl(self, logits: torch.Tensor, targets: dict) -> torch.Tensor:
        """Summed T^2 * KL(teacher || student) over every (row, head) pair with a teacher
        distribution: the teacher's probabilities outside those pairs are masked to 0, so they
        add nothing, and every head is computed at once."""
        log_q = torch.cat([F.log_softmax(logits[:, head] / self.t, dim=1) for head in self.slices], dim=1)
        mask = targets["soft_heads"].repeat_interleave(self.widths, dim=1)
        p = targets["soft"] * mask
        return self.t ** 2 * (p * (torch.log(p.clamp(min=1e-12)) - log_q)).sum()

    def forward(self, logits: torch.Tensor, targets: dict, normaliser: tuple[int, int] | None = None) -> torch.Tensor:
        n_labels, n_pairs = normaliser or self.normaliser(targets)
        ce = self.hard(logits, targets["hard"], n_labels) if n_labels else logits.new_zeros(())
        return self.alpha * ce + (1 - self.alpha) * self.kl(logits, targets) / max(n_pairs, 1)


def category_heads(schema: Schema, categories) -> np.ndarray:
    """[N, H]: whether each head is one of the row's category's."""
    categories = np.asarray(categories, dtype=object)
    return np.stack([categories == h.category for h in schema.heads], axis=1)


def student_rows(rows: dict, trn: pd.DataFrame, data, run_dir: RunDir, cfg) -> dict:
    """A fold's training rows (``rows``: paths, categories, targets, ids of ``trn``) with the
    teacher's probabilities (an augmented copy takes its source's), and, with ``distill_test``,
    the test images appended as unlabelled rows."""
    schema = run_dir.schema
    originals = run_dir.train_rows(data.train)
    train_scores, test_scores = teacher_scores(cfg.teacher, run_dir, originals[ID].to_numpy(), data.test[ID].to_numpy())
    position = {int(i): k for k, i in enumerate(originals[ID])}
    source = trn["source_id"] if "source_id" in trn else trn[ID]
    soft = soft_targets(train_scores, schema, cfg.distill_t)[[position[int(i)] for i in source]]
    out = {**rows, "soft": soft, "soft_heads": category_heads(schema, trn[CATEGORY])}
    if not cfg.distill_test:
        return out
    test = data.test
    return {"paths": out["paths"] + [image_path(data.test_images, i) for i in test[ID]],
            "categories": out["categories"] + test[CATEGORY].tolist(),
            "targets": np.concatenate([out["targets"], np.full((len(test), len(schema.heads)), IGNORE_INDEX)]),
            "ids": np.concatenate([out["ids"], test[ID].to_numpy()]), "splits": out["splits"] + ["test"] * len(test),
            "soft": np.concatenate([soft, soft_targets(test_scores, schema, cfg.distill_t)]),
            "soft_heads": np.concatenate([out["soft_heads"], category_heads(schema, test[CATEGORY])])}

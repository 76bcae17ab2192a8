"""Knowledge distillation: ``train.py --teacher PATH`` makes the run a student of an ensemble
(an ``ensemble.json``) or of one run (its folder), in the same run folder.

The student's loss, per head, is ``alpha * CE(hard labels) + (1 - alpha) * T^2 * KL(teacher || student)``
with both distributions at temperature ``T`` (``distill_alpha``, ``distill_t``; Hinton et al.
2015). The teacher's distribution of a row is the softmax, per head, of its blended scores (the
ensemble's weighted per-head log-probabilities plus its biases, as infer.py decodes them). With
``distill_test`` the test images join training as unlabelled rows (soft pseudo-labels). A row
learns from the teacher on every head of its category, labelled or not. Two modes:

- **honest** (the default): student fold k learns only from what never saw fold k's labels: each
  teacher member's fold-k model (which trained on exactly the rows outside fold k), its
  predictions on those rows (``infold_logits.npz`` in the teacher's fold folder, computed once by
  an inference pass and kept while its checkpoint stands) and on the test images, blended with
  the weights and biases ensemble.py fitted without fold k (``fold_fits``). The student's OOF and
  nested-CV scores are then as honest as any run's. The price: the targets on a train row come
  from a model that trained on its label (more confident than out-of-fold ones).
- **optimistic**: a train row's target is the teacher's out-of-fold blend, and a test row's the
  mean over every teacher fold, with the weights fitted on all OOF rows. No row's target was made
  by a model that saw that row's label, but student fold k's validation labels were seen by the
  teacher models behind its other rows, its pseudo-labels and its weights: its scores are
  optimistic, and flagged so wherever they are printed or ranked (its OOF line and oof_score.json,
  compare_runs, ensemble.py, export.py's budget).

The teacher must live in the student's run folder: the same folds.csv is what makes fold k the
same rows for both.
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
from utils.data.dataset import ImageDataset, make_loader
from utils.data.schema import CATEGORY, ID, IGNORE_INDEX, Schema, image_path, row_paths
from utils.errors import DataError
from utils.io import load_logits, save_logits
from utils.run import RunDir
from utils.train.engine import predict
from utils.train.model import HeadLoss, checkpoint_preprocess, load_checkpoint, trained_with_tta

INFOLD = "infold_logits.npz"  # a fold's predictions on its own training rows (an honest student's targets)


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
        fits = {f["fold"]: (np.asarray(f["weights"]), np.asarray(f["biases"], dtype=np.float32))
                for f in spec.get("fold_fits", [])} or None  # None: an ensemble.json from before fold_fits
        return {"models": spec["models"], "weights": np.asarray(spec["weights"]),
                "biases": np.asarray(spec["biases"], dtype=np.float32), "fold_fits": fits}
    run_dir.require_complete([path.name])
    one = (np.ones(1), np.zeros(run_dir.schema.n_logits, np.float32))
    return {"models": [path.name], "weights": one[0], "biases": one[1],
            "fold_fits": {k: one for k in range(run_dir.n_folds)}}


def teacher_scores(teacher: str, run_dir: RunDir, train_ids: np.ndarray, test_ids: np.ndarray):
    """Optimistic mode: the teacher's blended scores [N, L] for ``train_ids`` (out of fold) and
    [T, L] for ``test_ids`` (its folds' test logits, blended as infer.py blends them)."""
    spec, schema = teacher_spec(teacher, run_dir), run_dir.schema
    oof = blend(load_oof(run_dir, spec["models"], train_ids), spec["weights"], schema, spec["biases"])
    test = combine_members({run: load_test_logits(run_dir, run, test_ids) for run in spec["models"]}, spec, schema)
    return oof, test


def honest_teacher_scores(teacher: str, run_dir: RunDir, fold: int, train_ids: np.ndarray, test_ids: np.ndarray):
    """Honest mode, for student fold ``fold``: the blended scores [N, L] of the teacher's fold-k
    models on ``train_ids`` (rows outside fold k, from ``infold_logits.npz``: ``prepare_teacher``
    makes them) and [T, L] on ``test_ids``, with the weights and biases fitted without fold k."""
    spec, schema = teacher_spec(teacher, run_dir), run_dir.schema
    if spec["fold_fits"] is None or fold not in spec["fold_fits"]:
        raise DataError(f"teacher {teacher} records no weights fitted without fold {fold} (fold_fits; an ensemble.json "
                        f"from an older ensemble.py): run ensemble.py again, or use --distill-mode optimistic")
    weights, biases = spec["fold_fits"][fold]
    members = []
    for run in spec["models"]:
        path = run_dir.fold_file(run, fold, INFOLD)
        ids, logits = load_logits(path, schema.fingerprint)
        position = pd.Series(np.arange(len(ids)), index=ids)
        if not np.isin(train_ids, ids).all():
            raise DataError(f"{path} lacks some of student fold {fold}'s train rows: delete it and train again")
        members.append(head_log_softmax(logits[position[train_ids].to_numpy()], schema))
    fold_spec = {"models": spec["models"], "weights": weights, "biases": biases}
    train = blend(np.stack(members), weights, schema, biases)
    test = combine_members({run: load_test_logits(run_dir, run, test_ids, [fold]) for run in spec["models"]},
                           fold_spec, schema)
    return train, test


def infold_logits(run_dir: RunDir, run: str, fold: int, data, device: torch.device, csv_dir: Path | None = None,
                  workers: int = 0, progress: bool = False) -> Path:
    """``<run>/fold<k>/infold_logits.npz``: fold k's best.pt on every train row outside fold k (the
    rows it trained on), as its OOF logits were made (its preprocessing, its test-time mirror).
    Kept while best.pt, the schema, the folds and the labels are unchanged; made again otherwise."""
    path, schema, root = run_dir.fold_file(run, fold, INFOLD), run_dir.schema, run_dir.path
    inputs = [run_dir.fold_file(run, fold, "best.pt"), run_dir.schema_path, run_dir.folds_path, run_dir.labels_path]
    if path.is_file():
        made = provenance.read(path)
        if made is not None and not provenance.changes(made, root):
            return path
    rows = run_dir.train_rows(data.train)
    rows = rows[rows["fold"] != fold].reset_index(drop=True)
    model, ckpt = load_checkpoint(inputs[0], schema)
    prep = checkpoint_preprocess(ckpt)
    ds = ImageDataset(row_paths(rows, data.train_images, csv_dir), rows[CATEGORY], None, prep.transform(), prep)
    loader = make_loader(ds, 64, workers, device=device)
    idx, logits = predict(model.to(device), loader, device, prep=prep, hflip=trained_with_tta(ckpt),
                          desc=f"{run} fold {fold}: its train rows", progress=progress)
    save_logits(path, rows[ID].to_numpy()[idx], logits, schema.fingerprint, fold,
                provenance.record([p for p in inputs if p.is_file()], root,
                                  rebuild="python train.py --out-dir {root} --teacher ... (an honest student makes it again)"))
    return path


def prepare_teacher(teacher: str, run_dir: RunDir, data, folds: list[int], device: torch.device,
                    csv_dir: Path | None = None, workers: int = 0, progress: bool = False) -> None:
    """Honest mode: every teacher member's in-fold logits for the student folds ``folds`` (made by
    rank 0 as each student fold sets up; the other ranks wait, then read them)."""
    for run in teacher_spec(teacher, run_dir)["models"]:
        for k in folds:
            infold_logits(run_dir, run, k, data, device, csv_dir, workers, progress)


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


def student_rows(rows: dict, trn: pd.DataFrame, data, run_dir: RunDir, fold: int, *, teacher: str, mode: str,
                 t: float, with_test: bool) -> dict:
    """Fold ``fold``'s training rows (``rows``: paths, categories, targets, ids of ``trn``) with the
    probabilities of the ``teacher`` (its ensemble.json) at temperature ``t`` (an augmented copy
    takes its source's), and, ``with_test``, the test images appended as unlabelled rows; in
    ``mode`` honest or optimistic (``distill_mode``)."""
    schema = run_dir.schema
    originals = run_dir.train_rows(data.train)
    if mode == "honest":
        originals = originals[originals["fold"] != fold]
        train_scores, test_scores = honest_teacher_scores(teacher, run_dir, fold, originals[ID].to_numpy(),
                                                          data.test[ID].to_numpy())
    else:
        train_scores, test_scores = teacher_scores(teacher, run_dir, originals[ID].to_numpy(),
                                                   data.test[ID].to_numpy())
    position = {int(i): k for k, i in enumerate(originals[ID])}
    source = trn["source_id"] if "source_id" in trn else trn[ID]
    soft = soft_targets(train_scores, schema, t)[[position[int(i)] for i in source]]
    out = {**rows, "soft": soft, "soft_heads": category_heads(schema, trn[CATEGORY])}
    if not with_test:
        return out
    test = data.test
    return {"paths": out["paths"] + [image_path(data.test_images, i) for i in test[ID]],
            "categories": out["categories"] + test[CATEGORY].tolist(),
            "targets": np.concatenate([out["targets"], np.full((len(test), len(schema.heads)), IGNORE_INDEX)]),
            "ids": np.concatenate([out["ids"], test[ID].to_numpy()]), "splits": out["splits"] + ["test"] * len(test),
            "soft": np.concatenate([soft, soft_targets(test_scores, schema, t)]),
            "soft_heads": np.concatenate([out["soft_heads"], category_heads(schema, test[CATEGORY])])}

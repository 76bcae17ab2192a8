"""Ensemble members as per-head log-probabilities, and their weighted blend.

Shared by ``ensemble.py`` (which fits the weights and biases on OOF logits) and ``infer.py``
(which applies them to test logits), so the blend cannot differ between the two.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from utils import provenance
from utils.data.schema import Schema
from utils.errors import DataError
from utils.io import load_logits
from utils.run import RunDir


def head_log_softmax(logits: np.ndarray, schema: Schema) -> np.ndarray:
    """log-softmax within each head's slice of [N, L] logits (float32). Computed in place on a
    transposed copy, where each head's logits are contiguous rows: about 3x faster than segment
    reductions across columns (20 members x 70,000 rows: 0.6 s instead of 1.8)."""
    zt = np.array(np.asarray(logits, dtype=np.float32).T, order="C")
    for head in schema.heads:
        z = zt[head.offset:head.offset + head.width]
        z -= z.max(axis=0, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=0, keepdims=True))
    return np.ascontiguousarray(zt.T)


def normalise_weights(weights, n_heads: int) -> np.ndarray:
    """Weights [M] or per head [M, H] -> [M, H], clipped at 0, each head's summing to 1
    (equal weights for a head whose weights are all 0)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    if w.ndim == 1:
        w = np.repeat(w[:, None], n_heads, axis=1)
    sums = w.sum(axis=0, keepdims=True)
    return np.where(sums > 0, w / np.where(sums > 0, sums, 1), 1.0 / len(w))


def expand_weights(weights: np.ndarray, schema: Schema) -> np.ndarray:
    """Weights [M] or per head [M, H] -> per logit [M, L], normalised per head."""
    w = normalise_weights(weights, len(schema.heads))
    widths = [h.width for h in schema.heads]
    return np.repeat(w, widths, axis=1).astype(np.float32)


def blend(members: np.ndarray, weights: np.ndarray, schema: Schema, bias: np.ndarray | None = None) -> np.ndarray:
    """sum_m w_m * log p_m (+ bias per class): [M, N, L] members -> [N, L] blended scores."""
    per_logit = expand_weights(weights, schema)
    out = np.einsum("ml,mnl->nl", per_logit, members, optimize=True)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float32)[None, :]
    return out


def load_ensemble(run_dir: RunDir, models: list[str] | None = None) -> dict:
    """The ensemble to apply: ``ensemble.json`` (models, weights, biases), or, without it or when
    ``models`` are named, equal weights over ``models`` (default: every complete run) and no bias.
    Returns {"models", "folds" {run: [best.pt paths]}, "weights" [M] or [M, H], "biases" [L]}."""
    schema, path, asked = run_dir.schema, run_dir.ensemble_path, bool(models)
    if path.is_file() and not models:
        spec = json.loads(path.read_text())
        provenance.check(spec.get("provenance"), run_dir.path, path)
        if spec["schema"] != schema.fingerprint:
            raise DataError(f"{path} was made with schema {spec['schema']}, this run's is {schema.fingerprint}")
        models, weights, biases = spec["models"], np.asarray(spec["weights"]), np.asarray(spec["biases"], dtype=np.float32)
    else:
        models = models or run_dir.complete_runs()
        weights, biases = np.ones(len(models)), np.zeros(schema.n_logits, dtype=np.float32)
    if not models:
        raise DataError(f"no complete run under {run_dir.path}; run train.py --fold all first")
    run_dir.require_complete(models)
    folds = {run: [run_dir.fold_file(run, k, "best.pt") for k in range(run_dir.n_folds)] for run in models}
    return {"models": list(models), "folds": folds, "weights": weights, "biases": biases,
            "from_ensemble_json": path.is_file() and not asked}


def ensemble_digest(ens: dict) -> str:
    """A short hash of what a blend computes (members, weights, biases): the merged ONNX graph
    bakes these in, so it serves only the ensemble with this digest."""
    h = hashlib.sha256(json.dumps(list(ens["models"])).encode())
    for part in (ens["weights"], ens["biases"]):
        h.update(np.ascontiguousarray(np.asarray(part, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def combine_members(member_logits: dict, ens: dict, schema: Schema) -> np.ndarray:
    """Blend raw logits {run: [fold logits [N, L], ...]}: per-head log-softmax, mean over a run's
    folds, weighted sum over runs, plus the biases. Returns [N, L] scores (decode by argmax)."""
    members = np.stack([np.mean([head_log_softmax(z, schema) for z in member_logits[run]], axis=0)
                        for run in ens["models"]])
    return blend(members, ens["weights"], schema, ens["biases"])


def load_test_logits(run_dir: RunDir, run: str, test_ids: np.ndarray, folds=None) -> list[np.ndarray]:
    """The raw test logits of every fold of ``run`` (or of ``folds``) [T, L], each in the order of
    ``test_ids`` (what ``combine_members`` blends); every fold must cover exactly these ids."""
    schema, test_ids = run_dir.schema, np.asarray(test_ids)
    position = pd.Series(np.arange(len(test_ids)), index=test_ids)
    out = []
    for k in range(run_dir.n_folds) if folds is None else folds:
        path = run_dir.fold_file(run, k, "test_logits.npz")
        provenance.check_file(path, run_dir.path)
        ids, logits = load_logits(path, schema.fingerprint)
        if len(ids) != len(test_ids) or not np.isin(ids, test_ids).all():
            raise DataError(f"{path}: its ids do not match test.csv")
        ordered = np.empty_like(logits)
        ordered[position[ids].to_numpy()] = logits
        out.append(ordered)
    return out


def load_oof(run_dir: RunDir, runs: list[str], train_ids: np.ndarray) -> np.ndarray:
    """[M, N, L] per-head log-probabilities in the order of ``train_ids``; every run must cover the
    train set exactly once with this run folder's schema."""
    schema = run_dir.schema
    members = np.empty((len(runs), len(train_ids), schema.n_logits), dtype=np.float32)
    position = pd.Series(np.arange(len(train_ids)), index=train_ids)
    for m, run in enumerate(runs):
        ids, logits = [], []
        for k in range(run_dir.n_folds):
            path = run_dir.fold_file(run, k, "oof_logits.npz")
            if not path.is_file():
                raise DataError(f"run {run}: {path} is missing; train every fold first")
            try:
                i, z = load_logits(path, schema.fingerprint)
            except ValueError as err:
                raise DataError(f"run {run}: {err}") from None
            provenance.check_file(path, run_dir.path)
            ids.append(i)
            logits.append(z)
        ids = np.concatenate(ids)
        if len(ids) != len(train_ids) or len(np.unique(ids)) != len(ids) or not np.isin(ids, train_ids).all():
            raise DataError(f"run {run}: its OOF ids do not cover the {len(train_ids)} train rows exactly once "
                            f"({len(ids)} ids, {len(np.unique(ids))} distinct)")
        members[m, position[ids].to_numpy()] = head_log_softmax(np.concatenate(logits), schema)
    return members

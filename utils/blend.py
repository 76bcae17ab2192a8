"""Ensemble members as per-head log-probabilities, and their weighted blend.

Shared by ``ensemble.py`` (which fits the weights and biases on OOF logits) and ``infer.py``
(which applies them to test logits), so the blend cannot differ between the two.
"""
from __future__ import annotations

import numpy as np

from utils.schema import Schema


def head_log_softmax(logits: np.ndarray, schema: Schema) -> np.ndarray:
    """log-softmax within each head's slice of [N, L] logits (float32)."""
    out = np.empty(logits.shape, dtype=np.float32)
    for h in schema.heads:
        z = logits[:, h.logits].astype(np.float32)
        z = z - z.max(axis=1, keepdims=True)
        out[:, h.logits] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


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

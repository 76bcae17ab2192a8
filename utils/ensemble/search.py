"""Ensemble weights and biases over out-of-fold logits: the objective, the searches, nested CV.

A blend is ``sum_m w_m log p_m`` (+ one additive bias per class) over members' per-head
log-probabilities, decoded by argmax within each head; its objective is the competition score,
computed with ``utils.metric``'s own ``f1_scores`` and ``final_score``. Weights are non-negative
and normalised; one per model, or one per (model, head).

Methods: ``sto`` (Siberian Tiger Optimization), ``caruana`` (greedy forward selection with
replacement), ``nelder_mead`` (scipy, softmax-parametrised), ``tpe`` (Optuna), ``random``,
``equal``; every search gets the same number of objective evaluations (``Budget``). Biases:
coordinate ascent per head on top of the blend (logit adjustment for macro-F1). ``nested_cv``
judges a method honestly: fitted on the other folds, scored on the held-out one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from utils.blend import normalise_weights
from utils.data.schema import Schema
from utils.metric import f1_score_rows, f1_scores, final_score

METHODS = ("equal", "caruana", "nelder_mead", "tpe", "random", "sto")


@dataclass(frozen=True)
class Budget:
    """How hard every search may look: STO's population and iterations set the number of
    objective evaluations that every other method gets too."""
    population: int = 16
    iterations: int = 12
    caruana_steps: int = 20
    bias_rounds: int = 2
    bias_range: float = 2.0  # biases tried in [-range, range]
    bias_steps: int = 9

    @property
    def evaluations(self) -> int:
        return self.population * (1 + 4 * self.iterations)


class BlendObjective:
    """The competition score of a blend, over a subset of rows; what does not depend on the
    weights (each head's given rows, their member log-probs and truth) is gathered once."""

    def __init__(self, members: np.ndarray, targets: np.ndarray, schema: Schema, rows: np.ndarray | None = None):
        self.schema = schema
        self.n_models = members.shape[0]
        rows = np.arange(targets.shape[0]) if rows is None else np.asarray(rows)
        self.n_images = targets.shape[0]
        self.rows, self.x, self.y = [], [], []
        for j, h in enumerate(schema.heads):
            r = rows[targets[rows, j] >= 0]
            self.rows.append(r)
            self.x.append(np.ascontiguousarray(members[:, r, h.logits]))
            self.y.append(targets[r, j])
        self.category = np.array([h.category for h in schema.heads])
        self.evaluations = 0

    def head_weights(self, weights: np.ndarray) -> np.ndarray:
        """[M] or [M, H] -> normalised [M, H]."""
        return normalise_weights(weights, len(self.schema.heads))

    def blended(self, j: int, w: np.ndarray) -> np.ndarray:
        return np.tensordot(w[:, j].astype(np.float32), self.x[j], axes=1)

    def predictions(self, weights: np.ndarray, bias: np.ndarray | None = None) -> list[np.ndarray]:
        w = self.head_weights(weights)
        preds = []
        for j, h in enumerate(self.schema.heads):
            z = self.blended(j, w)
            if bias is not None:
                z = z + bias[h.logits]
            preds.append(z.argmax(axis=1))
        return preds

    def head_scores(self, preds: list[np.ndarray], take: list[np.ndarray] | None = None) -> np.ndarray:
        """Each head's score of ``preds`` (one array per head, over its ``rows``); ``take``: the
        positions of those rows to score instead, one array per head (repeats count twice)."""
        take = take or [slice(None)] * len(preds)
        return np.array([f1_scores(y[t], p[t], h.width)[2]
                         for y, p, t, h in zip(self.y, preds, take, self.schema.heads)])

    def score(self, weights: np.ndarray, bias: np.ndarray | None = None) -> float:
        self.evaluations += 1
        return final_score(self.head_scores(self.predictions(weights, bias)), self.category)

    def fit_bias(self, weights: np.ndarray, rounds: int, span: float, steps: int) -> np.ndarray:
        """One additive bias per class, by coordinate ascent per head: each head's score depends
        only on its own biases, and the final score is a mean of head scores, so heads are fitted
        independently. A bias is kept only when it strictly improves its head. The grid of one
        class is scored at once: moving class c's bias changes a row's prediction only between c
        and the row's best other class, so every grid point's predictions follow from one argmax."""
        w = self.head_weights(weights)
        bias = np.zeros(self.schema.n_logits, dtype=np.float32)
        grid = np.linspace(-span, span, steps).astype(np.float32)
        for j, h in enumerate(self.schema.heads):
            if len(self.y[j]) == 0:
                continue
            z, y, b = self.blended(j, w), self.y[j], np.zeros(h.width, dtype=np.float32)
            best = f1_scores(y, z.argmax(axis=1), h.width)[2]
            for _ in range(rounds):
                for c in range(h.width):
                    others = z + b
                    others[:, c] = -np.inf
                    rival = others.argmax(axis=1)  # the first best other class, as argmax breaks ties
                    top = others[np.arange(len(y)), rival]
                    mine = z[:, c] + grid[:, None]  # [steps, N]: class c's logit at each grid point
                    wins = (mine > top) | ((mine == top) & (c < rival))
                    scores = f1_score_rows(y, np.where(wins, c, rival), h.width)
                    keep = b[c]
                    for value, s in zip(grid, scores):  # in grid order: the first strict improvement wins
                        if s > best + 1e-12:
                            best, keep = s, value
                    b[c] = keep
            bias[h.logits] = b
        return bias


# ----------------------------------------------------------------------------- search methods

def sto(loss: Callable[[np.ndarray], float], dim: int, lb: float, ub: float, population: int,
        iterations: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Siberian Tiger Optimization (Trojovský, Dehghani & Hanuš, IEEE Access 10, 2022), minimising
    ``loss`` over [lb, ub]^dim. Each iteration t = 1..T, for every tiger i:

      Phase 1, prey hunting. The prey set of i is every member better than i, plus the best.
        Pick one prey SP at random: x' = x + r (SP - I x); then the local step x'' = x + r (ub - lb) / t.
      Phase 2, fight with a bear. Pick a random other member B:
        x' = x + r (B - I x) if B is better than i, else x' = x + r (x - B); then the local step again.
      Every candidate is clipped to the bounds and replaces x only if it is better (greedy).

    Choices the paper leaves open, and what is done here: r ~ U(0, 1) is drawn per dimension for
    every move; I is drawn from {1, 2} once per move; the prey set is rebuilt from the current
    fitness for every tiger (so it sees the moves already made in this iteration); ties count as
    "not better". The local step only moves up, as written; clipping keeps it in bounds, and for
    ensemble weights, which are normalised, a step up in several coordinates at once still changes
    their ratios in every direction.
    Cost: population * (1 + 4 * iterations) evaluations. Returns (best x, its loss).
    """
    x = lb + rng.random((population, dim)) * (ub - lb)
    f = np.array([loss(xi) for xi in x])

    def try_move(i: int, candidate: np.ndarray) -> None:
        candidate = np.clip(candidate, lb, ub)
        fc = loss(candidate)
        if fc < f[i]:
            x[i], f[i] = candidate, fc

    for t in range(1, iterations + 1):
        for i in range(population):
            best = int(np.argmin(f))
            prey = np.flatnonzero(f < f[i]).tolist()
            if best not in prey:
                prey.append(best)
            sp = x[prey[rng.integers(len(prey))]]
            try_move(i, x[i] + rng.random(dim) * (sp - rng.integers(1, 3) * x[i]))
            try_move(i, x[i] + rng.random(dim) * (ub - lb) / t)
            b = rng.choice([k for k in range(population) if k != i]) if population > 1 else i
            if f[b] < f[i]:
                try_move(i, x[i] + rng.random(dim) * (x[b] - rng.integers(1, 3) * x[i]))
            else:
                try_move(i, x[i] + rng.random(dim) * (x[i] - x[b]))
            try_move(i, x[i] + rng.random(dim) * (ub - lb) / t)
    best = int(np.argmin(f))
    return x[best].copy(), float(f[best])


def random_search(loss, dim: int, lb: float, ub: float, evaluations: int, rng) -> tuple[np.ndarray, float]:
    best_x, best_f = None, np.inf
    for _ in range(evaluations):
        xi = lb + rng.random(dim) * (ub - lb)
        fi = loss(xi)
        if fi < best_f:
            best_x, best_f = xi, fi
    return best_x, float(best_f)


def fit_weights(method: str, obj: BlendObjective, per_head: bool, budget: Budget, seed: int) -> np.ndarray:
    """Weights [M] (or [M, H]) maximising ``obj.score``; every search gets the same budget."""
    M, H = obj.n_models, len(obj.schema.heads)
    shape = (M, H) if per_head else (M,)
    dim = int(np.prod(shape))
    evaluations = budget.evaluations
    rng = np.random.default_rng(seed)
    loss = lambda v: 1.0 - obj.score(np.asarray(v).reshape(shape))
    if method == "equal" or M == 1:
        return np.ones(shape)
    if method == "sto":
        x, _ = sto(loss, dim, 0.0, 1.0, budget.population, budget.iterations, rng)
        return x.reshape(shape)
    if method == "random":
        x, _ = random_search(loss, dim, 0.0, 1.0, evaluations, rng)
        return x.reshape(shape)
    if method == "nelder_mead":
        from scipy.optimize import minimize

        softmax = lambda z: np.exp(z - z.max(axis=0)) / np.exp(z - z.max(axis=0)).sum(axis=0)
        # the score is piecewise constant in the weights: a wide initial simplex (unit steps in
        # logit space) is needed for the first moves to change any prediction at all
        simplex = np.vstack([np.zeros(dim), np.eye(dim)])
        res = minimize(lambda z: loss(softmax(z.reshape(shape))), np.zeros(dim), method="Nelder-Mead",
                       options={"maxfev": evaluations, "initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-6})
        return softmax(res.x.reshape(shape))
    if method == "tpe":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({f"w{i}": 1.0 for i in range(dim)})  # start from equal weights
        study.optimize(lambda trial: loss(np.array([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(dim)])),
                       n_trials=evaluations)
        return np.array([study.best_params[f"w{i}"] for i in range(dim)]).reshape(shape)
    if method == "caruana":
        # forward selection with replacement (Caruana et al., 2004), starting from the best single model
        counts = np.zeros(M)
        counts[int(np.argmax([obj.score(np.eye(M)[m]) for m in range(M)]))] = 1
        best = obj.score(counts)
        for _ in range(budget.caruana_steps):
            trials = [obj.score(counts + np.eye(M)[m]) for m in range(M)]
            m = int(np.argmax(trials))
            if trials[m] < best:
                break
            counts[m] += 1
            best = trials[m]
        return counts if not per_head else np.repeat(counts[:, None], H, axis=1)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# ----------------------------------------------------------------------------- nested CV

def fit(obj: BlendObjective, method: str, use_bias: bool, per_head: bool, budget: Budget, seed: int):
    """(weights, biases or None) of one method fitted on ``obj``'s rows."""
    weights = fit_weights(method, obj, per_head, budget, seed)
    bias = obj.fit_bias(weights, budget.bias_rounds, budget.bias_range, budget.bias_steps) if use_bias else None
    return weights, bias


def nested_cv(members, targets, folds, schema, method: str, use_bias: bool, per_head: bool, budget: Budget,
              seed: int) -> dict:
    """Fit on the other folds, predict the held-out fold, score the assembled predictions once.
    ``fold_fits``: {fold: (normalised weights [M, H], biases [L] or None)} of each fit, made without
    that fold's rows (what an honest student of fold k may learn from)."""
    start = time.perf_counter()
    full = BlendObjective(members, targets, schema)
    preds = [np.empty(len(r), dtype=np.int64) for r in full.rows]
    position = [pd.Series(np.arange(len(r)), index=r) for r in full.rows]
    fold_fits = {}
    for k in np.unique(folds):
        fit_obj = BlendObjective(members, targets, schema, np.flatnonzero(folds != k))
        weights, bias = fit(fit_obj, method, use_bias, per_head, budget, seed + int(k))
        fold_fits[int(k)] = (fit_obj.head_weights(weights), bias)
        held = BlendObjective(members, targets, schema, np.flatnonzero(folds == k))
        for j, p in enumerate(held.predictions(weights, bias)):
            preds[j][position[j][held.rows[j]].to_numpy()] = p
    score = final_score(full.head_scores(preds), full.category)
    return {"score": score, "head_scores": full.head_scores(preds), "seconds": time.perf_counter() - start,
            "fold_fits": fold_fits, "preds": preds}


def paired_se(full: BlendObjective, a: list[np.ndarray], b: list[np.ndarray], samples: int = 200,
              seed: int = 0) -> float:
    """The standard error of score(a) - score(b), two predictions of the same rows (one array per
    head, over ``full.rows``, as ``nested_cv`` returns them), by a paired bootstrap over the images:
    each of ``samples`` resamples draws the images with replacement and scores both on it (the
    score is F1 over rows, not a mean of rows: it is re-computed, not averaged)."""
    rng, n = np.random.default_rng(seed), full.n_images
    diffs = np.empty(samples)
    for i in range(samples):
        count = np.bincount(rng.integers(0, n, n), minlength=n)
        take = [np.repeat(np.arange(len(r)), count[r]) for r in full.rows]
        diffs[i] = (final_score(full.head_scores(a, take), full.category)
                    - final_score(full.head_scores(b, take), full.category))
    return float(diffs.std(ddof=1))

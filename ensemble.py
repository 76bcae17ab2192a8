"""Ensemble-weight search over out-of-fold logits, judged by nested cross-validation.

    python ensemble.py                                   # every complete run under --out-dir
    python ensemble.py --models resnet18,efficientnet_b0 --method sto
    python ensemble.py --per-head true --bias on
    python ensemble.py --benchmark true                  # synthetic 20 x 70,000 x 42-head timing

Each member is a run's OOF logits over the whole train set (all its folds), turned into per-head
log-probabilities. A blend is ``sum_m w_m log p_m`` (+ one additive bias per class), decoded
by argmax within each head; its objective is the competition score, computed with
``utils.metric``'s own ``f1_scores`` and ``final_score``. Weights are non-negative and normalised;
one per model, or with ``--per-head`` one per (model, head).

Methods (``--method``): ``sto`` (Siberian Tiger Optimization), ``caruana`` (greedy forward
selection with replacement), ``nelder_mead`` (scipy, softmax-parametrised), ``tpe`` (Optuna),
``random`` (random search), ``equal``. Biases (``--bias``): coordinate ascent per head on top of
the blend (logit adjustment for macro-F1).

Honest evaluation: for every held-out fold, the weights (and biases) are fitted on the other
folds' OOF rows and applied to the held-out rows; the assembled held-out predictions are scored
once. The table shows that nested score for every method, its gain over equal weights and over the
best single model, and its time. The chosen method is then refitted on all OOF rows and written to
``<out-dir>/ensemble.json``, which ``infer.py`` reads.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from utils.blend import head_log_softmax, load_oof, normalise_weights
from utils.config import CommonConfig, parse_config
from utils.io import atomic_path, atomic_write_json
from utils.metric import f1_scores, final_score
from utils.schema import ID, DataError, Schema

METHODS = ("equal", "caruana", "nelder_mead", "tpe", "random", "sto")


@dataclass
class EnsembleConfig(CommonConfig):
    models: Optional[str] = None  # comma-separated run names; default: every complete run
    method: str = "auto"  # one of METHODS, or auto: the best nested-CV score of those compared
    compare: str = "equal,caruana,nelder_mead,tpe,sto"  # methods in the nested-CV table
    per_head: bool = False  # one weight per (model, head) instead of per model
    bias: str = "auto"  # per-class biases: on, off, or auto (kept when nested CV shows a gain)
    sto_population: int = 16
    sto_iterations: int = 12  # budget of every search: population * (1 + 4 * iterations) evaluations
    caruana_steps: int = 20
    bias_rounds: int = 2
    bias_range: float = 2.0  # biases tried in [-range, range]
    bias_steps: int = 9
    benchmark: bool = False
    bench_models: int = 20
    bench_rows: int = 70000
    progress: bool = True


# ----------------------------------------------------------------------------- reading runs

def discover_runs(out_dir: Path, n_folds: int) -> list[str]:
    """Run names under out_dir whose every fold has OOF logits."""
    runs = []
    for path in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        if all((path / f"fold{k}" / "oof_logits.npz").is_file() for k in range(n_folds)):
            runs.append(path.name)
    return runs


# ----------------------------------------------------------------------------- the objective

class BlendObjective:
    """The competition score of a blend, over a subset of rows; what does not depend on the
    weights (each head's given rows, their member log-probs and truth) is gathered once."""

    def __init__(self, members: np.ndarray, targets: np.ndarray, schema: Schema, rows: np.ndarray | None = None):
        self.schema = schema
        self.n_models = members.shape[0]
        rows = np.arange(targets.shape[0]) if rows is None else np.asarray(rows)
        self.rows, self.x, self.y = [], [], []
        for j, h in enumerate(schema.heads):
            r = rows[targets[rows, j] >= 0]
            self.rows.append(r)
            self.x.append(np.ascontiguousarray(members[:, r, h.offset:h.offset + h.width]))
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
                z = z + bias[h.offset:h.offset + h.width]
            preds.append(z.argmax(axis=1))
        return preds

    def head_scores(self, preds: list[np.ndarray]) -> np.ndarray:
        return np.array([f1_scores(y, p, h.width)[2] for y, p, h in zip(self.y, preds, self.schema.heads)])

    def score(self, weights: np.ndarray, bias: np.ndarray | None = None) -> float:
        self.evaluations += 1
        return final_score(self.head_scores(self.predictions(weights, bias)), self.category)

    def fit_bias(self, weights: np.ndarray, rounds: int, span: float, steps: int) -> np.ndarray:
        """One additive bias per class, by coordinate ascent per head: each head's score depends
        only on its own biases, and the final score is a mean of head scores, so heads are fitted
        independently. A bias is kept only when it strictly improves its head."""
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
                    keep = b[c]
                    for value in grid:
                        b[c] = value
                        s = f1_scores(y, (z + b).argmax(axis=1), h.width)[2]
                        if s > best + 1e-12:
                            best, keep = s, value
                    b[c] = keep
            bias[h.offset:h.offset + h.width] = b
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


def fit_weights(method: str, obj: BlendObjective, per_head: bool, cfg: EnsembleConfig, seed: int) -> np.ndarray:
    """Weights [M] (or [M, H]) maximising ``obj.score``; every search gets the same budget."""
    M, H = obj.n_models, len(obj.schema.heads)
    shape = (M, H) if per_head else (M,)
    dim = int(np.prod(shape))
    budget = cfg.sto_population * (1 + 4 * cfg.sto_iterations)
    rng = np.random.default_rng(seed)
    loss = lambda v: 1.0 - obj.score(np.asarray(v).reshape(shape))
    if method == "equal" or M == 1:
        return np.ones(shape)
    if method == "sto":
        x, _ = sto(loss, dim, 0.0, 1.0, cfg.sto_population, cfg.sto_iterations, rng)
        return x.reshape(shape)
    if method == "random":
        x, _ = random_search(loss, dim, 0.0, 1.0, budget, rng)
        return x.reshape(shape)
    if method == "nelder_mead":
        from scipy.optimize import minimize

        softmax = lambda z: np.exp(z - z.max(axis=0)) / np.exp(z - z.max(axis=0)).sum(axis=0)
        # the score is piecewise constant in the weights: a wide initial simplex (unit steps in
        # logit space) is needed for the first moves to change any prediction at all
        simplex = np.vstack([np.zeros(dim), np.eye(dim)])
        res = minimize(lambda z: loss(softmax(z.reshape(shape))), np.zeros(dim), method="Nelder-Mead",
                       options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-6})
        return softmax(res.x.reshape(shape))
    if method == "tpe":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({f"w{i}": 1.0 for i in range(dim)})  # start from equal weights
        study.optimize(lambda trial: loss(np.array([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(dim)])),
                       n_trials=budget)
        return np.array([study.best_params[f"w{i}"] for i in range(dim)]).reshape(shape)
    if method == "caruana":
        # forward selection with replacement (Caruana et al., 2004), starting from the best single model
        counts = np.zeros(M)
        counts[int(np.argmax([obj.score(np.eye(M)[m]) for m in range(M)]))] = 1
        best = obj.score(counts)
        for _ in range(cfg.caruana_steps):
            trials = [obj.score(counts + np.eye(M)[m]) for m in range(M)]
            m = int(np.argmax(trials))
            if trials[m] < best:
                break
            counts[m] += 1
            best = trials[m]
        return counts if not per_head else np.repeat(counts[:, None], H, axis=1)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# ----------------------------------------------------------------------------- nested CV

def nested_cv(members, targets, folds, schema, method: str, use_bias: bool, cfg: EnsembleConfig) -> dict:
    """Fit on the other folds, predict the held-out fold, score the assembled predictions once."""
    start = time.perf_counter()
    full = BlendObjective(members, targets, schema)
    preds = [np.empty(len(r), dtype=np.int64) for r in full.rows]
    position = [pd.Series(np.arange(len(r)), index=r) for r in full.rows]
    for k in np.unique(folds):
        fit_obj = BlendObjective(members, targets, schema, np.flatnonzero(folds != k))
        weights = fit_weights(method, fit_obj, cfg.per_head, cfg, cfg.seed + int(k))
        bias = fit_obj.fit_bias(weights, cfg.bias_rounds, cfg.bias_range, cfg.bias_steps) if use_bias else None
        held = BlendObjective(members, targets, schema, np.flatnonzero(folds == k))
        for j, p in enumerate(held.predictions(weights, bias)):
            preds[j][position[j][held.rows[j]].to_numpy()] = p
    score = final_score(full.head_scores(preds), full.category)
    return {"score": score, "head_scores": full.head_scores(preds), "seconds": time.perf_counter() - start}


def bar_chart(schema: Schema, single: np.ndarray, blended: np.ndarray, single_name: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [h.name for h in schema.heads]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(names) + 1.2))
    ax.barh(y - 0.2, single, height=0.4, label=f"best single ({single_name})")
    ax.barh(y + 0.2, blended, height=0.4, label="ensemble (nested CV)")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("head score (harmonic mean of micro- and macro-F1)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- benchmark

def benchmark(cfg: EnsembleConfig) -> pd.DataFrame:
    """Synthetic OOF logits at the real scale: time the objective and a full STO search."""
    from utils.demo_data import COUNTS, sample_labels
    from utils.bench_train import machine

    rng = np.random.default_rng(cfg.seed)
    train = sample_labels(cfg.bench_rows, rng)
    schema = Schema.fit(train, {c: list(a) for c, a in COUNTS.items()})
    targets = schema.encode(train)
    start = time.perf_counter()
    members = np.empty((cfg.bench_models, len(train), schema.n_logits), dtype=np.float32)
    onehot = schema.one_hot(targets)
    for m in range(cfg.bench_models):  # members of different skill: signal + noise
        members[m] = head_log_softmax(onehot * rng.uniform(0.5, 2.0) + rng.normal(0, 1.5, onehot.shape).astype(np.float32), schema)
    make_s = time.perf_counter() - start
    start = time.perf_counter()
    obj = BlendObjective(members, targets, schema)
    pre_s = time.perf_counter() - start
    del members
    w = np.ones(cfg.bench_models)
    start = time.perf_counter()
    for _ in range(20):
        obj.score(w)
    per_eval = (time.perf_counter() - start) / 20
    obj.evaluations = 0
    start = time.perf_counter()
    fit_weights("sto", obj, False, cfg, cfg.seed)
    sto_s = time.perf_counter() - start
    table = pd.DataFrame([
        {"step": "make synthetic members", "seconds": make_s, "evaluations": 0},
        {"step": "precompute objective", "seconds": pre_s, "evaluations": 0},
        {"step": "one evaluation", "seconds": per_eval, "evaluations": 1},
        {"step": f"STO N={cfg.sto_population} T={cfg.sto_iterations}", "seconds": sto_s, "evaluations": obj.evaluations},
    ])
    print(f"\nensemble benchmark: {cfg.bench_models} members x {cfg.bench_rows} rows x {len(schema.heads)} heads "
          f"({schema.n_logits} logits)\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"{1 / per_eval:.1f} evaluations/s")
    return table


# ----------------------------------------------------------------------------- main

def main(cfg: EnsembleConfig) -> dict:
    if cfg.benchmark:
        return {"benchmark": benchmark(cfg)}
    out_dir = Path(cfg.out_dir)
    schema = Schema.load(out_dir / "schema.json")
    folds_table = pd.read_csv(out_dir / "folds.csv")
    n_folds = int(folds_table["fold"].nunique())
    runs = cfg.models.split(",") if cfg.models else discover_runs(out_dir, n_folds)
    if not runs:
        raise DataError(f"no run under {out_dir} has OOF logits for all {n_folds} folds; run train.py --fold all first")
    from utils.schema import read_dataset

    train = read_dataset(cfg.data_dir).train
    train = train[train[ID].isin(folds_table[ID])].reset_index(drop=True)
    fold_of = dict(zip(folds_table[ID], folds_table["fold"]))
    folds = train[ID].map(fold_of).to_numpy()
    targets = schema.encode(train)
    members = load_oof(out_dir, runs, schema, train[ID].to_numpy(), n_folds)
    print(f"ensemble of {len(runs)} run(s): {', '.join(runs)}; {len(train)} OOF rows, {n_folds} folds")

    full = BlendObjective(members, targets, schema)
    singles = {run: full.score(np.eye(len(runs))[m]) for m, run in enumerate(runs)}
    best_single = max(singles, key=singles.get)
    start = time.perf_counter()
    n = 50
    for _ in range(n):
        full.score(np.ones(len(runs)))
    evals_per_s = n / (time.perf_counter() - start)

    methods = [m for m in cfg.compare.split(",") if m] if cfg.compare else []
    if cfg.method != "auto" and cfg.method not in methods:
        methods.append(cfg.method)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    bias_options = {"on": [True], "off": [False], "auto": [False, True]}[cfg.bias]
    rows, results = [], {}
    equal_score = None
    for m in tqdm(methods, desc="nested CV", disable=not cfg.progress):
        for use_bias in bias_options:
            res = nested_cv(members, targets, folds, schema, m, use_bias, cfg)
            results[(m, use_bias)] = res
            if m == "equal" and not use_bias:
                equal_score = res["score"]
    if equal_score is None:
        equal_score = nested_cv(members, targets, folds, schema, "equal", False, cfg)["score"]
    for (m, use_bias), res in results.items():
        rows.append({"method": m + (" + bias" if use_bias else ""), "nested_cv": res["score"],
                     "vs_equal": res["score"] - equal_score, "vs_best_single": res["score"] - singles[best_single],
                     "seconds": res["seconds"]})
    table = pd.DataFrame(rows)
    single_rows = pd.DataFrame([{"model": k, "oof_score": v} for k, v in singles.items()])
    with pd.option_context("display.width", 140, "display.float_format", "{:+.4f}".format):
        print("\nsingle models (OOF score)\n" + single_rows.to_string(index=False, float_format="{:.4f}".format))
        print(f"\nnested CV over {n_folds} folds (fit on the others, score the held-out fold); "
              f"objective: {evals_per_s:.0f} evaluations/s")
        print(table.to_string(index=False, formatters={"nested_cv": "{:.4f}".format, "seconds": "{:.1f}".format}))
    not_positive = table[(table.vs_equal <= 0) & (table.method != "equal")]
    if len(not_positive):
        print(f"no nested gain over equal weights: {', '.join(not_positive.method)}")

    # choose and refit on all OOF rows
    if cfg.method == "auto":
        key = max(results, key=lambda k: results[k]["score"])
    else:
        choices = [(cfg.method, b) for b in bias_options]
        key = max(choices, key=lambda k: results[k]["score"])
    method, use_bias = key
    start = time.perf_counter()
    weights = fit_weights(method, full, cfg.per_head, cfg, cfg.seed)
    bias = full.fit_bias(weights, cfg.bias_rounds, cfg.bias_range, cfg.bias_steps) if use_bias else np.zeros(schema.n_logits)
    refit_s = time.perf_counter() - start
    normalised = full.head_weights(weights)
    report = {
        "models": runs, "method": method, "bias": bool(use_bias), "per_head": cfg.per_head,
        "blend": "per-head log-probabilities", "schema": schema.fingerprint,
        "weights": (normalised if cfg.per_head else normalised[:, 0]).tolist(),
        "biases": np.asarray(bias, dtype=float).round(6).tolist(),
        "nested_cv_score": results[key]["score"], "oof_score_in_sample": full.score(weights, bias),
        "equal_weights_nested_cv": equal_score, "single_models_oof": singles,
        "methods": table.to_dict(orient="records"), "refit_seconds": refit_s,
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(out_dir / "ensemble.json", report)
    bar_chart(schema, full.head_scores(full.predictions(np.eye(len(runs))[runs.index(best_single)])),
              results[key]["head_scores"], best_single, out_dir / "ensemble_heads.png")
    w_text = ", ".join(f"{r} {w:.3f}" for r, w in zip(runs, normalised.mean(axis=1)))
    print(f"\nchosen: {method}{' + bias' if use_bias else ''} (nested CV {results[key]['score']:.4f}); "
          f"weights: {w_text}\nwrote {out_dir / 'ensemble.json'} and {out_dir / 'ensemble_heads.png'}")
    return report


if __name__ == "__main__":
    main(parse_config(EnsembleConfig, description=__doc__))

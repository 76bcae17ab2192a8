"""What ``python ensemble.py`` does (its command line is the script): every method's nested-CV score
over the members' OOF logits, with and without per-class biases, the chosen one refitted on all
OOF rows, and ``ensemble.json`` with its provenance and each held-out fold's fit. The searches
themselves are ``utils/ensemble/search.py``; the blend they fit is ``utils/blend.py``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from utils import provenance
from utils.blend import load_oof
from utils.config import CommonConfig, option
from utils.data.schema import ID, read_dataset
from utils.ensemble.search import METHODS, BlendObjective, Budget, fit, nested_cv
from utils.errors import DataError
from utils.io import atomic_write_json
from utils.plots import head_bars
from utils.run import RunDir


@dataclass
class EnsembleConfig(CommonConfig):
    models: Optional[list[str]] = option(None, "run names (a,b,c); default: every complete run")
    method: str = option("auto", "the method written to ensemble.json; auto = the best nested-CV score",
                         choices=("auto",) + METHODS)
    compare: list[str] = option(help="methods in the nested-CV table", choices=METHODS,
                                factory=lambda: ["equal", "caruana", "nelder_mead", "tpe", "sto"])
    per_head: bool = option(False, "one weight per (model, head) instead of per model")
    bias: str = option("auto", "per-class biases: on, off, or auto (kept when nested CV shows a gain)",
                       choices=("on", "off", "auto"))
    sto_population: int = option(16, "STO population")
    sto_iterations: int = option(12, "STO iterations; every method gets population * (1 + 4 * iterations) "
                                     "objective evaluations")
    caruana_steps: int = option(20, "Caruana: greedy additions at most")
    bias_rounds: int = option(2, "coordinate-ascent rounds over each head's biases")
    bias_range: float = option(2.0, "biases tried in [-range, range]")
    bias_steps: int = option(9, "grid points per bias")
    progress: bool = option(True, "progress bars")

    @property
    def budget(self) -> Budget:
        return Budget(self.sto_population, self.sto_iterations, self.caruana_steps, self.bias_rounds,
                      self.bias_range, self.bias_steps)


def load_members(cfg: EnsembleConfig, run_dir: RunDir) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(runs, members [M, N, L] per-head log-probabilities, targets [N, H], folds [N])."""
    runs = cfg.models or run_dir.complete_runs()
    if not runs:
        raise DataError(f"no complete run under {run_dir.path} (every fold with metrics.json); "
                        f"run train.py --fold all first")
    rows = run_dir.train_rows(read_dataset(cfg.data_dir).train)
    members = load_oof(run_dir, runs, rows[ID].to_numpy())
    print(f"ensemble of {len(runs)} run(s): {', '.join(runs)}; {len(rows)} OOF rows, {run_dir.n_folds} folds")
    return runs, members, run_dir.schema.encode(rows), rows["fold"].to_numpy()


def compare_methods(cfg: EnsembleConfig, members, targets, folds, schema, singles: dict):
    """Nested CV of every method to compare, with and without biases:
    ({(method, bias): result}, the table, equal weights' nested score)."""
    methods = list(cfg.compare)
    if cfg.method != "auto" and cfg.method not in methods:
        methods.append(cfg.method)
    bias_options = {"on": [True], "off": [False], "auto": [False, True]}[cfg.bias]
    results = {}
    for m in tqdm(methods, desc="nested CV", disable=not cfg.progress):
        for use_bias in bias_options:
            results[(m, use_bias)] = nested_cv(members, targets, folds, schema, m, use_bias, cfg.per_head,
                                               cfg.budget, cfg.seed)
    equal = results.get(("equal", False)) or nested_cv(members, targets, folds, schema, "equal", False,
                                                        cfg.per_head, cfg.budget, cfg.seed)
    best_single = max(singles.values())
    table = pd.DataFrame([{"method": m + (" + bias" if b else ""), "nested_cv": r["score"],
                           "vs_equal": r["score"] - equal["score"], "vs_best_single": r["score"] - best_single,
                           "seconds": r["seconds"]} for (m, b), r in results.items()])
    return results, table, equal["score"]


def print_tables(singles: dict, table: pd.DataFrame, n_folds: int, optimistic: set = frozenset()) -> None:
    single_rows = pd.DataFrame([{"model": k, "oof_score": v,
                                 "note": "optimistic: a student that saw its validation labels" if k in optimistic else ""}
                                for k, v in singles.items()])
    with pd.option_context("display.width", 140, "display.float_format", "{:+.4f}".format):
        print("\nsingle models (OOF score)\n" + single_rows.to_string(index=False, float_format="{:.4f}".format))
        print(f"\nnested CV over {n_folds} folds (fit on the others, score the held-out fold)")
        print(table.to_string(index=False, formatters={"nested_cv": "{:.4f}".format, "seconds": "{:.1f}".format}))
    not_positive = table[(table.vs_equal <= 0) & (table.method != "equal")]
    if len(not_positive):
        print(f"no nested gain over equal weights: {', '.join(not_positive.method)}")
    if optimistic:
        print(f"optimistic: {', '.join(sorted(optimistic))} (--distill-mode optimistic) saw its validation labels "
              f"through its teacher; its OOF score and every nested-CV score above that weighs it are optimistic")


def made_from(cfg: EnsembleConfig, run_dir: RunDir, runs: list[str]) -> dict:
    """ensemble.json is made from every OOF logits file it read (and the folds that split them, the
    labels it was fitted to)."""
    files = [run_dir.fold_file(r, k, "oof_logits.npz") for r in runs for k in range(run_dir.n_folds)]
    options = f" --method {cfg.method} --bias {cfg.bias}" + (" --per-head" if cfg.per_head else "") + \
        (f" --models {','.join(cfg.models)}" if cfg.models else "")
    inputs = [p for p in (run_dir.schema_path, run_dir.folds_path, run_dir.labels_path) if p.is_file()]
    return provenance.record(files + inputs, run_dir.path,
                             rebuild=f"python ensemble.py --data-dir {cfg.data_dir} --out-dir {{root}}{options}")


def ensemble(cfg: EnsembleConfig) -> dict:
    """What ``python ensemble.py`` does: compare the methods by nested CV, refit the chosen one on all
    OOF rows, write ensemble.json and ensemble_heads.png; returns what ensemble.json holds."""
    run_dir = RunDir(cfg.out_dir)
    schema = run_dir.schema
    runs, members, targets, folds = load_members(cfg, run_dir)
    full = BlendObjective(members, targets, schema)
    singles = {run: full.score(np.eye(len(runs))[m]) for m, run in enumerate(runs)}
    results, table, equal_score = compare_methods(cfg, members, targets, folds, schema, singles)
    optimistic = {r for r in runs if run_dir.optimistic_student(r)}
    print_tables(singles, table, run_dir.n_folds, optimistic)

    # choose, and refit on all OOF rows
    candidates = results if cfg.method == "auto" else [k for k in results if k[0] == cfg.method]
    method, use_bias = max(candidates, key=lambda k: results[k]["score"])
    start = time.perf_counter()
    weights, bias = fit(full, method, use_bias, cfg.per_head, cfg.budget, cfg.seed)
    bias = np.zeros(schema.n_logits) if bias is None else bias
    refit_s = time.perf_counter() - start
    normalised = full.head_weights(weights)
    chosen = results[(method, use_bias)]
    report = {
        "models": runs, "method": method, "bias": bool(use_bias), "per_head": cfg.per_head,
        "blend": "per-head log-probabilities", "schema": schema.fingerprint,
        "weights": (normalised if cfg.per_head else normalised[:, 0]).tolist(),
        "biases": np.asarray(bias, dtype=float).round(6).tolist(),
        "fold_fits": [{"fold": k, "weights": (w if cfg.per_head else w[:, 0]).tolist(),
                       "biases": np.zeros(schema.n_logits).tolist() if b is None else np.asarray(b, dtype=float).round(6).tolist()}
                      for k, (w, b) in sorted(chosen["fold_fits"].items())],
        "nested_cv_score": chosen["score"], "oof_score_in_sample": full.score(weights, bias),
        "equal_weights_nested_cv": equal_score, "single_models_oof": singles, "optimistic": sorted(optimistic),
        "methods": table.to_dict(orient="records"), "refit_seconds": refit_s,
        "config": dataclasses.asdict(cfg), "provenance": made_from(cfg, run_dir, runs),
    }
    atomic_write_json(run_dir.ensemble_path, report)
    best_single = max(singles, key=singles.get)
    head_bars([h.name for h in schema.heads],
              full.head_scores(full.predictions(np.eye(len(runs))[runs.index(best_single)])),
              chosen["head_scores"], best_single, run_dir.path / "ensemble_heads.png")
    w_text = ", ".join(f"{r} {w:.3f}" for r, w in zip(runs, normalised.mean(axis=1)))
    print(f"\nchosen: {method}{' + bias' if use_bias else ''} (nested CV {chosen['score']:.4f}); "
          f"weights: {w_text}\nwrote {run_dir.ensemble_path} and {run_dir.path / 'ensemble_heads.png'}")
    return report


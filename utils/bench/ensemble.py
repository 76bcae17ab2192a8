"""The ensemble weight search at the real scale: synthetic OOF logits of ``--models`` members over
``--rows`` train rows and the 42 real heads; times the objective and a full STO search.

    python -m utils.bench.ensemble                      # 20 members x 70,000 rows
    python -m utils.bench.ensemble --models 4 --rows 10000
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.bench import machine
from utils.blend import head_log_softmax
from utils.config import option, run_command
from utils.data.schema import Schema
from utils.ensemble.search import BlendObjective, Budget, fit_weights
from utils.tools.demo_data import COUNTS, sample_labels


@dataclass
class BenchEnsembleConfig:
    models: int = option(20, "ensemble members (e.g. 4 backbones x 5 folds)")
    rows: int = option(70000, "OOF rows (the real train set has about 70,000)")
    sto_population: int = option(16, "STO population, as ensemble.py's default")
    sto_iterations: int = option(12, "STO iterations, as ensemble.py's default")
    seed: int = option(42, "random seed of the synthetic labels and logits")


def synthetic_members(n_models: int, n_rows: int, rng) -> tuple[Schema, np.ndarray, np.ndarray]:
    """(schema, members [M, N, L] log-probabilities, targets): members of different skill,
    signal + noise over labels drawn like the real data."""
    train = sample_labels(n_rows, rng)
    schema = Schema.fit(train, {c: list(a) for c, a in COUNTS.items()})
    targets = schema.encode(train)
    members = np.empty((n_models, len(train), schema.n_logits), dtype=np.float32)
    onehot = schema.one_hot(targets)
    noise = rng.standard_normal(onehot.shape, dtype=np.float32) * np.float32(1.5)
    for member in members:  # written in place, in float32: 1 GB at full scale
        # one draw of noise, shifted by another number of rows for each member: independent across
        # the members of a row, and much cheaper than a draw per member
        np.copyto(member, np.roll(noise, int(rng.integers(1, len(noise))), axis=0))
        member += onehot * np.float32(rng.uniform(0.5, 2.0))
        member[:] = head_log_softmax(member, schema)
    return schema, members, targets


def main(cfg: BenchEnsembleConfig) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    schema, members, targets = synthetic_members(cfg.models, cfg.rows, rng)
    make_s = time.perf_counter() - start
    start = time.perf_counter()
    obj = BlendObjective(members, targets, schema)
    pre_s = time.perf_counter() - start
    del members  # the objective keeps its own per-head copies
    w = np.ones(cfg.models)
    start = time.perf_counter()
    for _ in range(20):
        obj.score(w)
    per_eval = (time.perf_counter() - start) / 20
    obj.evaluations = 0
    start = time.perf_counter()
    fit_weights("sto", obj, False, Budget(cfg.sto_population, cfg.sto_iterations), cfg.seed)
    sto_s = time.perf_counter() - start
    table = pd.DataFrame([
        {"step": "make synthetic members", "seconds": make_s, "evaluations": 0},
        {"step": "precompute objective", "seconds": pre_s, "evaluations": 0},
        {"step": "one evaluation", "seconds": per_eval, "evaluations": 1},
        {"step": f"STO N={cfg.sto_population} T={cfg.sto_iterations}", "seconds": sto_s, "evaluations": obj.evaluations},
    ])
    print(f"\nensemble search: {cfg.models} members x {cfg.rows} rows x {len(schema.heads)} heads "
          f"({schema.n_logits} logits)\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"{1 / per_eval:.1f} evaluations/s")
    return table


if __name__ == "__main__":
    run_command(main, BenchEnsembleConfig, __doc__)

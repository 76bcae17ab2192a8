"""What to serve under a latency budget (``export.py --budget-ms``), measured on the machine it runs on.

Candidates: the ensemble of ``ensemble.json``; smaller ensembles, by greedy backward elimination
(each step drops the member whose removal keeps the best nested-CV score); and every complete run
alone (a distilled student among them). Each is scored by nested CV on OOF logits with the
method and bias setting of ``ensemble.json``, and refitted on all OOF rows for serving. A student
trained in optimistic mode has scores that saw its validation labels: its candidates compete on
them all the same, and budget.csv's ``score_source`` says so.

Serving variants of a candidate: one merged fp32 graph, or per-fold sessions in fp32, or in int8
for the members whose OOF score drops by less than ``int8_max_drop`` when quantised (their int8
OOF logits then enter the candidate's nested CV, and its served weights are fitted on them); and
every member's first fold alone. A member trained with ``tta_hflip`` is scored on mirrored-and-
averaged OOF logits, so it is timed and served with the mirror too, and never in a merged graph.
OOF scores measure single-fold models (each OOF row is predicted by one fold's model), so a
one-fold variant carries the same score estimate; averaging the folds at test time gains on top
of it, unmeasured, so when both fit, all folds are served.

Each variant is timed end to end per image (read, decode, preprocess, every member, blend,
decode), single stream. Its tail latency is the p99 of at least ``P99_MIN_IMAGES`` timings, or
else the maximum of the n timed (``tail`` in budget.csv says which): a p99 of 20 timings would
be an interpolation between the two slowest. The choice: the best score whose tail fits the
budget; at an equal score, all folds before one, then the faster. When nothing fits, nothing is
chosen, and the fastest variant and its tail latency are named.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from utils.ensemble.search import BlendObjective, Budget, fit, nested_cv
from utils.serve.members import single_stream_ms


@dataclass
class Variant:
    models: list[str]
    weights: np.ndarray
    biases: np.ndarray
    score: float
    folds: str = "all"  # all, or one (each member's fold 0)
    format: str = "separate"  # separate sessions, or one merged graph
    int8: list[str] = field(default_factory=list)  # members served in int8
    p50: float = float("nan")
    p99: float = float("nan")  # the p99 of ``timed`` timings, or their maximum below P99_MIN_IMAGES
    timed: int = 0
    optimistic: list[str] = field(default_factory=list)  # members whose OOF saw their validation labels
    path: str | None = None  # the merged graph's file, once exported

    @property
    def name(self) -> str:
        fmt = "merged fp32" if self.format == "merged" else ("int8: " + ",".join(self.int8) if self.int8 else "fp32")
        return f"{'+'.join(self.models)} ({fmt}, {self.folds} folds)"

    def row(self, budget_ms: float) -> dict:
        return {"candidate": "+".join(self.models), "folds": self.folds, "format": self.format,
                "int8": ",".join(self.int8) or "-", "score": self.score,
                "score_source": "nested CV on OOF" + (f"; optimistic: {','.join(self.optimistic)} (a student in "
                                                      f"optimistic mode)" if self.optimistic else ""),
                "p50_ms": self.p50, "p99_ms": self.p99, "tail": tail_name(self.timed),
                "fits": bool(self.p99 <= budget_ms)}


P99_MIN_IMAGES = 100


def tail_name(n: int) -> str:
    return f"p99 of {n}" if n >= P99_MIN_IMAGES else f"max of {n}"


class Scorer:
    """Nested-CV scores and all-row refits of member subsets, with ensemble.json's method."""

    def __init__(self, members: dict, int8_members: dict, targets, folds, schema, spec: dict):
        self.members, self.int8_members = members, int8_members  # {run: [N, L] log-probs}
        self.targets, self.folds, self.schema = targets, folds, schema
        self.method, self.bias = spec["method"], spec["bias"]
        c = spec.get("config", {})
        self.per_head = bool(spec.get("per_head"))
        self.budget = Budget(c.get("sto_population", 16), c.get("sto_iterations", 12), c.get("caruana_steps", 20),
                             c.get("bias_rounds", 2), c.get("bias_range", 2.0), c.get("bias_steps", 9))
        self.seed = c.get("seed", 42)

    def stack(self, runs: list[str], int8: list[str]) -> np.ndarray:
        return np.stack([(self.int8_members if r in int8 else self.members)[r] for r in runs])

    def score(self, runs: list[str], int8: tuple = ()) -> float:
        method = self.method if len(runs) > 1 else "equal"
        return nested_cv(self.stack(runs, list(int8)), self.targets, self.folds, self.schema, method, self.bias,
                         self.per_head, self.budget, self.seed)["score"]

    def refit(self, runs: list[str], int8: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """Weights and biases fitted on every OOF row, on the logits the variant serves (int8 ones for
        the members in ``int8``)."""
        obj = BlendObjective(self.stack(runs, list(int8)), self.targets, self.schema)
        weights, bias = fit(obj, self.method if len(runs) > 1 else "equal", self.bias, self.per_head, self.budget, self.seed)
        w = obj.head_weights(weights)
        return (w if self.per_head else w[:, 0]), (np.zeros(self.schema.n_logits, np.float32) if bias is None else bias)


def candidates(scorer: Scorer, ensemble: list[str], runs: list[str]) -> list[list[str]]:
    """The ensemble, its greedy backward eliminations, and every run alone."""
    found, current = [list(ensemble)], list(ensemble)
    while len(current) > 2:
        scored = {r: scorer.score([m for m in current if m != r]) for r in current}
        current = [m for m in current if m != max(scored, key=scored.get)]
        found.append(current)
    found += [[r] for r in runs]
    unique = []
    for c in found:
        if c not in unique:
            unique.append(c)
    return unique


def variants_of(scorer: Scorer, runs: list[str], int8_ok: set[str], mergeable: bool,
                optimistic: set[str] = frozenset()) -> list[Variant]:
    """The serving variants of one candidate, each with its score and refitted weights; a score that
    rests on an ``optimistic`` member (utils/train/distill.py) says so."""
    weights, biases = scorer.refit(runs)
    score, flagged = scorer.score(runs), [r for r in runs if r in optimistic]
    out = [Variant(runs, weights, biases, score, folds=f, optimistic=flagged) for f in ("all", "one")]
    if mergeable:
        out.append(Variant(runs, weights, biases, score, format="merged", optimistic=flagged))
    quantised = [r for r in runs if r in int8_ok]
    if quantised:
        s8, (w8, b8) = scorer.score(runs, tuple(quantised)), scorer.refit(runs, tuple(quantised))
        out += [Variant(runs, w8, b8, s8, folds=f, int8=quantised, optimistic=flagged) for f in ("all", "one")]
    return out


def int8_allowed(entries: dict, max_drop: float) -> set[str]:
    """The runs that may be served in int8: quantised (``oof_int8`` measured) and losing less than
    ``max_drop`` of OOF score against their fp32 ONNX model. ``entries``: {run: manifest entry}."""
    return {run for run, e in entries.items()
            if "oof_int8" in e and e["oof_fp32"] - e["oof_int8"] < max_drop}


def time_variant(predict_one, items: list, warmup: int = 3) -> tuple[float, float, int]:
    """(p50, tail, n) in ms of ``predict_one(item)`` over the n ``items``, single stream: the tail
    is the p99 from P99_MIN_IMAGES timings up, else the slowest of them."""
    single_stream_ms(predict_one, items[:warmup])
    times = single_stream_ms(predict_one, items)
    tail = np.percentile(times, 99) if len(times) >= P99_MIN_IMAGES else np.max(times)
    return float(np.median(times)), float(tail), len(times)


def choose(variants: list[Variant], budget_ms: float) -> Variant | None:
    fitting = [v for v in variants if v.p99 <= budget_ms]
    if not fitting:
        return None
    return max(fitting, key=lambda v: (round(v.score, 9), v.folds == "all", -v.p99))


def table(variants: list[Variant], budget_ms: float) -> pd.DataFrame:
    return pd.DataFrame([v.row(budget_ms) for v in variants]).sort_values(["fits", "score"], ascending=False)


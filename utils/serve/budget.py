"""What to serve under a latency budget (``export.py --budget-ms``), measured on the machine it runs
on: ``choose_serving`` scores and times every candidate and returns the one to serve (``choose``).

Candidates: the ensemble of ``ensemble.json``; smaller ensembles, by greedy backward elimination
(each step drops the member whose removal keeps the best nested-CV score); and every complete run
alone (a distilled student among them). Each is scored by nested CV on OOF logits with the
method and bias setting of ``ensemble.json``, and refitted on all OOF rows for serving. A student
trained in optimistic mode has scores that saw its validation labels: its candidates compete on
them all the same, and budget.csv's ``score_source`` says so.

Serving variants of a candidate: one merged fp32 graph (built here for each candidate, checked
against its separate sessions, ``merged_parity`` in budget.csv; export.py builds no ensemble.onnx of
its own under a budget), or per-fold sessions in fp32, or in int8
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
be an interpolation between the two slowest. The choice, among the variants whose tail fits the
budget: the one-standard-error rule (Breiman et al., CART; Hastie et al., ESL 7.10): of those whose
score is within one standard error of the best's (the error of their difference, by a paired
bootstrap over the images' nested-CV predictions, ``paired_se``), the fewest members; then the
better score, all folds before one, the faster. A nested-CV gain smaller than its own noise does
not pay for more members: on the solar cells of BENCHMARKS.md, a blend 0.0062 above the frozen
route alone (standard error 0.0069) scored 0.0087 below it on the held-out images. When nothing
fits, nothing is chosen, and the fastest variant and its tail latency are named.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from tqdm import tqdm

from utils.blend import combine_members, head_log_softmax, load_oof
from utils.data.schema import CATEGORY, ID, image_path
from utils.data.transforms import Preprocess
from utils.ensemble.search import BlendObjective, Budget, fit, nested_cv, paired_se
from utils.errors import DataError
from utils.io import atomic_write_csv
from utils.run import RunDir
from utils.serve.graph import export_graph
from utils.serve.members import (MERGED_PARITY, fold_files, fold_members, merged_parity, onnx_runner, report_skipped,
                                 run_members, single_stream_ms, usable_batch)


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
    parity: float = float("nan")  # a merged graph's max |diff| against the separate sessions it replaces

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
                "fits": bool(self.p99 <= budget_ms), "merged_parity": self.parity}


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
        self.cache, self.ses = {}, {}  # nested_cv by candidate; standard errors by pair

    def stack(self, runs: list[str], int8: list[str]) -> np.ndarray:
        return np.stack([(self.int8_members if r in int8 else self.members)[r] for r in runs])

    def nested(self, runs: list[str], int8: tuple = ()) -> dict:
        """``nested_cv`` of the candidate (computed once): its score and held-out predictions."""
        key = (tuple(runs), tuple(int8))
        if key not in self.cache:
            method = self.method if len(runs) > 1 else "equal"
            self.cache[key] = nested_cv(self.stack(runs, list(int8)), self.targets, self.folds, self.schema, method,
                                        self.bias, self.per_head, self.budget, self.seed)
        return self.cache[key]

    def score(self, runs: list[str], int8: tuple = ()) -> float:
        return self.nested(runs, int8)["score"]

    def se(self, a: "Variant", b: "Variant") -> float:
        """The standard error of a's score minus b's (``paired_se`` over their nested-CV predictions)."""
        key = (tuple(a.models), tuple(a.int8)), (tuple(b.models), tuple(b.int8))
        if key[0] == key[1]:
            return 0.0
        if key not in self.ses:
            a_preds, b_preds = self.nested(*key[0])["preds"], self.nested(*key[1])["preds"]
            self.ses[key] = paired_se(self.labelled, a_preds, b_preds, seed=self.seed)
        return self.ses[key]

    @cached_property
    def labelled(self) -> BlendObjective:
        """Each head's labelled rows and their truth, which every candidate's nested-CV predictions
        follow (they depend on the targets alone: any one member builds them)."""
        return BlendObjective(self.stack(list(self.members)[:1], []), self.targets, self.schema)

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


def best(variants: list[Variant]) -> Variant:
    """The best score; at an equal score, all folds before one, then the faster."""
    return max(variants, key=lambda v: (round(v.score, 9), v.folds == "all", -v.p99))


def choose(variants: list[Variant], budget_ms: float, se=None) -> Variant | None:
    """The variant to serve among those whose tail fits ``budget_ms`` (None when none does): the
    best (``best``), or, with ``se(best, v)`` (the standard error of their score difference), the one
    with the fewest members among those within one standard error of the best (the one-standard-
    error rule), then the better score, all folds before one, the faster."""
    fitting = [v for v in variants if v.p99 <= budget_ms]
    if not fitting:
        return None
    top = best(fitting)
    if se is None:
        return top
    close = [v for v in fitting if v.score >= top.score - se(top, v)]
    return max(close, key=lambda v: (-len(v.models), round(v.score, 9), v.folds == "all", -v.p99))


def table(variants: list[Variant], budget_ms: float, se=None) -> pd.DataFrame:
    """Every variant's row; with ``se``, the standard error of each fitting one's score below the
    best that fits (``se_vs_best``: the one-standard-error rule of ``choose``)."""
    rows = pd.DataFrame([v.row(budget_ms) for v in variants])
    fitting = [v for v in variants if v.p99 <= budget_ms]
    if se is not None and fitting:
        top = best(fitting)
        rows["se_vs_best"] = [se(top, v) if v.p99 <= budget_ms else float("nan") for v in variants]
    return rows.sort_values(["fits", "score"], ascending=False)



def mergeable(entries: list[dict]) -> bool:
    """Runs (manifest entries) that one graph can serve: one preprocessing, and none that averages
    the mirror."""
    return len({json.dumps(e["preprocess"], sort_keys=True) for e in entries}) == 1 and \
        not any(e.get("tta_hflip") for e in entries)


def choose_serving(run_dir: RunDir, exported: dict, data, *, budget_ms: float, int8_max_drop: float, merge: bool,
                   latency_images: int, parity_images: int, threads: int, progress: bool = True) -> dict:
    """Every candidate configuration of the ``exported`` runs ({run: (manifest entry, its int8 OOF
    logits or {})}) scored by nested CV and timed here on ``latency_images`` test images; writes
    ``onnx/budget.csv`` and returns the manifest's ``serve``: what ``choose`` serves under ``budget_ms``.
    Raises, naming the fastest, when none does."""
    if run_dir.ensemble_path.is_file():
        spec = json.loads(run_dir.ensemble_path.read_text())
    elif len(exported) == 1:  # one run: nothing to weigh (fit.py when only the frozen route completed)
        spec = {"models": list(exported), "method": "equal", "bias": False}
    else:
        raise DataError(f"--budget-ms weighs the candidates with {run_dir.ensemble_path}'s method: run ensemble.py first")
    schema = run_dir.schema
    rows, runs = run_dir.train_rows(data.train), list(exported)
    position = pd.Series(np.arange(len(rows)), index=rows[ID].to_numpy())
    members = dict(zip(runs, load_oof(run_dir, runs, rows[ID].to_numpy())))
    int8_members = {}  # with --int8: each member's int8 OOF logits, for the candidates that quantise it
    for run, (entry, oof) in exported.items():
        if oof:
            z = np.empty_like(oof["int8"])
            z[position[oof["ids"]].to_numpy()] = oof["int8"]
            int8_members[run] = head_log_softmax(z, schema)
    int8_ok = int8_allowed({run: entry for run, (entry, oof) in exported.items() if oof}, int8_max_drop)
    scorer = Scorer(members, int8_members, schema.encode(rows), rows["fold"].to_numpy(), schema, spec)
    preps = {run: Preprocess.from_dict(exported[run][0]["preprocess"]) for run in runs}
    variants, optimistic = [], {r for r in runs if run_dir.optimistic_student(r)}
    for models in candidates(scorer, spec["models"], runs):
        merge_it = merge and mergeable([exported[r][0] for r in models])
        variants += variants_of(scorer, models, int8_ok, merge_it, optimistic)
    paths = [image_path(data.test_images, i) for i in data.test[ID]]  # the usable ones: timed, and the parity's
    x, skipped = usable_batch(paths, next(iter(preps.values())), max(latency_images, parity_images))
    report_skipped(skipped, "budget: timing")
    passed_over = {p for p, _ in skipped}
    items = [(p, c) for p, c in zip(paths[: len(x) + len(skipped)], data.test[CATEGORY]) if p not in passed_over]
    parity_paths, items = [p for p, _ in items[:parity_images]], items[:latency_images]
    entries = {r: e for r, (e, _) in exported.items()}
    for k, v in enumerate(tqdm(variants, desc="budget", disable=not progress)):
        one_image = predict_fn(run_dir, v, preps[v.models[0]], entries, f"budget_{k}.onnx", parity_paths, threads)
        v.p50, v.p99, v.timed = time_variant(one_image, items)
    summary = table(variants, budget_ms, scorer.se)
    atomic_write_csv(run_dir.onnx_dir / "budget.csv", summary)
    tail = tail_name(len(items))
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        print(f"\nserving candidates, end to end per image, single stream, {threads} threads, {len(items)} "
              f"images; budget {budget_ms:.0f} ms for the {tail}\n"
              + summary.to_string(index=False, float_format="{:.4f}".format))
    chosen = choose(variants, budget_ms, scorer.se)
    for v in variants:  # the merged graphs built to be timed: only the chosen one is kept
        if v.path and v is not chosen:
            (run_dir.onnx_dir / v.path).unlink(missing_ok=True)
    if chosen is None:
        fastest = min(variants, key=lambda v: v.p99)
        raise DataError(f"nothing fits a budget of {budget_ms:.0f} ms for the {tail} on this machine: the fastest "
                        f"is {fastest.name} at {fastest.p99:.1f} ms (every candidate: {run_dir.onnx_dir / 'budget.csv'})")
    flag = f", optimistic: {','.join(chosen.optimistic)} saw its validation labels" if chosen.optimistic else ""
    top = best([v for v in variants if v.p99 <= budget_ms])
    if len(chosen.models) < len(top.models):
        print(f"one-standard-error rule: {'+'.join(top.models)} scores {top.score:.4f}, {top.score - chosen.score:.4f} "
              f"above {'+'.join(chosen.models)}, within one standard error of the difference "
              f"({scorer.se(top, chosen):.4f}, a paired bootstrap over the images' nested-CV predictions): the fewer "
              f"members are served")
    print(f"serving {chosen.name}: score {chosen.score:.4f} (nested CV{flag}), {tail_name(chosen.timed)} "
          f"{chosen.p99:.1f} ms <= {budget_ms:.0f} ms")
    return {"name": chosen.name, "models": chosen.models, "weights": np.asarray(chosen.weights).tolist(),
            "biases": np.asarray(chosen.biases, dtype=float).round(6).tolist(), "folds": chosen.folds,
            "format": chosen.format, "int8": chosen.int8, "path": chosen.path, "score": chosen.score,
            "p50_ms": chosen.p50, "p99_ms": chosen.p99, "budget_ms": budget_ms, "threads": threads,
            "images": len(items), "tail": tail_name(chosen.timed), "optimistic": chosen.optimistic}


def predict_fn(run_dir: RunDir, v: Variant, prep: Preprocess, entries: dict, merged_name: str, parity_paths: list,
               threads: int):
    """One image end to end (decode, preprocess, members, blend, decode) as variant ``v`` serves it.
    A merged variant's graph is exported as ``merged_name`` and first checked against the separate
    sessions it replaces, on ``parity_paths``: a graph that differs by more than MERGED_PARITY is an
    error (its max |diff| is kept in ``v.parity``). ``prep``: the preprocessing of its first member (a
    merged graph has one)."""
    schema = run_dir.schema
    ens = {"models": v.models, "weights": v.weights, "biases": v.biases}
    if v.format == "merged":
        v.path = merged_name
        export_graph(fold_files(run_dir.onnx_dir, entries, v.models), v.weights, v.biases, schema, prep,
                     run_dir.onnx_dir / v.path)
        session = onnx_runner(run_dir.onnx_dir / v.path, threads, schema)
        separate = fold_members(run_dir.onnx_dir, entries, v.models, (), False, threads, schema)  # fp32, every fold
        x = usable_batch(parity_paths, prep)[0]
        diff, same = merged_parity(session, separate, ens, schema, x)
        v.parity = diff
        if diff > MERGED_PARITY or not same:
            raise RuntimeError(f"{v.path} ({v.name}): the merged graph differs from its separate sessions on "
                               f"{len(x)} images (max |diff| {diff:.2e}, same decoding {same})")
        return lambda item: schema.predict(session(prep(item[0])[None]))
    members = fold_members(run_dir.onnx_dir, entries, v.models, v.int8, v.folds == "one", threads, schema)

    def predict_one(item):
        images = {p: p(item[0])[None] for p in {m.prep for m in members}}
        return schema.predict(combine_members(run_members(members, images), ens, schema))
    return predict_one

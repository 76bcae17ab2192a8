"""fit.py's planner: from what was measured on this machine and this data, the stages still to run
and the seconds each should take. Pure Python, no torch: a plan is a function of numbers, so its
decisions are tested on recorded measurements (tests/test_fit.py).

The plan, in order (each rule is printed beside the stage it decides; ``Step.why``):

1. **The frozen route first** (``frozen``): each backbone's images embedded once, MLP heads trained
   on the cached embeddings. It is the floor in seconds (a submission is written from it at once,
   ``floor``) and a teacher. Its first size is the smallest of ``LADDER`` at or above half the
   data's own resolution (the median shorter side of its images), never above the weights' own
   input size, and smaller while it does not fit. Larger sizes follow one at a time (at most
   ``MAX_FROZEN_SIZES``) while the last step up did not lose OOF score (measured: upscaling goes no
   further than it paid), the frozen stages stay within ``FROZEN_SHARE`` of the training time (all
   of it when no fine-tuning fits the budget), and fine-tuning could then run at the larger size
   (``EPOCHS_GOOD`` epochs of every fold in the time left, and no upscaling): the sweep finds
   fine-tuning's size, and a size only the frozen route could use waits until every fold is
   fine-tuned (or until, its epochs timed by the search, no more fine-tuning fits), in the time
   that leaves with a margin of ``SLACK`` (on 2,000 photos at 10 minutes, 96 and 128 px took 80 s
   that fine-tuning at 64 px needed).
2. **Fine-tuning** (``search``, ``finetune``), of the backbone whose frozen run scored best, at the
   largest size no larger than its best frozen size, nor than the data's own resolution (no
   upscaling: ``finetune_limit``), at which ``EPOCHS_GOOD`` epochs of every fold fit (else the size
   that fits the most epochs, at least ``EPOCHS_MIN``; else none): on 2,000 Fashion-MNIST photos at
   10 minutes, 10,000 held out, 21-24 epochs at 64 px (0.9252-0.9258) beat 12 at 96 px (0.9233) and
   5-7 at 128 px (0.9172). The epochs are what the time left buys (at most ``EPOCHS_MAX``), planned
   with a margin of ``SLACK``; once the search has timed real epochs of fold 0 (``Costs.timed``: the
   speed measured on random images ran 1.5x ahead of real epochs), its schedule is fitted again to
   the time left with the smaller margin ``TIMED_MARGIN`` (longer as well as shorter: a run of 7
   epochs planned with the first margin ended at 87 % of its budget), and so is each later fold's,
   from the median epoch of the folds done (a first epoch runs slower than the later ones: fold 0's
   count, fitted to it, had capped the later folds and left the budget unused: on the solar cells
   74-81 % of ten minutes ran). A fold under way is planned again after each of its epochs, from the
   median epoch of every fold so far, and its schedule retargeted to the epochs that now fit
   (``fold_epochs``): more, or fewer while it has epochs left (on 2,000 photos at 5 minutes the last
   fold ran 15 s an epoch where the earlier ones had run 17-18.5, and its 32 s left over went
   unused). The learning rates come from successive halving on fold 0: every rate of ``RATES``
   (multiples of the kit's base rates) trains the fold's first epoch of the planned schedule; the
   first, the kit's default, goes on as the run's fold 0 unless another leads it by more than one
   standard error (``utils.fit.run.choose_rate``). As many rates as ``SEARCH_SHARE`` of the
   fine-tuning time pays for.
3. **The ensemble** (``ensemble``) of every complete run; a distilled **student** on the frozen
   route (``student``) where it pays: when the ensemble would take over half the serving budget
   per image; then **export** with ``--budget-ms`` and **infer**: the submission of what is served
   (from the folds' saved test logits when every fold of its runs is served in fp32: export
   checked that its graphs compute them).

The seconds of the last stages are reserved before training is planned. Costs are images over
measured images per second (``Speed``), times a calibration per kind of stage that the run updates
from its own actual seconds (``Costs.calibrate``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

LADDER = (64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
MIN_GAIN = 0.0  # a step up in frozen size that lost OOF score ends the sweep (one step's gain is noisy:
# on 4,000 Fashion-MNIST photos 64 -> 96 px gained 0.0016, and 96 -> 128 -> 224 px 0.0071 and 0.0071 more)
MAX_FROZEN_SIZES = 3  # frozen sizes per backbone at most
FROZEN_SHARE = 0.35  # of the training time, for the frozen stages (all of it when fine-tuning cannot fit)
SEARCH_SHARE = 0.1  # of the fine-tuning time, for the learning-rate search's extra epochs
RATES = (3.0, 1.0, 10.0)  # learning-rate multiples searched, in the order they are dropped from the end
EPOCHS_MIN, EPOCHS_GOOD, EPOCHS_MAX = 2, 6, 24  # on 2,000 photos at 10 minutes, 21-24 epochs at 64 px held
# out 0.9252-0.9258 (10,000 photos); with the former cap of 12, 96 px for 12 (0.9233) or 128 px for 5-7 (0.9172)
HEAD_EPOCHS = 60  # frozen route: epochs of its heads over the cached embeddings (early stopping at 10)
SLACK = 0.25  # a stage this much over (or under) its prediction re-plans the rest
TIMED_MARGIN = 0.1  # fine-tuning's margin once the search has timed its epochs (the costs calibrated by it)
# Rules for what is not timed before it runs (the run prints the actual seconds beside each):
SETUP_S = 4.0  # per fold: build the model, load the weights, fork the loaders, open the caches
LOGITS_S = 1.0  # a submission blended from saved test logits (the floor; infer when every fold is served): 0.1 s
# measured on 1,000 and 2,000 test rows on every machine here, where SETUP_S had reserved 4 s for each of the two
ENSEMBLE_S = 5.0  # the ensemble search over a few members (seconds: python -m utils.bench.ensemble)
EXPORT_S, EXPORT_PER_MODEL_S = 5.0, 2.0  # export: ONNX, parity and latency of every fold model (6 Lite0
# folds at 64 px: 29-33 s while merged graphs were traced again, ~17 s joined from the folds' files)
LATENCY_FACTOR = 2.0  # one image alone takes this many times its share of a batch (serving vs throughput)


@dataclass(frozen=True)
class Speed:
    """One (backbone, size) on this machine: training images/s (forward, backward and the optimiser
    at the training batch, in ``dtype``), forward-only images/s (validation, test, embedding),
    images/s decoded and resized by every core; ``measured`` False when extrapolated from another
    size by pixel count."""
    train: float
    infer: float
    decode: float
    dtype: str = "fp32"
    measured: bool = True

    def at(self, size: int, measured_size: int) -> "Speed":
        """This speed extrapolated to ``size`` (compute grows with the pixels; decoding does not)."""
        r = (measured_size / size) ** 2
        return replace(self, train=self.train * r, infer=self.infer * r, measured=False)


@dataclass(frozen=True)
class Facts:
    """What the plan depends on besides speeds: the data, the budget and the options."""
    n_train: int
    n_test: int
    native: int  # the median shorter side of the train images, in pixels
    budget_s: float
    backbones: tuple[str, ...]
    sizes: dict  # backbone -> the sizes it may run at, ascending (never above its weights' own input size)
    head_rows_per_s: dict  # backbone -> rows/s of one epoch of every MLP head on its embeddings
    n_folds: int = 3
    budget_ms: float = 500.0


@dataclass(frozen=True)
class Step:
    kind: str  # frozen, floor, search, finetune, ensemble, student, export, infer
    backbone: str = ""
    size: int = 0
    seconds: float = 0.0  # predicted
    why: str = ""
    fold: int = -1
    epochs: int = 0
    rates: tuple = ()

    @property
    def key(self) -> tuple:
        return self.kind, self.backbone, self.size, self.fold, self.epochs, self.rates


@dataclass
class State:
    """What is done: complete frozen runs and their OOF, the fine-tuning run (backbone, size, rate,
    epochs, folds done), the last stages done, and the seconds spent by kind."""
    frozen: dict = field(default_factory=dict)  # (backbone, size) -> OOF score
    search: dict = field(default_factory=dict)  # rate -> val score after the first epoch
    finetune: dict | None = None  # {"backbone", "size", "rate", "epochs", "done": [folds], "oof"}, and
    # "running": [fold, epochs trained, its epochs] while a fold is under way (for the plan after each epoch)
    done: set = field(default_factory=set)  # floor, ensemble, student, export, infer
    spent: dict = field(default_factory=dict)  # kind -> seconds
    epoch_s: dict = field(default_factory=dict)  # "backbone@size" -> seconds of a fine-tuning epoch's training pass

    def to_dict(self) -> dict:
        return {"frozen": [[b, s, v] for (b, s), v in self.frozen.items()], "search": self.search,
                "finetune": self.finetune, "done": sorted(self.done), "spent": self.spent, "epoch_s": self.epoch_s}

    @classmethod
    def from_dict(cls, d: dict) -> "State":
        return cls({(b, s): v for b, s, v in d["frozen"]}, {float(k): v for k, v in d["search"].items()},
                   d["finetune"], set(d["done"]), d["spent"], d.get("epoch_s", {}))


def epoch_key(backbone: str, size: int) -> str:
    """The key of ``State.epoch_s`` (and ``Costs.timed``) for fine-tuning ``backbone`` at ``size`` px."""
    return f"{backbone}@{size}"


class BudgetTooSmall(ValueError):
    """Not even the frozen route and the last stages fit the budget (said before any training)."""


def parse_budget(text: str | float) -> float:
    """Seconds in "90", "90s", "10m", "1.5h"."""
    value = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value)
    except (ValueError, IndexError):
        raise ValueError(f"budget must be seconds or a number with s, m or h (90s, 10m, 1.5h), got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    return seconds


def ladder(cap: int) -> tuple[int, ...]:
    """The sizes a convolutional backbone whose weights were trained at ``cap`` px may run at."""
    return tuple(s for s in LADDER if s <= cap) or (LADDER[0],)


def first_frozen_size(native: int, sizes: tuple[int, ...]) -> int:
    """The smallest of ``sizes`` at or above half the data's resolution, else the largest."""
    return next((s for s in sizes if s >= native / 2), sizes[-1])


class Costs:
    """Predicted seconds of each kind of stage, from speeds (``speed(backbone, size)``) and the
    facts, times the calibration the run has learnt (actual over predicted, per kind). ``timed``:
    the training pass of a fine-tuning epoch as the run's own epochs took it (``State.epoch_s``),
    which replaces its prediction from the measured speed (on random images, without the data
    pipeline: 150 img/s measured where the epochs ran at 100 on 2,000 photos at 64 px)."""

    def __init__(self, facts: Facts, speed, calibration: dict | None = None, timed: dict | None = None):
        self.f, self.speed, self.calibration = facts, speed, dict(calibration or {})
        self.timed = {} if timed is None else timed

    def scaled(self, kind: str, seconds: float) -> float:
        """``seconds`` of a stage of ``kind`` as this run has found them (its calibration)."""
        return seconds * self.calibration.get(kind, 1.0)

    def calibrate(self, kind: str, predicted: float, actual: float) -> None:
        if predicted > 0 and actual > 0:
            self.calibration[kind] = self.calibration.get(kind, 1.0) * actual / predicted

    @property
    def rows(self) -> tuple[float, float]:
        """(train rows, validation rows) of one fold."""
        k = self.f.n_folds
        return self.f.n_train * (k - 1) / k, self.f.n_train / k

    def frozen(self, b: str, s: int) -> float:
        sp, f = self.speed(b, s), self.f
        embed = (f.n_train + f.n_test) * (1 / sp.infer + 1 / sp.decode)
        return self.scaled("frozen", embed + self.heads(b) + f.n_folds * SETUP_S)

    def heads(self, b: str) -> float:
        """The frozen route's heads: every fold's epochs over its train rows' embeddings."""
        return self.f.n_folds * HEAD_EPOCHS * self.rows[0] / self.f.head_rows_per_s[b]

    def epoch(self, b: str, s: int) -> float:
        sp = self.speed(b, s)
        trn, val = self.rows
        timed = self.timed.get(epoch_key(b, s))
        if timed is not None:  # the training pass as timed; validation as predicted
            return timed + self.scaled("finetune", val / sp.infer)
        return self.scaled("finetune", trn / sp.train + val / sp.infer)

    def fold_extra(self, b: str, s: int) -> float:
        """A fine-tuned fold's seconds besides its epochs: its test predictions and set-up."""
        return self.scaled("finetune", self.f.n_test / self.speed(b, s).infer + SETUP_S)

    def decode_cache(self, b: str, s: int) -> float:
        f = self.f
        return self.scaled("finetune", (f.n_train + f.n_test) / self.speed(b, s).decode)

    def student(self, b: str, s: int, members: int) -> float:
        """The frozen route on cached embeddings, after every teacher member's in-fold predictions."""
        f, sp = self.f, self.speed(b, s)
        teacher = members * f.n_train * (f.n_folds - 1) / sp.infer
        return self.scaled("student", teacher + self.heads(b) + f.n_folds * SETUP_S)

    def latency_ms(self, runs: list[tuple[str, int]]) -> float:
        """Per image, every fold of every run, one image alone (``LATENCY_FACTOR``)."""
        return sum(self.f.n_folds * LATENCY_FACTOR * 1000 / self.speed(b, s).infer for b, s in runs)

    def ensemble(self) -> float:
        return self.scaled("ensemble", ENSEMBLE_S)

    def export(self, runs: int) -> float:
        return self.scaled("export", EXPORT_S + EXPORT_PER_MODEL_S * runs * self.f.n_folds)

    def infer(self, runs: list[tuple[str, int]]) -> float:
        seconds = sum(self.f.n_folds * self.f.n_test / self.speed(b, s).infer for b, s in runs)
        return self.scaled("infer", SETUP_S + seconds)


def frozen_steps(facts: Facts, state: State, costs: Costs, room: float, usable=None) -> list[Step]:
    """The next frozen size of each backbone (see the module's rule 1), within ``room`` seconds.
    ``usable(b, s, seconds)``: whether fine-tuning could still run at ``s`` px after ``seconds`` more
    of the sweep; a step up it could not use is left out (None: every step up may run)."""
    steps, planned = [], 0.0
    for b in facts.backbones:
        sizes = facts.sizes[b]
        done = sorted(s for (bb, s) in state.frozen if bb == b)
        if not done:
            start = first_frozen_size(facts.native, sizes)
            fits = [s for s in sizes if s <= start and costs.frozen(b, s) <= room]
            if not fits:
                continue
            s = fits[-1]
            why = (f"first: the smallest size >= half the data's {facts.native} px" if s == start
                   else f"first: {start} px does not fit its share; the largest that does")
        else:
            last = done[-1]
            if len(done) >= MAX_FROZEN_SIZES or last == sizes[-1]:
                continue
            if len(done) >= 2:
                gain = state.frozen[(b, last)] - state.frozen[(b, done[-2])]
                if gain < MIN_GAIN:
                    continue
            s = next(x for x in sizes if x > last)
            if costs.frozen(b, s) > room or (usable and not usable(b, s, planned + costs.frozen(b, s))):
                continue
            why = f"a step up from {last} px (the last one gained {gain:+.4f})" if len(done) >= 2 else \
                f"a step up from {last} px: does upscaling pay?"
            why += f"; fine-tuning could run at {s} px" if usable else ""
        room -= costs.frozen(b, s)
        planned += costs.frozen(b, s)
        steps.append(Step("frozen", b, s, costs.frozen(b, s), why))
    return steps


def best_frozen(facts: Facts, state: State, planned: list[Step]) -> tuple[str, int]:
    """(backbone, size) of the best complete frozen run, else of the first planned one."""
    if state.frozen:
        return max(state.frozen, key=state.frozen.get)
    if planned:
        return planned[0].backbone, planned[0].size
    b = facts.backbones[0]
    return b, first_frozen_size(facts.native, facts.sizes[b])


def finetune_limit(facts: Facts, b: str) -> int:
    """Fine-tuning does not upscale: its size is at most the data's own resolution, or the first
    frozen size where the data are smaller than that. The frozen sweep's gain from upscaling is the
    pretrained filters meeting objects at their scale; a fine-tune learns the scale itself, and pays
    the square of the size for pixels that hold no information (on 2,000 28-px photos at 10 minutes,
    held out on 10,000: 64 px for 21-22 epochs 0.9258; 96 px for 12, 0.9233; 128 px for 5-7, 0.9172)."""
    return max(facts.native, first_frozen_size(facts.native, facts.sizes[b]))


def choose_finetune(facts: Facts, costs: Costs, b: str, limit: int, room: float) -> dict | None:
    """Size, epochs and the number of rates searched for fine-tuning ``b`` at ``limit`` px or less in
    ``room`` seconds (rule 2), or None when not even ``EPOCHS_MIN`` epochs fit."""
    k = facts.n_folds
    if room <= 0:
        return None
    limit = min(limit, finetune_limit(facts, b))
    options = []
    for s in sorted((s for s in facts.sizes[b] if s <= limit), reverse=True) or [facts.sizes[b][0]]:
        # planned with a margin: an epoch first run overran its prediction by up to 1.55x here, and
        # a fold that overruns leaves the later folds fewer epochs (a run of 7/3/3 epochs scored
        # below 5/5/5's); the time it leaves goes to the end
        e, extra = costs.epoch(b, s) * (1 + SLACK), costs.fold_extra(b, s)
        rates = next(n for n in (3, 2, 1) if (n - 1) * e <= SEARCH_SHARE * room)
        epochs = min(EPOCHS_MAX, math.floor((room - costs.decode_cache(b, s) - (rates - 1) * e - k * extra) / (k * e)))
        options.append({"size": s, "epochs": epochs, "rates": RATES[:rates]})
        if epochs >= EPOCHS_GOOD:
            return options[-1] | {"why": f"the largest size <= {limit} px (best frozen) with >= {EPOCHS_GOOD} epochs"}
    best = max(options, key=lambda o: (o["epochs"], o["size"]))
    if best["epochs"] < EPOCHS_MIN:
        return None
    return best | {"why": f"no size <= {limit} px fits {EPOCHS_GOOD} epochs; the one that fits the most"}


def finetune_steps(facts: Facts, state: State, costs: Costs, room: float, planned: list[Step]) -> list[Step]:
    """Fine-tuning's stages (rule 2): planned whole before it starts; once started, its size and
    rate stay and the folds left get the epochs that fit, as the run has timed them."""
    ft, k = state.finetune, facts.n_folds
    if ft is None:
        b, limit = best_frozen(facts, state, planned)
        choice = choose_finetune(facts, costs, b, limit, room)
        if choice is None:
            return []
        s, epochs, rates = choice["size"], choice["epochs"], choice["rates"]
        e, extra, setup = costs.epoch(b, s), costs.fold_extra(b, s), costs.scaled("finetune", SETUP_S)
        fold0 = []
        if len(rates) > 1:
            fold0 = [Step("search", b, s, costs.decode_cache(b, s) + len(rates) * (e + setup),
                          f"successive halving: {len(rates)} rates x the first epoch of {epochs}; " + choice["why"],
                          0, epochs, rates),
                     Step("finetune", b, s, (epochs - 1) * e + extra, "fold 0: the best rate goes on", 0, epochs)]
        else:
            fold0 = [Step("finetune", b, s, costs.decode_cache(b, s) + epochs * e + extra,
                          "fold 0 at the base rates (no room to search); " + choice["why"], 0, epochs, (1.0,))]
        return fold0 + [Step("finetune", b, s, epochs * e + extra, f"fold {j}", j, epochs) for j in range(1, k)]
    b, s, left = ft["backbone"], ft["size"], [j for j in range(k) if j not in ft["done"]]
    if not left:
        return []
    e, extra, setup = costs.epoch(b, s), costs.fold_extra(b, s), costs.scaled("finetune", SETUP_S)
    running = ft.get("running") or (-1, 0, 0)  # (fold, epochs trained, its epochs) of the fold under way

    def ran(j: int) -> int:  # epochs fold j has trained: the fold under way's so far, fold 0's first in the search
        return running[1] if j == running[0] else int(j == 0 and bool(state.search))

    def behind(j: int) -> float:  # seconds of fold j's work done: its epochs and, under way, its set-up
        return ran(j) * e + setup * (j == running[0])

    if state.search or epoch_key(b, s) in costs.timed:  # the epochs were timed: each fold's schedule is fitted
        cap, margin = EPOCHS_MAX, 1 + TIMED_MARGIN  # to the time left, as they take it
    else:
        cap, margin = ft["epochs"], 1.0

    def fits(margin: float) -> int:  # the epochs of each fold left that fit the room
        return min(cap, math.floor((room - sum(extra - behind(j) for j in left)) / (len(left) * e * margin)))

    epochs = fits(margin)
    if running[0] in left and epochs < running[2] <= fits(1.0):  # a fold under way keeps its count while it
        epochs = running[2]  # fits without the margin (a count that moved with each epoch's noise: 9, 8, 9, 10)
    if epochs < 1 + ran(left[0]):
        return []
    if epochs == ft["epochs"]:
        why = "as planned"
    elif epochs < ft["epochs"]:
        why = f"{epochs} of the {ft['epochs']} planned epochs fit"
    else:
        why = f"{epochs} epochs fit the time left, as the run timed them ({ft['epochs']} planned)"
    return [Step("finetune", b, s, epochs * e + extra - behind(j), f"fold {j}: {why}", j, epochs) for j in left]


def fold_epochs(steps: list[Step], fold: int, done: int) -> int:
    """The epochs of fine-tuned ``fold``, under way with ``done`` epochs trained, in ``steps``, the plan
    made after its last epoch (``State.finetune["running"]``): more when more fit with the margin,
    fewer when its count no longer fits even without it (its schedule is retargeted: the learning
    rate anneals by the new end), but at least one more: only the deadline stops a fold
    (``utils.fit.run.execute``)."""
    planned = next((s.epochs for s in steps if s.kind == "finetune" and s.fold == fold), 0)
    return max(planned, done + 1)


def members(facts: Facts, state: State, steps: list[Step]) -> list[tuple[str, int]]:
    """(backbone, size) of every run that will be complete: frozen runs and the fine-tuned one."""
    runs = list(state.frozen) + [(s.backbone, s.size) for s in steps if s.kind == "frozen"]
    ft = state.finetune
    if ft is not None and len(ft["done"]) == facts.n_folds:
        runs.append((ft["backbone"], ft["size"]))
    elif any(s.kind == "finetune" and s.fold == facts.n_folds - 1 for s in steps):
        step = next(s for s in steps if s.kind == "finetune")
        runs.append((step.backbone, step.size))
    return runs


def end_steps(facts: Facts, state: State, costs: Costs, runs: list[tuple[str, int]], room: float) -> list[Step]:
    """Ensemble (two members or more), a student where it pays and fits, export, infer."""
    steps = []
    if len(runs) >= 2 and "ensemble" not in state.done:
        steps.append(Step("ensemble", seconds=costs.ensemble(), why=f"{len(runs)} complete runs"))
    served, latency = runs, costs.latency_ms(runs)
    if "student" not in state.done and len(runs) >= 2 and latency > facts.budget_ms / 2:
        b, s = best_frozen(facts, state, [])
        seconds = costs.student(b, s, len(runs))
        if seconds + costs.export(len(runs) + 1) + costs.infer([(b, s)]) + costs.ensemble() <= room:
            steps.append(Step("student", b, s, seconds, f"the ensemble's ~{latency:.0f} ms per image is over half the "
                                                        f"{facts.budget_ms:g} ms budget"))
            served = [(b, s)]
    if "export" not in state.done:
        steps.append(Step("export", seconds=costs.export(len(runs) + (served is not runs)),
                          why=f"--budget-ms {facts.budget_ms:g}: of the candidates that fit, the fewest members "
                              f"within one standard error of the best"))
    if "infer" not in state.done:
        if costs.latency_ms(served) <= facts.budget_ms:  # every fold served: its saved test logits
            steps.append(Step("infer", seconds=LOGITS_S, why="submission.csv: the served "
                              "folds' saved test logits, blended as served"))
        else:
            steps.append(Step("infer", seconds=costs.infer(served), why="submission.csv: the served models on the "
                              "test images"))
    return steps


def plan(facts: Facts, state: State, costs: Costs, elapsed: float) -> list[Step]:
    """The stages left, in order, with their predicted seconds. Raises BudgetTooSmall when nothing
    has been trained and not even the first frozen stage and the last stages fit."""
    if "infer" in state.done:
        return []  # the run is complete (a re-run of it does nothing more)
    remaining = facts.budget_s - elapsed
    first = [(b, first_frozen_size(facts.native, facts.sizes[b])) for b in facts.backbones]
    guess = (list(state.frozen) or first[:1]) + first[:1]  # the frozen runs and a fine-tuned one
    reserve = sum(s.seconds for s in end_steps(facts, state, costs, guess, 0.0))
    floor = [] if "floor" in state.done else [Step("floor", seconds=LOGITS_S,
                                                   why="a submission from the frozen route's test logits, at once")]
    train_room = remaining - reserve - sum(s.seconds for s in floor)
    share = FROZEN_SHARE * (facts.budget_s - reserve)
    after_share = train_room - max(0.0, share - state.spent.get("frozen", 0.0))
    if state.finetune is None and choose_finetune(facts, costs, *best_frozen(facts, state, []), after_share) is None:
        share = facts.budget_s  # no fine-tuning fits: the frozen route's sweep takes the time
    share_left = max(0.0, share - state.spent.get("frozen", 0.0))
    if state.done & {"ensemble", "student", "export"}:  # training is over once the last stages began
        return end_steps(facts, state, costs, members(facts, state, []), remaining)
    ft = state.finetune
    if ft is not None and (len(ft["done"]) == facts.n_folds or not finetune_steps(facts, state, costs, train_room, [])):
        # fine-tuning is over (every fold done, or, as its epochs were timed, no more fit: a search that left
        # too little had left a 2-minute run 57 s unused): the sweep goes on in the time it left, with
        # SLACK's margin: a size not yet run overran its prediction by up to 1.8x, and a frozen run the
        # deadline stops is a weaker member of the blend it joins (96 px's heads stopped: OOF 0.8781, not 0.8972)
        room = train_room - (costs.export(1) - costs.export(0))  # export's seconds for one more run
        steps = frozen_steps(facts, state, costs, room / (1 + SLACK))
    elif ft is not None:  # fine-tuning under way: its folds take the time
        steps = []
    elif share == facts.budget_s:  # no fine-tuning fits: every step up the share allows
        steps = frozen_steps(facts, state, costs, min(share_left, train_room))
    else:  # a step up only to a size fine-tuning could then run at
        def usable(b: str, s: int, seconds: float) -> bool:
            choice = choose_finetune(facts, costs, b, s, train_room - seconds)
            return choice is not None and choice["size"] == s and choice["epochs"] >= EPOCHS_GOOD
        steps = frozen_steps(facts, state, costs, min(share_left, train_room), usable)
    if not state.frozen and not steps:
        need = min(costs.frozen(b, facts.sizes[b][0]) for b in facts.backbones) + reserve + elapsed
        raise BudgetTooSmall(f"a budget of {facts.budget_s:.0f} s is too small: even the frozen route at its "
                             f"smallest size, the export and the submission need ~{need:.0f} s on this machine "
                             f"(measured); give --budget {math.ceil(need * 1.1 / 60)}m or more")
    steps = (floor + steps) if state.frozen else (steps + floor)
    frozen = sum(s.seconds for s in steps if s.kind == "frozen")
    room = train_room - (max(frozen, share_left) if frozen else 0.0)  # the sweep may go on: keep its share
    steps += finetune_steps(facts, state, costs, room, steps)
    runs = members(facts, state, steps)
    return steps + end_steps(facts, state, costs, runs, remaining - sum(s.seconds for s in steps))

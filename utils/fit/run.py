"""fit.py's run: measure, plan (utils/fit/plan.py), run each stage through the kit's own library
(the fold trainer, the ensemble search, export and inference: what train.py, ensemble.py,
export.py and infer.py run), and re-plan as the actual seconds come in.

``execute`` is the loop, with the clock and the stages passed in (tests drive it with a fake clock
and fake stages); ``Stages`` runs the real ones. Each stage prints the command a user would type
for it. Before the work: the measurements and the plan table (stage, candidate, predicted seconds,
the rule behind it); whenever a stage ran more than ``SLACK`` off its prediction, or a result
changed a decision, the rest of the plan again; at the end every stage's predicted seconds beside
its actual ones. A training stage whose time runs into what the stages after it need stops after
its current epoch (its best epoch predicts); a fine-tuned fold is planned again after each epoch,
and its schedule takes the epochs that now fit.

Writes, in <out_dir>/fit/: state.json (what is done, after every stage: a re-run with the same
data and options goes on from there, and every finished fold, embedding and decode cache is
reused), plan.csv (the first plan) and report.csv (the end table).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from utils.config import CommonConfig, option, parse_config
from utils.data.schema import read_dataset
from utils.errors import ConfigError, DataError
from utils.fit.plan import (HEAD_EPOCHS, SLACK, BudgetTooSmall, Costs, Facts, State, Step, epoch_key, first_frozen_size,
                            fold_epochs, parse_budget, plan)
from utils.io import atomic_write_csv, atomic_write_json
from utils.run import RunDir
from utils.train.config import TrainConfig

END = ("ensemble", "student", "export", "infer")


@dataclass
class FitConfig(CommonConfig):
    out_dir: str = option("runs/fit", "run folder: every run, the ensemble, onnx/, and fit/ (state, plan, report)")
    budget: str = option("10m", "wall-clock time for everything, measuring included: 90s, 10m, 1.5h")
    model: list[str] = option(help="timm backbones (a,b): each gets the frozen route; the best is fine-tuned",
                              factory=lambda: ["efficientnet_b0"])
    pretrained: bool = option(False, "timm's weights from the Hugging Face hub (needs network)")
    pretrained_file: Optional[list[str]] = option(None, "local weights files, one per --model (train.py's "
                                                        "pretrained_file)")
    train_config: list[str] = option(help="config files for every training stage, e.g. a profile "
                                          "(configs/visual_taxonomy.yaml)", factory=list)
    n_folds: int = option(3, "K of the K-fold split (every run shares it)")
    budget_ms: float = option(500.0, "export's latency budget per image, measured here")
    output: str = option("submission.csv", "the submission to write")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    progress: bool = option(True, "progress bars")

    def __post_init__(self):
        if self.pretrained_file and len(self.pretrained_file) != len(self.model):
            raise ConfigError(f"key 'pretrained_file': one file per model ({len(self.model)}), got "
                              f"{len(self.pretrained_file)}")
        try:
            parse_budget(self.budget)
        except ValueError as err:
            raise ConfigError(f"key 'budget': {err}") from None


# ----------------------------------------------------------------------------- the loop

@dataclass(frozen=True)
class Budget:
    """What a running stage may ask of the loop: whether its time is up (``up()``: True once it runs
    into what the stages after it need), and the plan of what is left as it stands now (``plan()``,
    from the state as the stage has updated it: a fine-tuned fold asks after each epoch)."""
    up: Callable[[], bool]
    plan: Callable[[], list[Step]]


def deadline_reserve(steps: list[Step], costs: Costs) -> float:
    """Seconds the stages after a training stage need at least: the last stages, and one epoch of
    every fine-tuned fold still to come."""
    reserve = sum(s.seconds for s in steps if s.kind in END)
    return reserve + sum(costs.epoch(s.backbone, s.size) + costs.fold_extra(s.backbone, s.size)
                         for s in steps if s.kind == "finetune")


def plan_table(steps: list[Step], elapsed: float, budget: float) -> pd.DataFrame:
    rows = [{"stage": s.kind, "candidate": candidate(s), "predicted s": round(s.seconds, 1), "why": s.why}
            for s in steps]
    rows.append({"stage": "total", "candidate": f"{elapsed:.0f} s spent", "predicted s": round(
        elapsed + sum(s.seconds for s in steps), 1), "why": f"budget {budget:.0f} s"})
    return pd.DataFrame(rows)


def candidate(s: Step) -> str:
    parts = [f"{s.backbone} @ {s.size} px" if s.backbone else ""]
    if s.fold >= 0:
        parts.append(f"fold {s.fold}")
    if s.epochs:
        parts.append(f"{s.epochs} epochs")
    if s.rates:
        parts.append("rates x " + "/".join(f"{r:g}" for r in s.rates))
    return ", ".join(p for p in parts if p)


def show(title: str, table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_colwidth", 110, "display.max_rows", 100):
        print(f"\n{title}\n{table.to_string(index=False)}", flush=True)


def execute(facts: Facts, costs: Costs, stages, clock=time.perf_counter, state: State | None = None,
            save=lambda state: None, start: float | None = None) -> pd.DataFrame:
    """Run the plan to its end: each time, plan what is left (``plan``), let ``stages`` measure what
    the next stage needs (``stages.prepare(step)``: True when it measured, and the plan is made
    again), run it (``stages.run(step, state, budget)``, ``Budget``: whether its time is up, and the
    plan as it stands), record its actual seconds and calibrate the costs of its kind
    (the plan is shown again when they were more than ``SLACK`` off).
    ``start``: the clock's value when the run began (measuring counts). Returns the report table."""
    state = state or State()
    t0 = clock() if start is None else start
    report, expected, first = [], None, True
    while True:
        steps = plan(facts, state, costs, clock() - t0)
        if not steps:
            break
        if stages.prepare(steps[0]):
            continue
        keys = [s.key for s in steps]
        if keys != expected:
            why = "the plan" if first else "re-planned"
            show(f"{why} ({clock() - t0:.0f} s of {facts.budget_s:.0f} s spent)",
                 plan_table(steps, clock() - t0, facts.budget_s))
            if first:
                stages.first_plan(plan_table(steps, clock() - t0, facts.budget_s))
            first = False
        step = steps[0]
        deadline = t0 + facts.budget_s - deadline_reserve(steps[1:], costs)
        began = clock()
        budget = Budget(up=lambda: clock() > deadline, plan=lambda: plan(facts, state, costs, clock() - t0))
        result = stages.run(step, state, budget)
        actual = clock() - began
        state.spent[step.kind] = state.spent.get(step.kind, 0.0) + actual
        save(state)
        report.append({"stage": step.kind, "candidate": candidate(step), "predicted s": round(step.seconds, 1),
                       "actual s": round(actual, 1), "result": result})
        off = actual / step.seconds if step.seconds > 0 else 1.0
        expected = keys[1:]
        if step.kind != "floor":  # every stage teaches the costs of its kind
            costs.calibrate(calibrated_kind(step.kind), step.seconds, actual)
        if abs(off - 1) > SLACK and step.kind != "floor":  # (a floor of logits takes no time to speak of)
            expected = None  # re-planned
        if expected is None and len(steps) > 1:
            print(f"{step.kind} took {actual:.0f} s against {step.seconds:.0f} s predicted ({off:.2f}x): "
                  f"re-planning the rest", flush=True)
    total = clock() - t0
    report.append({"stage": "total", "candidate": "", "predicted s": None, "actual s": round(total, 1),
                   "result": f"budget {facts.budget_s:.0f} s ({total / facts.budget_s:.0%})"})
    return pd.DataFrame(report)


def calibrated_kind(kind: str) -> str:
    return "finetune" if kind == "search" else kind


# ----------------------------------------------------------------------------- the real stages

class Stages:
    """The stages run for real: each builds the config its script would parse from the command it
    prints, and calls the library function that script calls."""

    def __init__(self, cfg: FitConfig, data, measurer, native: int, costs: Costs):
        self.cfg, self.data, self.measurer, self.native, self.costs = cfg, data, measurer, native, costs
        self.run_dir = RunDir(cfg.out_dir)
        self.weights = dict(zip(cfg.model, cfg.pretrained_file or []))

    def first_plan(self, table: pd.DataFrame) -> None:
        atomic_write_csv(Path(self.cfg.out_dir) / "fit" / "plan.csv", table)

    # -- measuring
    def prepare(self, step: Step) -> bool:
        """Measure the step's (backbone, size) when only an extrapolation is known."""
        if not step.backbone or (step.backbone, step.size) in self.measurer.measured:
            return False
        from utils.fit.measure import CONSISTENT

        retimed = len(self.measurer.retimed)
        sp = self.measurer.measure(step.backbone, step.size)
        print(f"measured {step.backbone} @ {step.size} px: training {sp.train:.1f} img/s, forward "
              f"{sp.infer:.1f} img/s ({sp.dtype}), decoding {sp.decode:.0f} img/s", flush=True)
        for b, s, first, kept in self.measurer.retimed[retimed:]:
            changed = max(kept.train / first.train, kept.infer / first.infer) > 1 + SLACK
            print(f"{b} @ {s} px disagreed with it by more than {CONSISTENT:g}x per pixel: timed again, training "
                  f"{first.train:.1f} -> {kept.train:.1f} img/s, forward {first.infer:.1f} -> {kept.infer:.1f}"
                  + ("; the calibration learnt against the first timing is dropped" if changed else ""), flush=True)
            if changed:
                self.costs.calibration.clear()
        return True

    # -- commands
    def common(self, backbone: str) -> list[str]:
        cfg = self.cfg
        args = ["--model", backbone]
        if backbone in self.weights:
            args += ["--pretrained-file", self.weights[backbone]]
        elif cfg.pretrained:
            args += ["--pretrained"]
        for path in cfg.train_config:
            args += ["--config", path]
        return args + ["--data-dir", cfg.data_dir, "--out-dir", cfg.out_dir, "--seed", str(cfg.seed),
                       "--n-folds", str(cfg.n_folds), "--device", cfg.device, "--progress", str(cfg.progress).lower()]

    def interpolation(self, size: int) -> str:
        """cubic to upscale (the data's images are smaller than the input), area to shrink."""
        return "cubic" if size > self.native else "area"

    def frozen_args(self, backbone: str, size: int, name: str) -> list[str]:
        return self.common(backbone) + [
            "--frozen-backbone", "true", "--head", "mlp", "--head-hidden", "256", "--epochs", str(HEAD_EPOCHS),
            "--patience", "10", "--batch-size", "256", "--lr-head", "0.003", "--warmup-epochs", "1",
            "--img-size", str(size), "--interpolation", self.interpolation(size), "--name", name, "--fold", "all",
            "--resume"]

    def finetune_args(self, step: Step, rate: float, epochs: int, fold: int, planned: int,
                      stop_after: int = 0) -> list[str]:
        """train.py's arguments for a fine-tuned fold: ``epochs`` of it, in a run whose schedule was
        first planned for ``planned`` epochs (its warm-up, at most an eighth of that, stays when
        a re-plan gives a fold fewer: a resumed fold must keep its config)."""
        base = parse_config(TrainConfig, self.common(step.backbone), model_config=True)
        warmup = min(base.warmup_epochs, planned / 8)
        return self.common(step.backbone) + [
            "--img-size", str(step.size), "--interpolation", self.interpolation(step.size), "--epochs", str(epochs),
            "--lr-backbone", f"{base.lr_backbone * rate:.3g}", "--lr-head", f"{base.lr_head * rate:.3g}",
            "--warmup-epochs", f"{warmup:g}", "--patience", "0",
            "--name", finetune_name(step.backbone, step.size, rate),
            "--fold", str(fold), "--resume", "--stop-after", str(stop_after)]

    def train(self, args: list[str], report) -> dict:
        """train.py with ``args``; ``report``: after each epoch, the fold's epochs as they now stand
        (``utils.train.kfold.Report``; None: the epochs planned)."""
        from utils.train import kfold

        print(f"\n== python train.py {' '.join(args)}", flush=True)
        cfg = parse_config(TrainConfig, args, model_config=True)
        return kfold.train(cfg, self.data, report=report)

    @staticmethod
    def until(budget: Budget):
        """A training stage's report: no epoch after the one that ran into the later stages' time."""
        return lambda epoch, score: epoch + 1 if budget.up() else None

    def oof(self, run: str) -> float:
        return json.loads((self.run_dir.path / run / "oof_score.json").read_text())["oof_score"]

    # -- each kind of stage
    def run(self, step: Step, state: State, budget: Budget) -> str:
        return getattr(self, step.kind)(step, state, budget)

    def frozen(self, step: Step, state: State, budget: Budget) -> str:
        name = f"{step.backbone}_frozen{step.size}"
        self.train(self.frozen_args(step.backbone, step.size, name), self.until(budget))
        state.frozen[(step.backbone, step.size)] = score = self.oof(name)
        return f"{name}: OOF {score:.4f}"

    def floor(self, step: Step, state: State, budget: Budget) -> str:
        from utils.serve.infer import InferConfig, infer

        b, s = max(state.frozen, key=state.frozen.get)
        run = f"{b}_frozen{s}"
        print(f"\n== python infer.py --from-logits --models {run} --output {self.cfg.output}", flush=True)
        out = infer(InferConfig(data_dir=self.cfg.data_dir, out_dir=self.cfg.out_dir, from_logits=True, models=[run],
                                output=self.cfg.output, progress=False))
        state.done.add("floor")
        return f"{self.cfg.output} from {run}" + (f": held out {out['score']:.4f}" if out["score"] is not None else "")

    def search(self, step: Step, state: State, budget: Budget) -> str:
        """Successive halving's first rung: every rate trains fold 0's first epoch; the first rate
        (the kit's default, ``RATES[0]``) goes on unless another beats it by more than one standard
        error (``choose_rate``)."""
        val, first = {}, []  # rate -> (validation logits, targets, rows) of its epoch; first epochs' seconds
        for rate in step.rates:
            if rate in state.search:
                continue
            if state.search and budget.up():  # into the later stages' time: the best rate so far goes on
                break
            out = self.train(self.finetune_args(step, rate, step.epochs, 0, step.epochs, stop_after=1), None)[0]
            if "val_logits" in out:
                val[rate] = out["val_logits"], out["val_targets"], out["val_idx"]
            name = finetune_name(step.backbone, step.size, rate)
            history = pd.read_csv(self.run_dir.fold_dir(name, 0) / "history.csv")
            state.search[rate] = float(history["val_score"].iloc[0])
            first.append(float(history["seconds"].iloc[0]))
        if first:  # the fastest first epoch: each carries one-time costs (allocations, the loader's start)
            state.epoch_s[epoch_key(step.backbone, step.size)] = min(first)
        best, why = choose_rate(state.search, val, step.rates[0], self.run_dir.schema)
        state.finetune = {"backbone": step.backbone, "size": step.size, "rate": best, "epochs": step.epochs, "done": []}
        return "first epoch's val score by rate: " + ", ".join(
            f"x{r:g} {state.search[r]:.4f}" for r in step.rates if r in state.search) + f"; x{best:g} goes on ({why})"

    def time_epochs(self, state: State, step: Step, name: str, folds: list[int]) -> None:
        """The median training pass of every epoch of ``folds`` so far: the plan's epoch from now on
        (``Costs.timed``; on 2,000 photos at 64 px first epochs took 12.4-16.2 s, the later ones
        9.8-14.6: a fold's own first epochs alone would plan its later ones too slow)."""
        seconds = pd.concat([pd.read_csv(self.run_dir.fold_dir(name, j) / "history.csv")["seconds"] for j in folds])
        state.epoch_s[epoch_key(step.backbone, step.size)] = float(seconds.median())

    def finetune(self, step: Step, state: State, budget: Budget) -> str:
        """A fine-tuned fold, planned again after each epoch: its schedule takes the epochs the time
        left now allows (``fold_epochs``), until its time is up."""
        if state.finetune is None:  # fold 0 without a search: the base rates
            state.finetune = {"backbone": step.backbone, "size": step.size, "rate": step.rates[0],
                              "epochs": step.epochs, "done": []}
        ft = state.finetune
        name = finetune_name(ft["backbone"], ft["size"], ft["rate"])

        epochs = step.epochs

        def report(epoch: int, score: float) -> int:
            nonlocal epochs
            if budget.up():
                return epoch + 1
            if epoch + 1 < epochs:  # epochs left: planned again, as the run has timed its epochs so far
                ft["running"] = [step.fold, epoch + 1, epochs]
                self.time_epochs(state, step, name, ft["done"] + [step.fold])
                epochs = fold_epochs(budget.plan(), step.fold, epoch + 1)
            return epochs

        result = self.train(self.finetune_args(step, ft["rate"], step.epochs, step.fold, ft["epochs"]),
                            report)[step.fold]
        ft.pop("running", None)
        self.time_epochs(state, step, name, ft["done"] + [step.fold])
        ft["done"].append(step.fold)
        text = f"fold {step.fold}: {result.get('epochs_run', '?')} epochs, val {result['val_score']:.4f} (best epoch " \
               f"{result['best_epoch']})"
        if len(ft["done"]) == self.cfg.n_folds:
            ft["oof"] = self.oof(name)
            text += f"; OOF {ft['oof']:.4f}"
        return text

    def runs(self, state: State) -> list[str]:
        runs = [f"{b}_frozen{s}" for b, s in state.frozen]
        ft = state.finetune
        if ft is not None and len(ft["done"]) == self.cfg.n_folds:
            runs.append(finetune_name(ft["backbone"], ft["size"], ft["rate"]))
        return runs

    def ensemble(self, step: Step, state: State, budget: Budget) -> str:
        from utils.ensemble.ensemble import EnsembleConfig, ensemble

        runs = self.runs(state)
        print(f"\n== python ensemble.py --models {','.join(runs)} --sto-population 8 --sto-iterations 4", flush=True)
        ensemble(EnsembleConfig(data_dir=self.cfg.data_dir, out_dir=self.cfg.out_dir, seed=self.cfg.seed,
                                models=runs, sto_population=8, sto_iterations=4, progress=False))
        state.done.add("ensemble")
        ens = json.loads(self.run_dir.ensemble_path.read_text())
        return f"{ens.get('method')}: nested CV {ens.get('nested_cv_score', float('nan')):.4f}"

    def student(self, step: Step, state: State, budget: Budget) -> str:
        args = self.frozen_args(step.backbone, step.size, "student") + [
            "--teacher", str(self.run_dir.ensemble_path)]
        self.train(args, self.until(budget))
        state.done.add("student")
        return f"student: OOF {self.oof('student'):.4f}"

    def export(self, step: Step, state: State, budget: Budget) -> str:
        from utils.serve.export import ExportConfig, export

        student = ["student"] if "student" in state.done else []
        models = None if "ensemble" in state.done else self.runs(state) + student
        print(f"\n== python export.py --budget-ms {self.cfg.budget_ms:g} --latency-images 20 --parity-images 16"
              + (f" --models {','.join(models)}" if models else ""), flush=True)
        manifest = export(ExportConfig(data_dir=self.cfg.data_dir, out_dir=self.cfg.out_dir, seed=self.cfg.seed,
                                       models=models, budget_ms=self.cfg.budget_ms, latency_images=20,
                                       parity_images=16, progress=False))
        state.done.add("export")
        serve = manifest.serve or {}
        return f"serves {serve.get('name')}: {serve.get('tail')} {serve.get('p99_ms', float('nan')):.1f} ms"

    def infer(self, step: Step, state: State, budget: Budget) -> str:
        """The submission of the served configuration. When it serves every fold of its runs in
        fp32, their saved test logits are what its ONNX graphs compute (export checked parity): the
        submission is blended from them with the served weights and biases, without reading an
        image again; else infer.py predicts the test images with the served models."""
        from utils.blend import load_ensemble
        from utils.data.schema import read_category_attributes, read_test
        from utils.metric import solution_score
        from utils.serve.infer import InferConfig, infer, predict_from_logits
        from utils.serve.manifest import Manifest
        from utils.serve.submission import write_submission

        cfg, serve = self.cfg, Manifest.read(self.run_dir).serve or {}
        state.done.add("infer")
        if serve.get("folds") != "all" or serve.get("int8"):
            print(f"\n== python infer.py --output {cfg.output}", flush=True)
            out = infer(InferConfig(data_dir=cfg.data_dir, out_dir=cfg.out_dir, output=cfg.output, progress=False))
            score = out["score"]
        else:
            print(f"\n== the served {serve['name']}: its saved test logits, blended as served", flush=True)
            ens = {**load_ensemble(self.run_dir, serve["models"]), "weights": np.asarray(serve["weights"]),
                   "biases": np.asarray(serve["biases"], dtype=np.float32)}
            test = read_test(Path(cfg.data_dir) / "test.csv", self.run_dir.schema.categories)
            sub = predict_from_logits(self.run_dir, test, ens)
            write_submission(sub, test, self.run_dir.schema, cfg.output)
            score = solution_score(Path(cfg.data_dir), sub, read_category_attributes(
                Path(cfg.data_dir) / "category_attributes.parquet"))
        print(f"wrote {cfg.output}" + (f"; score against test_solution.csv: {score:.4f}" if score is not None else ""))
        return cfg.output + (f": held out {score:.4f}" if score is not None else "")


def choose_rate(scores: dict, val: dict, prior: float, schema) -> tuple[float, str]:
    """The rate that goes on after the search's first epoch: ``prior`` unless another rate's score
    beats it by more than one standard error of the difference (a paired bootstrap over the fold's
    validation images, ``paired_se``: one epoch of a short schedule is a noisy signal, and a hair's
    lead chose the lower rate over the default once, 0.8071 against 0.8055, for a held-out 0.8850
    where the default recipe scores 0.92). Without both rates' logits (a resumed search), the best
    score. Returns (rate, why)."""
    from utils.ensemble.search import BlendObjective, paired_se

    best = max(scores, key=scores.get)
    if prior not in scores or best == prior:
        return best, "the best"
    if prior not in val or best not in val or not np.array_equal(val[prior][2], val[best][2]):
        return best, "the best (no logits of the same rows to weigh its lead: a resumed search)"
    lead = scores[best] - scores[prior]
    obj = BlendObjective(np.stack([val[prior][0], val[best][0]]), val[prior][1], schema)
    se = paired_se(obj, obj.predictions(np.array([1.0, 0.0])), obj.predictions(np.array([0.0, 1.0])))
    if lead > se:
        return best, f"x{best:g} leads x{prior:g} by {lead:.4f}, over one standard error ({se:.4f})"
    return prior, f"the default: x{best:g} leads by {lead:.4f}, within one standard error ({se:.4f})"


def finetune_name(backbone: str, size: int, rate: float) -> str:
    return f"{backbone}_ft{size}_lr{rate:g}"


# ----------------------------------------------------------------------------- fit.py

def check_inputs(cfg: FitConfig, data) -> None:
    """Everything that can be refused before anything expensive: weights files, the training
    config files against the data (a profile naming categories the data lacks)."""
    for path in cfg.pretrained_file or []:
        if not Path(path).is_file():
            raise DataError(f"--pretrained-file {path}: no such file")
    for backbone in cfg.model:
        files = sum((["--config", path] for path in cfg.train_config), [])
        trainer = parse_config(TrainConfig, ["--model", backbone, *files], model_config=True)
        trainer.check_data(data)


def fit(cfg: FitConfig) -> dict:
    """What ``python fit.py`` does: check the inputs, measure, plan, run, report."""
    start = time.perf_counter()
    budget = parse_budget(cfg.budget)
    data = read_dataset(cfg.data_dir)
    check_inputs(cfg, data)

    import torch

    from utils.fit.measure import Measurer, native_size
    from utils.train.distributed import setup_distributed
    from utils.train.throughput import configure_device

    state_path, report_path = Path(cfg.out_dir) / "fit" / "state.json", Path(cfg.out_dir) / "fit" / "report.csv"
    what = {"data": str(Path(cfg.data_dir).resolve()), "model": cfg.model, "n_folds": cfg.n_folds, "seed": cfg.seed,
            "train_config": cfg.train_config, "weights": cfg.pretrained_file, "pretrained": cfg.pretrained}
    state, earlier = State(), pd.DataFrame()
    if state_path.is_file():
        saved = json.loads(state_path.read_text())
        if saved.get("what") == what:
            state = State.from_dict(saved["state"])
            earlier = pd.read_csv(report_path) if report_path.is_file() else earlier
            if "infer" in state.done:  # complete: nothing to measure or run; its report as it was
                show(f"{cfg.out_dir} holds a complete run of these options ({state_path}): nothing to do; "
                     f"its report", earlier)
                return {"report": earlier, "state": state, "facts": None, "seconds": time.perf_counter() - start}
            print(f"resuming from {state_path}: {', '.join(sorted(set(state.spent)))} done or begun; "
                  f"finished folds and caches are reused")
    d = setup_distributed(cfg.device)
    configure_device(d)
    run_dir = RunDir(cfg.out_dir)
    schema, _ = run_dir.prepare(data, cfg.n_folds, cfg.seed)
    native = native_size(data)
    measurer = Measurer(data, schema, d.device)
    sizes = {b: measurer.sizes(b) for b in cfg.model}
    heads = {b: measurer.head_rate(b) for b in cfg.model}
    for b in cfg.model:
        measurer.measure(b, first_frozen_size(native, sizes[b]))
    facts = Facts(n_train=len(data.train), n_test=len(data.test), native=native, budget_s=budget,
                  backbones=tuple(cfg.model), sizes=sizes, head_rows_per_s=heads, n_folds=cfg.n_folds,
                  budget_ms=cfg.budget_ms)
    show(f"measured on this machine ({torch.get_num_threads()} threads, {d.device}) in {measurer.seconds:.1f} s; "
         f"the data: {facts.n_train} train and {facts.n_test} test images, median shorter side {native} px",
         measurements(measurer, heads))
    save = lambda s: atomic_write_json(state_path, {"what": what, "state": s.to_dict()})
    try:
        facts = timed_again_before_refusing(facts, state, measurer, time.perf_counter() - start)
        costs = Costs(facts, measurer.speed, timed=state.epoch_s)  # the epochs the run times, as it times them
        report = execute(facts, costs, Stages(cfg, data, measurer, native, costs), state=state, save=save, start=start)
    except BudgetTooSmall as err:
        raise DataError(str(err)) from None
    if len(earlier):  # a resumed run: the earlier calls' stages stay in the report, above this call's
        earlier = earlier.replace({"stage": {"total": "total of an earlier call"}})
        report = pd.concat([earlier, report], ignore_index=True)
    atomic_write_csv(report_path, report)
    show("fit: predicted and actual seconds of every stage", report)
    return {"report": report, "state": state, "facts": facts, "seconds": time.perf_counter() - start}


def timed_again_before_refusing(facts: Facts, state: State, measurer, elapsed: float) -> Facts:
    """``facts`` when the first plan fits the budget; else, since refusing is final and a timing
    slowed by another process reads low (the heads once read 2,084 rows/s for 16,800, and frozen
    64 px was predicted at 137.5 s for the 21.9 it took), every speed and the heads' rate timed again
    (the faster of the two kept) and the facts that follow; BudgetTooSmall if the budget is still too
    small."""
    first_plan = lambda facts, elapsed: plan(facts, state, Costs(facts, measurer.speed, timed=state.epoch_s), elapsed)
    try:
        first_plan(facts, elapsed)
        return facts
    except BudgetTooSmall:
        print("the budget looks too small for this machine: timing it again before refusing", flush=True)
    before = measurer.seconds
    for backbone, size in list(measurer.measured):
        sp = measurer.retime(backbone, size)
        print(f"{backbone} @ {size} px: training {sp.train:.1f} img/s, forward {sp.infer:.1f} img/s (the faster "
              f"of two timings)", flush=True)
    heads = {b: max(rate, measurer.head_rate(b)) for b, rate in facts.head_rows_per_s.items()}
    for backbone, rate in heads.items():
        print(f"{backbone}: its heads {rate:,.0f} rows/s (the faster of two timings)", flush=True)
    facts = replace(facts, head_rows_per_s=heads)
    first_plan(facts, elapsed + measurer.seconds - before)  # still too small: BudgetTooSmall
    return facts


def measurements(measurer, heads: dict) -> pd.DataFrame:
    rows = [{"backbone": b, "size": s, "train img/s": round(sp.train, 1), "forward img/s": round(sp.infer, 1),
             "decode img/s": round(sp.decode), "dtype": sp.dtype, "heads rows/s": round(heads[b])}
            for (b, s), sp in sorted(measurer.measured.items())]
    return pd.DataFrame(rows)


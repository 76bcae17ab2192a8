"""The whole pipeline on the generated demo data, stage by stage: what ``make demo`` runs.

    python -m utils.demo                                  # data/demo -> runs/demo -> submission.csv

Each stage is the command a user would type (printed before it runs; run in this process, which
saves each stage's imports), timed when it ends:
  data       python -m utils.demo_data --out data/demo                    (when the data is missing)
  baseline   python -m utils.baseline                                    (majority class per head)
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
Ends with every stage's wall time, where the outputs are, the submission's score next to the
baseline's, and the served configuration's measured p99 latency.
"""
from __future__ import annotations

import json
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.baseline import solution_score
from utils.config import CommonConfig, option, run_command
from utils.schema import read_category_attributes, read_submission

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig(CommonConfig):
    output: str = option("submission.csv", "the submission to write")
    budget_ms: float = option(500.0, "export.py's latency budget (p99 per image, measured here)")


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
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    dirs, quiet = ["--data-dir", str(data), "--out-dir", str(out)], ["--progress", "false"]
    profile = ["--config", "configs/visual_taxonomy.yaml"]  # the demo data has the competition's categories
    stages, start = Stages(), time.perf_counter()
    if not (data / "train.csv").is_file():
        stages.run("data", "-m", "utils.demo_data", "--out", str(data))
    else:
        print(f"== data: {data} exists and is reused (delete it to draw it anew)", flush=True)
    baseline = out / "baseline_submission.csv"
    stages.run("baseline", "-m", "utils.baseline", "--data-dir", str(data), "--out", str(baseline))
    stages.run("teacher resnet10t (fine-tuned)", "train.py", "--model", "resnet10t", "--config", "configs/demo.yaml",
               *profile, *dirs, "--fold", "all", "--resume", *quiet)
    stages.run("teacher resnet18 (frozen)", "train.py", "--model", "resnet18", "--config", "configs/demo_frozen.yaml",
               *profile, "--name", "resnet18_frozen", *dirs, "--fold", "all", "--resume", *quiet)
    stages.run("ensemble", "ensemble.py", *dirs, "--models", "resnet10t,resnet18_frozen", "--sto-population", "8",
               "--sto-iterations", "4", *quiet)
    stages.run("student (distilled)", "train.py", "--model", "resnet18", "--config", "configs/demo_frozen.yaml",
               *profile, "--name", "student", "--teacher", str(out / "ensemble.json"), *dirs, "--fold", "all", "--resume", *quiet)
    stages.run("export", "export.py", *dirs, "--budget-ms", str(cfg.budget_ms), "--latency-images", "20",
               "--parity-images", "16", *quiet)
    stages.run("infer", "infer.py", *dirs, "--output", cfg.output, *quiet)
    return summary(cfg, stages, time.perf_counter() - start, baseline)


def summary(cfg: DemoConfig, stages: Stages, total: float, baseline: Path) -> dict:
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    attrs = read_category_attributes(data / "category_attributes.parquet")
    scores = {"baseline": solution_score(data, read_submission(baseline), attrs),
              "submission": solution_score(data, read_submission(ROOT / cfg.output), attrs)}
    serve = json.loads((out / "onnx" / "manifest.json").read_text())["serve"]
    table = pd.DataFrame(stages.times + [{"stage": "total", "seconds": round(total, 1)}])
    print("\n" + table.to_string(index=False))
    print(f"\nsubmission:   {cfg.output}  score {scores['submission']:.4f} on the demo test set "
          f"(majority baseline {scores['baseline']:.4f})")
    print(f"served:       {serve['name']}: p99 {serve['p99_ms']:.1f} ms per image here "
          f"(budget {serve['budget_ms']:.0f} ms; every candidate in {out}/onnx/budget.csv)")
    print(f"run folder:   {out}/  (per run <run>/fold<k>/: checkpoints, logits, history.png; ensemble.json; onnx/)")
    print(f"plots:        {out}/<run>/fold<k>/history.png, {out}/ensemble_heads.png")
    return {"stages": table, "scores": scores, "serve": serve}


if __name__ == "__main__":
    run_command(main, DemoConfig, __doc__)

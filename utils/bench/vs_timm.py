"""The kit's fine-tuning against timm's own train.py, side by side on the same photos (BENCHMARKS.md).

    python -m utils.bench.regime --variants baseline ...          # the kit's run, every fold
    python -m utils.bench.vs_timm --timm-train PATH/TO/timm/train.py --data-dir data/real \\
        --out-dir runs/regime --run baseline --pretrained-file efficientnet-lite0-57934424.pth
    bash runs/regime/timm/lr0.001/run_timm.sh                    # timm's train.py, each fold
    python -m utils.bench.vs_timm ...                             # the same command again: the table

timm's ``train.py`` (from timm's repository; not part of the kit, and not run by it) trains each fold
on the same photos as the kit's fold: the kit run's train rows that carry a label (an image folder of
symlinks, one class per (category, value)), validated on the fold's validation rows, from the same
weights (converted once by ``utils/train/weights.py`` into timm's layout and given as
``--pretrained-path``), at the kit run's image size, batch size and epochs, with the settings
``TIMM_ARGS`` states: what a careful user picks for a short fine-tune. The first call prepares the
folders and the weights and writes timm's commands to ``run_timm.sh``; once they have run, the call
scores: timm's best checkpoint predicts the held-out test photos, each row's argmax taken among its
own category's classes, scored with the kit's metric, as are the kit's folds (their saved test
logits). Prints one row per fold and system (validation and held-out score, training images per
second, from timm's log) and the folds averaged; writes ``<out-dir>/timm/lr<timm-lr>/vs_timm.csv``.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from utils.bench import machine
from utils.bench.regime import held_out_score
from utils.blend import combine_members, head_log_softmax, load_ensemble, load_test_logits
from utils.config import DataConfig, option, run_command
from utils.data.schema import CATEGORY, ID, image_path, read_dataset
from utils.data.transforms import Preprocess
from utils.io import atomic_write_csv, atomic_write_text
from utils.metric import score_logits
from utils.run import RunDir

# a short fine-tune from ImageNet weights, as a careful timm user sets it (besides size, batch, epochs)
TIMM_ARGS = ["--opt", "adamw", "--weight-decay", "0.01", "--sched", "cosine", "--sched-on-updates",
             "--warmup-epochs", "0", "--smoothing", "0.1", "--drop", "0.2", "--scale", "0.75", "1.0",
             "--hflip", "0.5", "--train-interpolation", "bicubic", "--interpolation", "bicubic", "--crop-pct", "1.0",
             "--workers", "2", "--no-prefetcher", "--device", "cpu", "--log-interval", "10", "--seed", "42",
             "--checkpoint-hist", "1"]


@dataclass
class VsTimmConfig(DataConfig):
    out_dir: str = option("runs/regime", "the run folder of the kit's run (its folds and logits)")
    run: str = option("baseline", "the kit's run to compare, trained on every fold")
    timm_train: str = option("", "timm's train.py (from timm's repository)")
    pretrained_file: str = option("", "the weights file both start from (converted for timm)")
    timm_lr: float = option(1e-3, "timm's --lr (one rate for the whole network, AdamW)")


def class_of(row) -> str:
    return f"{row[CATEGORY]}={row['attr_1']}"


def image_folder(root: Path, rows: pd.DataFrame, images: Path) -> None:
    """An ImageFolder of symlinks: one folder per (category, value) of ``rows`` that carry a label."""
    for _, row in rows[rows["attr_1"].notna()].iterrows():
        folder = root / class_of(row)
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{int(row[ID]):06d}.jpg"
        if not link.exists():
            link.symlink_to(image_path(images, row[ID]).resolve())


def fold_folder(folder: Path, table: pd.DataFrame, k: int, images: Path) -> None:
    """Fold ``k``'s image folders under ``folder``: ``train`` (the other folds' rows), ``validation``."""
    image_folder(folder / "train", table[table["fold"] != k], images)
    image_folder(folder / "validation", table[table["fold"] == k], images)


def ask_to_run(script: Path, lines: str, what: str) -> None:
    """Write ``lines`` to ``script`` and say that ``what`` has not run yet: timm's script is run by the
    user, not by the kit, and the command is called again afterwards."""
    atomic_write_text(script, "set -e\n" + lines)
    print(f"{what} has not run yet: run\n    bash {script}\nthen this command again", flush=True)


def timm_weights(cfg: VsTimmConfig, model: str, folder: Path) -> Path:
    from utils.train.model import create_backbone

    path = folder / "weights_timm.pth"
    if not path.is_file():
        torch.save(create_backbone(model, pretrained_file=cfg.pretrained_file, keep_head=True).state_dict(), path)
    return path


def timm_command(cfg: VsTimmConfig, kit: dict, folder: Path, weights: Path) -> str:
    """The shell line that trains one fold with timm's train.py, its log in ``<folder>/train.log``."""
    args = [sys.executable, cfg.timm_train, "--data-dir", str(folder), "--train-split", "train",
            "--val-split", "validation", "--model", kit["model"], "--pretrained", "--pretrained-path", str(weights),
            "--num-classes", str(len(list((folder / "train").iterdir()))), "--img-size", str(kit["img_size"]),
            "--batch-size", str(kit["batch_size"]), "--epochs", str(kit["epochs"]), "--lr", str(cfg.timm_lr),
            *TIMM_ARGS, "--output", str(folder / "out"), "--experiment", "run"]
    return " ".join(map(shlex.quote, args)) + f" > {shlex.quote(str(folder / 'train.log'))} 2>&1"


def timm_rate(folder: Path) -> float:
    """timm's training images per second: the mean over epochs of its own per-epoch average."""
    rates = {}  # epoch -> its running average at the epoch's last logged update
    for line in (folder / "train.log").read_text().splitlines():
        m = re.search(r"Train: (\d+) \[.*\((?:\s*[\d.]+)s,\s*([\d.]+)/s\)", line)
        if m:
            rates[int(m.group(1))] = float(m.group(2))
    return float(np.mean(list(rates.values())))


def timm_logits(folder: Path, kit: dict, ids: np.ndarray, images: Path, schema) -> np.ndarray:
    """The best checkpoint's class logits of the photos ``ids``, laid out as the kit's heads (each head
    of a category takes its classes' logits; one attribute per category here)."""
    import timm

    classes = sorted(p.name for p in (folder / "train").iterdir())
    model = timm.create_model(kit["model"], num_classes=len(classes))
    ckpt = torch.load(folder / "out" / "run" / "model_best.pth.tar", map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    prep = Preprocess(kit["img_size"], (0.5,) * 3, (0.5,) * 3, interpolation="cubic")  # as timm: bicubic, no crop
    with torch.no_grad():
        logits = np.concatenate([model(torch.stack([torch.from_numpy(prep(image_path(images, i)))
                                                    for i in ids[start:start + 256]])).numpy()
                                 for start in range(0, len(ids), 256)])
    out = np.full((len(ids), schema.n_logits), -1e4, dtype=np.float32)
    for head in schema.heads:
        for c, value in enumerate(head.vocab):
            out[:, head.offset + c] = logits[:, classes.index(f"{head.category}={value}")]
    return out


def main(cfg: VsTimmConfig) -> pd.DataFrame:
    print(machine())
    run_dir, data_dir = RunDir(cfg.out_dir), Path(cfg.data_dir)
    data, schema = read_dataset(data_dir), run_dir.schema
    table = run_dir.train_rows(data.train)
    kit = yaml.safe_load(run_dir.fold_file(cfg.run, 0, "config.yaml").read_text())
    root = run_dir.path / "timm" / f"lr{cfg.timm_lr:g}"
    root.mkdir(parents=True, exist_ok=True)
    weights = timm_weights(cfg, kit["model"], root.parent)
    test = data.test
    folders = [root / f"fold{k}" for k in range(run_dir.n_folds)]
    for k, folder in enumerate(folders):
        fold_folder(folder, table, k, data.train_images)
    if not all((f / "out" / "run" / "model_best.pth.tar").is_file() for f in folders):
        ask_to_run(root / "run_timm.sh", "".join(timm_command(cfg, kit, f, weights) + "\n" for f in folders),
                   "timm's train.py on every fold")
        return pd.DataFrame()
    rows, timm_folds, kit_folds = [], [], load_test_logits(run_dir, cfg.run, test[ID].to_numpy())
    for k, folder in enumerate(folders):
        rate = timm_rate(folder)
        timm_test = timm_logits(folder, kit, test[ID].to_numpy(), data.test_images, schema)
        timm_folds.append(timm_test)
        val = table[table["fold"] == k]
        timm_val, _ = score_logits(schema, schema.encode(val),
                                   timm_logits(folder, kit, val[ID].to_numpy(), data.train_images, schema))
        summary = pd.read_csv(folder / "out" / "run" / "summary.csv")
        history = pd.read_csv(run_dir.fold_file(cfg.run, k, "history.csv"))
        metrics = json.loads(run_dir.fold_file(cfg.run, k, "metrics.json").read_text())
        rows += [{"fold": k, "system": "kit train.py", "val_top1": None, "val_score": round(metrics["val_score"], 4),
                  "held_out": round(held_out_score(data_dir, test, kit_folds[k], schema), 4),
                  "train_img_per_s": round(history["images_per_s"].mean(), 1)},
                 {"fold": k, "system": f"timm train.py, lr {cfg.timm_lr:g}", "val_top1": round(summary["eval_top1"].max(), 2),
                  "val_score": round(timm_val, 4), "held_out": round(held_out_score(data_dir, test, timm_test, schema), 4),
                  "train_img_per_s": round(rate, 1)}]
    averaged = {"kit train.py": combine_members({cfg.run: kit_folds}, load_ensemble(run_dir, [cfg.run]), schema),
                f"timm train.py, lr {cfg.timm_lr:g}": np.mean([head_log_softmax(z, schema) for z in timm_folds], axis=0)}
    for system, logits in averaged.items():
        rows.append({"fold": "all (averaged)", "system": system, "val_top1": None, "val_score": None,
                     "held_out": round(held_out_score(data_dir, test, logits, schema), 4), "train_img_per_s": None})
    result = pd.DataFrame(rows)
    atomic_write_csv(root / "vs_timm.csv", result)
    print(f"\n{machine()}\ntimm's settings: --lr {cfg.timm_lr:g} {' '.join(TIMM_ARGS)}\n{result.to_string(index=False)}")
    return result


if __name__ == "__main__":
    run_command(main, VsTimmConfig, __doc__)

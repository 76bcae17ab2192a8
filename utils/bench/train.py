"""Training throughput: the data loader alone, and the full training step.

    python -m utils.bench.train --model efficientnet_b0 --img-size 224

Prints images/s for: the loader with full-size JPEG decoding and with draft-mode (reduced-scale)
decoding; the full step (loader + forward + backward + optimiser) in fp32 and with bf16 autocast.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import pandas as pd
import torch

from utils.bench import machine
from utils.config import DataConfig, option, run_command
from utils.data import EpochSampler, ImageDataset, make_loader
from utils.engine import amp_dtype, train_one_epoch
from utils.model import AttributeModel, HeadLoss, build_optimizer, data_config, warmup_cosine
from utils.schema import CATEGORY, Schema, read_dataset
from utils.trainer import TrainConfig, model_args, row_paths
from utils.transforms import Preprocess


@dataclass
class BenchTrainConfig(DataConfig):
    model: str = option("efficientnet_b0", "timm backbone")
    img_size: int = option(224, "input size in pixels")
    batch_size: int = option(32, "images per step")
    workers: int = option(2, "loader worker processes")
    images: int = option(512, "images per measurement")


def main(cfg: BenchTrainConfig) -> pd.DataFrame:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = read_dataset(cfg.data_dir)
    schema = Schema.fit(data.train, data.category_attrs)
    train = data.train.iloc[: cfg.images]
    recipe = TrainConfig(model=cfg.model, img_size=cfg.img_size)
    model = AttributeModel(loss=HeadLoss(schema), **model_args(recipe, schema)).to(device)
    mean, std = data_config(model.backbone)
    targets = schema.encode(train)
    rows = []

    def loader(draft: bool):
        prep = Preprocess(cfg.img_size, mean, std, draft=draft)
        tf = prep.transform(train=True, aug=recipe.aug, category_aug=recipe.category_aug, categories=schema.categories)
        ds = ImageDataset(row_paths(train, data.train_images), train[CATEGORY], targets, tf, prep, augment_seed=0)
        return make_loader(ds, cfg.batch_size, cfg.workers, EpochSampler(len(ds), 0), drop_last=True)

    for draft in (False, True):
        start, n = time.perf_counter(), 0
        for batch in loader(draft):
            n += len(batch["image"])
        rows.append({"measure": f"loader only, {'draft' if draft else 'full'} decode",
                     "images_per_s": n / (time.perf_counter() - start)})
    for amp in ("off", "bf16"):
        dtype = amp_dtype(amp, device)
        opt = build_optimizer(model, 1e-4, 1e-3, 0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(1000, 0))
        warm = list(itertools.islice(loader(True), 2))  # warm-up steps, not timed
        train_one_epoch(model, warm, opt, sched, device, amp_dtype=dtype, progress=False)
        stats = train_one_epoch(model, loader(True), opt, sched, device, amp_dtype=dtype, progress=False)
        rows.append({"measure": f"full step, draft decode, amp {amp}", "images_per_s": stats["images_per_s"]})
    table = pd.DataFrame(rows)
    print(f"\n{cfg.model} at {cfg.img_size}, batch {cfg.batch_size}, {cfg.workers} loader workers, "
          f"{len(train)} images per measure\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.1f}".format))
    return table


if __name__ == "__main__":
    run_command(main, BenchTrainConfig, __doc__)

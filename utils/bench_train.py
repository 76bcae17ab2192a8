"""Training throughput: the data loader alone, and the full training step.

    python -m utils.bench_train --data-dir data/demo --model efficientnet_b0 --img-size 224

Prints images/s for: the loader with full-size JPEG decoding and with draft-mode (reduced-scale)
decoding; the full step (loader + forward + backward + optimiser) in fp32 and with bf16 autocast.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

import pandas as pd
import torch

from train import TrainConfig, amp_dtype, data_config, model_args, row_paths
from utils.data import EpochSampler, ImageDataset, make_loader
from utils.engine import train_one_epoch
from utils.model import AttributeModel, HeadLoss, build_optimizer, warmup_cosine
from utils.schema import CATEGORY, Schema, read_dataset
from utils.transforms import build_transform


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="images per measurement")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = read_dataset(args.data_dir)
    schema = Schema.fit(data.train, data.category_attrs)
    train = data.train.iloc[: args.images]
    cfg = TrainConfig(model=args.model, img_size=args.img_size)
    model = AttributeModel(loss=HeadLoss(schema), **model_args(cfg, schema)).to(device)
    mean, std = data_config(model.backbone)
    tf = build_transform(args.img_size, mean, std, "squash", train=True, aug=cfg.aug,
                         category_aug=cfg.category_aug, categories=schema.categories)
    targets = schema.encode(train)
    rows = []

    def loader(draft: bool):
        ds = ImageDataset(row_paths(train, data.train_images), train[CATEGORY], targets, tf,
                          args.img_size, "squash", draft=draft, augment_seed=0)
        return make_loader(ds, args.batch_size, args.workers, EpochSampler(len(ds), 0), drop_last=True)

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
    print(f"\n{args.model} at {args.img_size}, batch {args.batch_size}, {args.workers} loader workers, "
          f"{len(train)} images per measure\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.1f}".format))
    return table


if __name__ == "__main__":
    main()

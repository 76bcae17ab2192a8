"""amp auto's measurement (utils/train/precision.py) against a longer one: does its quick timing
(3 interleaved steps of at most 16 images in each dtype) take the dtype that a longer timing at the
training batch finds faster?

    python -m utils.bench.precision                                   # resnet18, efficientnet_b0 at 64 and 128
    python -m utils.bench.precision --models tf_efficientnet_lite0 --sizes 64 --batch-size 32 --steps 8

For each model and size: the quick timing as amp auto makes it (ms a step, bf16 / fp32), the long
one (``--steps`` interleaved steps of ``--batch-size`` images, every one run), and whether both take the same
dtype; fine-tuning's step (forward and backward) and the frozen route's (the backbone's forward).
Random weights: the speed does not depend on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from utils.bench import machine
from utils.config import option, run_command
from utils.train.distributed import Dist
from utils.train.model import AttributeModel
from utils.train.precision import STEPS, measure_batch, time_steps
from utils.train.throughput import configure_device, use_channels_last


@dataclass
class BenchPrecisionConfig:
    models: list[str] = option(help="timm backbones (a,b,c)", factory=lambda: ["resnet18", "efficientnet_b0"])
    sizes: list[int] = option(help="input sizes in pixels (a,b,c)", factory=lambda: [64, 128])
    batch_size: int = option(32, "images per step of the long timing")
    steps: int = option(8, "interleaved steps per dtype of the long timing")
    device: str = option("cpu", "cpu or cuda")


def main(cfg: BenchPrecisionConfig) -> pd.DataFrame:
    device = torch.device(cfg.device)
    configure_device(Dist(device=device))  # threads and allocator as train.py sets them
    rows = []
    for name in cfg.models:
        model = AttributeModel(name, [4, 3], loss=None).to(device)
        cl = use_channels_last("auto", model.backbone)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        for size in cfg.sizes:
            for train in (True, False):
                quick = time_steps(model, size, measure_batch(cfg.batch_size, size, device), device, train, cl)
                long = time_steps(model, size, cfg.batch_size, device, train, cl, steps=cfg.steps, clear=float("inf"))
                rows.append({"model": name, "size": size, "step": "fine-tuning" if train else "embedding",
                             "quick fp32 ms": 1000 * quick["fp32"], "quick bf16 ms": 1000 * quick["bf16"],
                             "quick bf16/fp32": quick["bf16"] / quick["fp32"],
                             "long bf16/fp32": long["bf16"] / long["fp32"],
                             "amp auto takes": "bf16" if quick["bf16"] < quick["fp32"] else "fp32",
                             "long agrees": (quick["bf16"] < quick["fp32"]) == (long["bf16"] < long["fp32"])})
                print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format="{:.2f}".format), flush=True)
    table = pd.DataFrame(rows)
    print(f"\namp auto's timing ({STEPS} steps per dtype of utils.train.precision.measure_batch's images) against {cfg.steps} steps of "
          f"{cfg.batch_size}; {torch.get_num_threads()} threads\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.2f}".format))
    return table


if __name__ == "__main__":
    run_command(main, BenchPrecisionConfig, __doc__)

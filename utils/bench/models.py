"""What a backbone config needs: one training step at batch 1 (forward, head losses, backward,
AdamW) on this machine, with random weights (nothing is downloaded), each model in a fresh
process so that peak memories do not mix.

    python -m utils.bench.models                         # the five CLIP-scale and ImageNet configs
    python -m utils.bench.models --configs configs/resnet18.yaml --steps 5

Prints, per config: parameters, image size, seconds per step and images per second, and the
process's peak resident memory (weights, gradients, AdamW state and activations): a lower bound
for what a GPU must hold at batch 1 in fp32 (bf16 autocast halves the activations, not the rest).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from utils.bench import machine
from utils.config import option, run_command

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["vit_huge_patch14_clip_quickgelu_224.dfn5b", "convnext_xxlarge.clip_laion2b_soup",
           "vit_large_patch14_clip_224.openai", "vit_so400m_patch14_siglip_384.webli", "convnext_base.fb_in22k_ft_in1k"]


@dataclass
class BenchModelsConfig:
    configs: list[str] = option(help="config files, or model names with a configs/<name>.yaml (a,b,c)",
                                factory=lambda: list(CONFIGS))
    steps: int = option(3, "timed steps after one untimed warm-up step")
    one: str = option("", "internal: measure this one config in this process and print JSON")


def measure_one(config: str, steps: int) -> dict:
    import torch

    from utils.config import parse_config
    from utils.data.schema import Schema
    from utils.tools.demo_data import COUNTS, sample_labels
    from utils.train.config import TrainConfig
    from utils.train.fold import model_args
    from utils.train.model import AttributeModel, HeadLoss, build_optimizer

    flags = ["--config", config] if config.endswith(".yaml") else ["--model", config]
    cfg = parse_config(TrainConfig, [*flags, "--pretrained", "false"], model_config=True)
    rows = sample_labels(5000, __import__("numpy").random.default_rng(0))  # enough for every head
    schema = Schema.fit(rows, {c: list(a) for c, a in COUNTS.items()})
    model = AttributeModel(loss=HeadLoss(schema), **model_args(cfg, schema))
    opt = build_optimizer(model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay, cfg.layer_decay)
    x = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    t = torch.as_tensor(schema.encode(rows.iloc[:1]))

    def step():
        opt.zero_grad()
        model(x, t)["loss"].backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"config": Path(config).stem if config.endswith(".yaml") else config, "model": cfg.model,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "img_size": cfg.img_size,
            "head": cfg.head, "s_per_step": seconds, "img_per_s": 1 / seconds,
            "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(cfg: BenchModelsConfig) -> pd.DataFrame:
    if cfg.one:
        print(json.dumps(measure_one(cfg.one, cfg.steps)))
        return pd.DataFrame()
    rows = []
    for config in cfg.configs:
        proc = subprocess.run([sys.executable, "-m", "utils.bench.models", "--one", config, "--steps", str(cfg.steps)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            rows.append({"config": config, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(f"\none training step at batch 1, fp32, random weights; machine: {machine()}")
    print(table.to_string(index=False, float_format="{:.2f}".format))
    return table


if __name__ == "__main__":
    run_command(main, BenchModelsConfig, __doc__)

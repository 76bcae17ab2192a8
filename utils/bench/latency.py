"""End-to-end latency per image of the seed's backbones, alone and as the full ensemble.

    python -m utils.bench.latency                                  # 4 backbones x 5 folds at 224 px
    python -m utils.bench.latency --models resnet18 --folds 2 --size 128

End to end = JPEG read, decode, resize, normalise, every member, per-head blend, decode; single
stream with ``--threads`` threads, over ``--images`` demo test images (p50, p95, p99); and batch
throughput on 32 preprocessed images. Weights are random (latency does not depend on them). Each
backbone runs as torch eager fp32, ONNX Runtime fp32 and int8; the ensemble as separate sessions
(fp32 and int8) and as one merged fp32 graph.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from utils.bench import machine
from utils.blend import combine_members, expand_weights
from utils.config import DataConfig, option, run_command
from utils.data.schema import CATEGORY, ID, Schema, image_path, read_dataset
from utils.data.transforms import Preprocess
from utils.serve.graph import EnsembleGraph, LogitsOnly, export_onnx, quantize_int8
from utils.serve.members import onnx_runner, preprocess_batch, single_stream_ms
from utils.train.model import AttributeModel, data_config


@dataclass
class BenchLatencyConfig(DataConfig):
    models: list[str] = option(help="timm backbones (a,b,c)",
                               factory=lambda: ["resnet18", "densenet121", "efficientnet_b0", "legacy_xception"])
    folds: int = option(5, "folds per backbone in the ensemble rows")
    size: int = option(224, "input size in pixels")
    images: int = option(200, "single-stream images per measurement")
    threads: int = option(2, "intra-op threads (torch and ONNX Runtime)")
    progress: bool = option(True, "progress bars")


class Bench:
    """The images, the schema and the table rows shared by every measurement."""

    def __init__(self, cfg: BenchLatencyConfig):
        data = read_dataset(cfg.data_dir)
        self.cfg, self.schema = cfg, Schema.fit(data.train, data.category_attrs)
        self.paths = [image_path(data.test_images, i) for i in data.test[ID].to_numpy()[: cfg.images]]
        self.cats = data.test[CATEGORY].to_numpy()[: cfg.images]
        self.calib = [image_path(data.train_images, i) for i in data.train[ID].to_numpy()[:64]]
        self.tmp = Path(tempfile.mkdtemp(prefix="latency_"))
        self.rows = []

    def measure(self, name: str, runners: list, prep: Preprocess) -> None:
        """One table row: end-to-end single-stream percentiles, and batch-of-32 throughput."""
        ens = {"models": [f"m{i}" for i in range(len(runners))], "weights": np.ones(len(runners)),
               "biases": np.zeros(self.schema.n_logits, dtype=np.float32)}

        def one(item):
            path, cat = item
            scores = combine_members({f"m{i}": [r(prep(path)[None])] for i, r in enumerate(runners)}, ens, self.schema)
            return self.schema.decode(scores, [cat])

        items = list(zip(self.paths, self.cats))
        single_stream_ms(one, items[:5])  # warm-up
        times = single_stream_ms(one, tqdm(items, desc=name, leave=False, disable=not self.cfg.progress))
        x = preprocess_batch(self.paths[:32], prep)
        batch_ms = sum(single_stream_ms(lambda b: [r(b) for r in runners], [x]))
        p50, p95, p99 = np.percentile(times, [50, 95, 99])
        self.rows.append({"what": name, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "budget_ratio_p99": p99 / 500,
                          "batch32_img_per_s": len(x) / batch_ms * 1000})
        print(f"{name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")

    def backbone(self, name: str) -> tuple[AttributeModel, Preprocess, Path, Path]:
        """A randomly initialised model of ``name``, exported to ONNX fp32 and int8."""
        size = self.cfg.size
        model = AttributeModel(name, [h.width for h in self.schema.heads]).eval()
        prep = Preprocess(size, *data_config(model.backbone))
        meta = {"fingerprint": self.schema.fingerprint, "preprocess": prep.to_dict()}
        fp32, int8 = self.tmp / f"{name}.onnx", self.tmp / f"{name}.int8.onnx"
        export_onnx(LogitsOnly(model), fp32, size, meta)
        calib = preprocess_batch(self.calib, prep)
        quantize_int8(fp32, int8, [calib[i:i + 16] for i in range(0, len(calib), 16)])
        return model, prep, fp32, int8


def perturbed_folds(model: torch.nn.Module, k: int) -> list[torch.nn.Module]:
    """``k`` copies of a model, each slightly perturbed, so that no graph optimiser can merge
    identical subgraphs and flatter the merged ensemble's timing."""
    folds = []
    for f in range(k):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-4 * (f + 1))
        folds.append(m)
    return folds


def main(cfg: BenchLatencyConfig) -> pd.DataFrame:
    import onnxruntime as ort

    torch.set_num_threads(cfg.threads)
    bench, threads = Bench(cfg), cfg.threads
    built = {}
    for name in cfg.models:
        model, prep, fp32, int8 = built[name] = bench.backbone(name)
        with torch.inference_mode():
            bench.measure(f"{name} torch eager fp32", [lambda x, m=model: m.logits(torch.from_numpy(x)).numpy()], prep)
        bench.measure(f"{name} onnxruntime fp32", [onnx_runner(fp32, threads)], prep)
        bench.measure(f"{name} onnxruntime int8", [onnx_runner(int8, threads)], prep)
    # the ensemble preprocesses once, with the first backbone's mean/std (the cost is the same)
    prep, k, label = built[cfg.models[0]][1], cfg.folds, f"ensemble {len(built)} backbones x {cfg.folds} folds"
    for variant, idx in (("fp32", 2), ("int8", 3)):
        runners = [onnx_runner(b[idx], threads) for b in built.values() for _ in range(k)]
        bench.measure(f"{label}, onnxruntime {variant}", runners, prep)
    graph = EnsembleGraph([perturbed_folds(b[0], k) for b in built.values()],
                          expand_weights(np.ones(len(built)), bench.schema),
                          np.zeros(bench.schema.n_logits, dtype=np.float32), bench.schema)
    merged = bench.tmp / "ensemble.onnx"
    export_onnx(graph, merged, cfg.size, {"fingerprint": bench.schema.fingerprint, "preprocess": prep.to_dict()})
    bench.measure(f"{label}, onnxruntime fp32, one merged graph", [onnx_runner(merged, threads)], prep)
    table = pd.DataFrame(bench.rows)
    print(f"\nend-to-end latency per image at {cfg.size}px, single stream, {threads} threads, {len(bench.paths)} "
          f"images (JPEG read, decode, resize, normalise, all members, decode); batch: 32 preprocessed images\n"
          f"machine: {machine()}, onnxruntime {ort.__version__}")
    print(table.to_string(index=False, float_format="{:.2f}".format))
    return table


if __name__ == "__main__":
    run_command(main, BenchLatencyConfig, __doc__)

"""A merged graph traced again from the checkpoints, against one joined from the folds' ONNX files.

    python export.py --out-dir runs/X                 # the folds' ONNX files first
    python -m utils.bench.merged --out-dir runs/X     # every run alone, and all of them blended

For each candidate (each run of ``onnx/manifest.json`` alone, then all of them with equal weights):
the seconds to build its merged graph both ways (tracing: the checkpoints loaded and every fold
traced again as one module, as export.py did; joining: ``utils.serve.graph.export_graph``), the
median single-image latency of each graph (ONNX Runtime, ``--threads``, the two interleaved over
``--images`` random inputs, after a warm-up), the file sizes, and the largest difference between
their outputs.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.bench import machine
from utils.blend import expand_weights
from utils.config import CommonConfig, option, run_command
from utils.data.transforms import Preprocess
from utils.run import RunDir
from utils.serve.graph import EnsembleGraph, export_graph, export_onnx, make_session, metadata
from utils.serve.members import fold_files
from utils.train.model import load_checkpoint


@dataclass
class BenchMergedConfig(CommonConfig):
    images: int = option(60, "single-image timings of each graph (interleaved)")
    threads: int = option(2, "ONNX Runtime intra-op threads")


def main(cfg: BenchMergedConfig) -> pd.DataFrame:
    rd = RunDir(cfg.out_dir)
    schema, manifest = rd.schema, json.loads(rd.manifest_path.read_text())
    entries = {e["run"]: e for e in manifest["members"]}
    runs = list(entries)
    prep = Preprocess.from_dict(entries[runs[0]]["preprocess"])
    candidates = [[r] for r in runs] + ([runs] if len(runs) > 1 else [])
    x = np.random.default_rng(cfg.seed).normal(size=(1, 3, prep.img_size, prep.img_size)).astype(np.float32)
    tmp, rows = Path(tempfile.mkdtemp(prefix="merged_")), []
    for models in candidates:
        if len({json.dumps(entries[r]["preprocess"], sort_keys=True) for r in models}) > 1:
            continue  # one graph has one preprocessing
        weights, bias = np.ones(len(models)) / len(models), np.zeros(schema.n_logits, np.float32)
        start = time.perf_counter()
        folds = [[load_checkpoint(rd.fold_file(r, f["fold"], "best.pt"), schema)[0] for f in entries[r]["folds"]]
                 for r in models]
        export_onnx(EnsembleGraph(folds, expand_weights(weights, schema), bias, schema), tmp / "traced.onnx",
                    prep.img_size, metadata(schema, "ensemble", prep))
        traced_s, start = time.perf_counter() - start, time.perf_counter()
        export_graph(fold_files(rd.onnx_dir, entries, models), weights, bias, schema, prep, tmp / "joined.onnx")
        joined_s = time.perf_counter() - start
        sessions = {k: make_session(tmp / f"{k}.onnx", cfg.threads) for k in ("traced", "joined")}
        out = {k: s.run(None, {"image": x})[0] for k, s in sessions.items()}
        times = {k: [] for k in sessions}
        for i in range(cfg.images + 5):  # the first five: a warm-up
            for k, s in sessions.items():
                begin = time.perf_counter()
                s.run(None, {"image": x})
                if i >= 5:
                    times[k].append((time.perf_counter() - begin) * 1000)
        rows.append({"candidate": "+".join(models), "folds": sum(len(entries[r]["folds"]) for r in models),
                     "traced s": round(traced_s, 2), "joined s": round(joined_s, 2),
                     "traced ms": round(float(np.median(times["traced"])), 2),
                     "joined ms": round(float(np.median(times["joined"])), 2),
                     "traced MB": round((tmp / "traced.onnx").stat().st_size / 2**20, 1),
                     "joined MB": round((tmp / "joined.onnx").stat().st_size / 2**20, 1),
                     "max |diff|": float(np.abs(out["traced"] - out["joined"]).max())})
    shutil.rmtree(tmp, ignore_errors=True)
    table = pd.DataFrame(rows)
    print(f"\nmerged graphs of {cfg.out_dir}: built by tracing the checkpoints again, or joined from the folds' "
          f"ONNX files; median of {cfg.images} single-image runs each, {cfg.threads} threads\nmachine: {machine()}")
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    run_command(main, BenchMergedConfig, __doc__)

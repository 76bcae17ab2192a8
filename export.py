"""Export the ensemble's fold checkpoints to ONNX, check parity, quantise, and time the options.

    python export.py                         # runs of ensemble.json (or every run) -> <out-dir>/onnx/
    python export.py --int8 true             # also int8 static quantisation (QDQ), with its OOF score change
    python export.py --benchmark true        # end-to-end latency table (needs no trained run)

Every fold's ``best.pt`` becomes ``onnx/<run>_fold<k>.onnx`` (dynamic batch, schema and
preprocessing embedded as metadata). Each export is checked against PyTorch on real images of its
fold's validation rows: maximum absolute logit difference (must be <= 1e-3) and identical decoding.
When all members share one preprocessing, the whole ensemble (folds, weights, biases) is also
exported as one graph, ``onnx/ensemble.onnx``; both ways are timed single-stream and the faster
one is recorded in ``onnx/manifest.json`` (``use``), which infer.py follows.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from utils.blend import combine_members, expand_weights, load_ensemble
from utils.config import CommonConfig, parse_config
from utils.io import atomic_write_json
from utils.metric import score_logits
from utils.model import load_checkpoint
from utils.onnx_utils import EnsembleGraph, LogitsOnly, export_onnx, make_session, quantize_int8
from utils.schema import CATEGORY, ID, Schema, image_path, read_dataset
from utils.transforms import build_transform, load_image


@dataclass
class ExportConfig(CommonConfig):
    models: Optional[str] = None  # comma-separated runs; default: ensemble.json's, else every run
    int8: bool = False  # also export int8-quantised models and report their OOF score change
    calib_images: int = 200  # train images for int8 calibration
    parity_images: int = 32
    merge: bool = True  # also try the whole ensemble as one graph, keep the faster
    threads: int = 2  # ONNX Runtime intra-op threads for timing and parity
    timing_images: int = 50  # single-stream images for the merged-vs-separate timing
    benchmark: bool = False
    bench_models: str = "resnet18,densenet121,efficientnet_b0,legacy_xception"
    bench_folds: int = 5
    bench_size: int = 224
    bench_images: int = 200
    progress: bool = True


def preprocess(paths, img_size: int, resize: str, mean, std) -> np.ndarray:
    tf = build_transform(img_size, mean, std, resize)
    return np.stack([tf(load_image(p, img_size, resize)) for p in paths]).astype(np.float32)


def max_diff_and_decoding(a: np.ndarray, b: np.ndarray, schema: Schema) -> tuple[float, bool]:
    same = all((a[:, h.logits].argmax(1) == b[:, h.logits].argmax(1)).all() for h in schema.heads)
    return float(np.abs(a - b).max()), same


def single_stream_ms(run, inputs: list[np.ndarray]) -> list[float]:
    times = []
    for x in inputs:
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1000)
    return times


def export_run(cfg: ExportConfig, run: str, paths: list[Path], schema: Schema, data, train: pd.DataFrame,
               onnx_dir: Path) -> dict:
    """Export, check and (optionally) quantise every fold of one run."""
    entry = {"run": run, "folds": []}
    oof = {"fp32": [], "int8": [], "targets": []}
    for k, path in enumerate(paths):
        model, meta = load_checkpoint(path, schema)
        size, resize, mean, std = meta["img_size"], meta["resize"], meta["mean"], meta["std"]
        entry.update(img_size=size, resize=resize, mean=mean, std=std, model=meta["model"])
        metadata = {"fingerprint": schema.fingerprint, "schema": schema.to_dict(), "run": run, "fold": k,
                    "model": meta["model"], "img_size": size, "resize": resize, "mean": mean, "std": std}
        target = onnx_dir / f"{run}_fold{k}.onnx"
        export_onnx(LogitsOnly(model), target, size, metadata)
        val = train[train["fold"] == k]
        paths_val = [image_path(data.train_images, i) for i in val[ID]]
        x = preprocess(paths_val[: cfg.parity_images], size, resize, mean, std)
        with torch.no_grad():
            expected = model.logits(torch.from_numpy(x)).numpy()
        session = make_session(target, cfg.threads, schema)
        diff, same = max_diff_and_decoding(expected, session.run(None, {"image": x})[0], schema)
        if diff > 1e-3 or not same:
            raise RuntimeError(f"{target}: ONNX differs from PyTorch (max |diff| {diff:.2e}, same decoding {same})")
        fold = {"fold": k, "path": target.name, "parity_max_abs_diff": diff, "parity_same_decoding": same}
        if cfg.int8:
            calib_ids = train[train["fold"] != k][ID].to_numpy()[: cfg.calib_images]
            calib = preprocess([image_path(data.train_images, i) for i in calib_ids], size, resize, mean, std)
            int8_path = onnx_dir / f"{run}_fold{k}.int8.onnx"
            quantize_int8(target, int8_path, [calib[i:i + 16] for i in range(0, len(calib), 16)])
            fold["int8_path"] = int8_path.name
            # OOF score change from quantisation, on every validation row of the fold
            int8_session = make_session(int8_path, cfg.threads, schema)
            fp32_logits, int8_logits = [], []
            for i in range(0, len(paths_val), 64):
                xb = preprocess(paths_val[i:i + 64], size, resize, mean, std)
                fp32_logits.append(session.run(None, {"image": xb})[0])
                int8_logits.append(int8_session.run(None, {"image": xb})[0])
            oof["fp32"].append(np.concatenate(fp32_logits))
            oof["int8"].append(np.concatenate(int8_logits))
            oof["targets"].append(schema.encode(val))
        entry["folds"].append(fold)
        print(f"{target.name}: parity max |diff| {diff:.2e}, same decoding {same}")
    if cfg.int8:
        targets = np.concatenate(oof["targets"])
        fp32_score, _ = score_logits(schema, targets, np.concatenate(oof["fp32"]))
        int8_score, _ = score_logits(schema, targets, np.concatenate(oof["int8"]))
        entry.update(oof_fp32=fp32_score, oof_int8=int8_score)
        print(f"{run}: OOF score fp32 {fp32_score:.4f}, int8 {int8_score:.4f} ({int8_score - fp32_score:+.4f})")
    return entry


def main(cfg: ExportConfig) -> dict:
    if cfg.benchmark:
        return {"benchmark": benchmark(cfg)}
    out_dir = Path(cfg.out_dir)
    onnx_dir = out_dir / "onnx"
    schema = Schema.load(out_dir / "schema.json")
    data = read_dataset(cfg.data_dir)
    folds = pd.read_csv(out_dir / "folds.csv")
    train = data.train.merge(folds, on=ID)
    ens = load_ensemble(out_dir, schema, cfg.models.split(",") if cfg.models else None)
    entries = [export_run(cfg, run, ens["folds"][run], schema, data, train, onnx_dir) for run in ens["models"]]
    manifest = {"models": ens["models"], "schema": schema.fingerprint, "members": entries, "use": "separate",
                "config": dataclasses.asdict(cfg)}

    preps = {(e["img_size"], e["resize"], tuple(e["mean"]), tuple(e["std"])) for e in entries}
    if cfg.merge and len(preps) == 1:
        size, resize, mean, std = preps.pop()
        fold_models = [[load_checkpoint(p, schema)[0] for p in ens["folds"][run]] for run in ens["models"]]
        graph = EnsembleGraph(fold_models, expand_weights(ens["weights"], schema), ens["biases"], schema)
        merged_path = onnx_dir / "ensemble.onnx"
        export_onnx(graph, merged_path, size, {"fingerprint": schema.fingerprint, "schema": schema.to_dict(),
                                               "run": "ensemble", "img_size": size, "resize": resize,
                                               "mean": list(mean), "std": list(std)})
        ids = data.test[ID].to_numpy()[: cfg.timing_images]
        images = [preprocess([image_path(data.test_images, i)], size, resize, mean, std) for i in ids]
        merged = make_session(merged_path, cfg.threads, schema)
        sessions = {e["run"]: [make_session(onnx_dir / f["path"], cfg.threads, schema) for f in e["folds"]]
                    for e in entries}
        separate = lambda x: combine_members({r: [s.run(None, {"image": x})[0] for s in ss]
                                              for r, ss in sessions.items()}, ens, schema)
        diff, same = max_diff_and_decoding(separate(images[0]), merged.run(None, {"image": images[0]})[0], schema)
        t_sep = statistics.median(single_stream_ms(separate, images))
        t_merged = statistics.median(single_stream_ms(lambda x: merged.run(None, {"image": x}), images))
        manifest["merged"] = {"path": merged_path.name, "img_size": size, "resize": resize, "mean": list(mean),
                              "std": list(std), "parity_max_abs_diff": diff, "parity_same_decoding": same}
        manifest["timing_ms_per_image"] = {"separate_sessions": t_sep, "merged_graph": t_merged,
                                           "threads": cfg.threads, "images": len(images)}
        manifest["use"] = "merged" if t_merged < t_sep and same else "separate"
        print(f"one image, {cfg.threads} threads, median: separate sessions {t_sep:.1f} ms, merged graph "
              f"{t_merged:.1f} ms (max |diff| {diff:.1e}); infer.py uses: {manifest['use']}")
    atomic_write_json(onnx_dir / "manifest.json", manifest)
    rows = [{"run": e["run"], "fold": f["fold"], "max_abs_diff": f["parity_max_abs_diff"],
             "same_decoding": f["parity_same_decoding"], **({"int8": f["int8_path"]} if "int8_path" in f else {})}
            for e in entries for f in e["folds"]]
    print("\n" + pd.DataFrame(rows).to_string(index=False) + f"\nwrote {onnx_dir / 'manifest.json'}")
    return manifest


# ----------------------------------------------------------------------------- latency benchmark

def benchmark(cfg: ExportConfig) -> pd.DataFrame:
    """End-to-end latency per image (JPEG read, decode, resize, normalise, every member, decode),
    single-stream with ``threads`` threads; and batch throughput. Randomly initialised weights:
    latency does not depend on their values."""
    import tempfile

    import onnxruntime as ort

    from utils.bench_train import machine
    from utils.model import AttributeModel

    data = read_dataset(cfg.data_dir)
    schema = Schema.fit(data.train, data.category_attrs)
    torch.set_num_threads(cfg.threads)
    size = cfg.bench_size
    paths = [image_path(data.test_images, i) for i in data.test[ID].to_numpy()[: cfg.bench_images]]
    cats = data.test[CATEGORY].to_numpy()[: cfg.bench_images]
    calib_paths = [image_path(data.train_images, i) for i in data.train[ID].to_numpy()[:64]]
    tmp = Path(tempfile.mkdtemp(prefix="latency_"))
    rows = []

    def measure(name: str, runners: list, mean, std, batch_runners=None):
        tf = build_transform(size, mean, std, "squash")
        ens = {"models": [f"m{i}" for i in range(len(runners))], "weights": np.ones(len(runners)),
               "biases": np.zeros(schema.n_logits, dtype=np.float32)}

        def one(path, cat):
            x = tf(load_image(path, size, "squash"))[None]
            scores = combine_members({f"m{i}": [r(x)] for i, r in enumerate(runners)}, ens, schema)
            return schema.decode(scores, [cat])

        for p, c in zip(paths[:5], cats[:5]):  # warm-up
            one(p, c)
        times = []
        for p, c in tqdm(list(zip(paths, cats)), desc=name, leave=False, disable=not cfg.progress):
            start = time.perf_counter()
            one(p, c)
            times.append((time.perf_counter() - start) * 1000)
        x = np.stack([tf(load_image(p, size, "squash")) for p in paths[:32]])
        start = time.perf_counter()
        for r in batch_runners or runners:
            r(x)
        batch_ips = len(x) / (time.perf_counter() - start)
        p50, p95, p99 = np.percentile(times, [50, 95, 99])
        rows.append({"what": name, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "budget_ratio_p99": p99 / 500,
                     "batch32_img_per_s": batch_ips})
        print(f"{name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")

    def onnx_runner(path):
        s = make_session(path, cfg.threads)
        return lambda x: s.run(None, {"image": x})[0]

    exported, models = {}, {}
    for name in cfg.bench_models.split(","):
        model = AttributeModel(name, [h.width for h in schema.heads]).eval()
        from timm.data import resolve_data_config
        dc = resolve_data_config({}, model=model.backbone)
        mean, std = dc["mean"], dc["std"]
        meta = {"fingerprint": schema.fingerprint, "img_size": size}
        fp32 = tmp / f"{name}.onnx"
        export_onnx(LogitsOnly(model), fp32, size, meta)
        int8 = tmp / f"{name}.int8.onnx"
        calib = preprocess(calib_paths, size, "squash", mean, std)
        quantize_int8(fp32, int8, [calib[i:i + 16] for i in range(0, len(calib), 16)])
        exported[name] = (fp32, int8, mean, std)
        models[name] = model
        with torch.inference_mode():
            measure(f"{name} torch eager fp32", [lambda x, m=model: m.logits(torch.from_numpy(x)).numpy()], mean, std)
        measure(f"{name} onnxruntime fp32", [onnx_runner(fp32)], mean, std)
        measure(f"{name} onnxruntime int8", [onnx_runner(int8)], mean, std)
    k = cfg.bench_folds
    # mean/std differ per backbone; the ensemble preprocesses once with the first backbone's (the cost is the same)
    mean, std = exported[cfg.bench_models.split(",")[0]][2:]
    for variant, idx in (("fp32", 0), ("int8", 1)):
        runners = [onnx_runner(exported[n][idx]) for n in cfg.bench_models.split(",") for _ in range(k)]
        measure(f"ensemble {len(exported)} backbones x {k} folds, onnxruntime {variant}", runners, mean, std)
    # the same ensemble as one ONNX graph; every fold a perturbed copy, so that no optimiser can
    # merge identical subgraphs and flatter the timing
    import copy
    fold_models = []
    for name in cfg.bench_models.split(","):
        folds = []
        for f in range(k):
            m = copy.deepcopy(models[name])
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 1e-4 * (f + 1))
            folds.append(m)
        fold_models.append(folds)
    graph = EnsembleGraph(fold_models, expand_weights(np.ones(len(fold_models)), schema),
                          np.zeros(schema.n_logits, dtype=np.float32), schema)
    merged_path = tmp / "ensemble.onnx"
    export_onnx(graph, merged_path, size, {"fingerprint": schema.fingerprint, "img_size": size})
    merged = onnx_runner(merged_path)
    measure(f"ensemble {len(exported)} backbones x {k} folds, onnxruntime fp32, one merged graph",
            [merged], mean, std)
    table = pd.DataFrame(rows)
    print(f"\nend-to-end latency per image at {size}px, single stream, {cfg.threads} threads, {len(paths)} images "
          f"(JPEG read, decode, resize, normalise, all members, decode); batch: 32 preprocessed images\n"
          f"machine: {machine()}, onnxruntime {ort.__version__}")
    print(table.to_string(index=False, float_format="{:.2f}".format))
    return table


if __name__ == "__main__":
    main(parse_config(ExportConfig, description=__doc__))

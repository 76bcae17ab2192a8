"""Export (``python export.py``): every fold's checkpoint to ONNX, checked against PyTorch; with
``int8``, quantised and scored on its fold's OOF rows; the whole ensemble as one merged graph when
its members allow; under a latency budget, the configuration to serve (utils/serve/budget.py); all
of it recorded in the manifest (utils/serve/manifest.py), which infer.py follows.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from utils.blend import combine_members, ensemble_digest, load_ensemble
from utils.config import CommonConfig, option
from utils.data.schema import ID, Schema, image_path, read_dataset
from utils.data.transforms import Preprocess
from utils.errors import DataError
from utils.metric import score_logits
from utils.run import RunDir
from utils.serve.budget import choose_serving, mergeable
from utils.serve.graph import LogitsOnly, export_graph, export_onnx, metadata, quantize_int8
from utils.serve.manifest import Manifest
from utils.serve.members import (MERGED_PARITY, fold_files, fold_members, merged_parity, mirrored, onnx_runner, parity,
                                 placeholder_batch, report_skipped, run_members, single_stream_ms, usable_batch)
from utils.train.model import checkpoint_preprocess, load_checkpoint, trained_with_tta


@dataclass
class ExportConfig(CommonConfig):
    models: Optional[list[str]] = option(None, "runs to export (a,b,c); default: ensemble.json's, else every run")
    int8: bool = option(False, "also export int8-quantised models and report their OOF score change")
    budget_ms: Optional[float] = option(None, "choose what to serve: the best-scoring configuration whose p99 "
                                              "latency per image, measured here, fits this budget (utils/serve/budget.py); "
                                              "with --int8, int8 members are candidates too")
    int8_max_drop: float = option(0.002, "budget: a member may be served in int8 only if its OOF score drops less")
    latency_images: int = option(100, "budget: test images timed end to end per configuration")
    calib_images: int = option(200, "train images for int8 calibration")
    parity_images: int = option(32, "validation images of each fold for the ONNX-vs-PyTorch check")
    merge: bool = option(True, "also try the whole ensemble as one graph; keep the faster")
    threads: int = option(2, "ONNX Runtime intra-op threads for timing and parity")
    timing_images: int = option(50, "test images for the single-stream merged-vs-separate timing (under "
                                    "--budget-ms, the budget's own timing decides)")
    progress: bool = option(True, "progress bars")


def export_fold(run: str, k: int, path: Path, schema: Schema, train: pd.DataFrame, images: Path, onnx_dir: Path, *,
                threads: int, parity_images: int, int8: bool, calib_images: int) -> tuple[dict, dict]:
    """One fold to ONNX, checked against PyTorch on ``parity_images`` of its validation rows (``train``
    with folds; ``images``: their folder); with ``int8``, also quantised (calibrated on
    ``calib_images`` of its training rows), with the fp32 and int8 logits of every validation row.
    Returns (the manifest entry of the fold, its OOF logits)."""
    model, ckpt = load_checkpoint(path, schema)
    prep = checkpoint_preprocess(ckpt)
    target = onnx_dir / f"{run}_fold{k}.onnx"
    export_onnx(LogitsOnly(model), target, prep.img_size, metadata(schema, run, prep, fold=k, model=ckpt["model"]))
    val = train[train["fold"] == k]
    val_paths = [image_path(images, i) for i in val[ID]]
    x, skipped = usable_batch(val_paths, prep, parity_images)
    report_skipped(skipped, f"{run} fold {k}: parity")
    if not len(x):
        raise DataError(f"run {run} fold {k}: none of its validation images can be read for the parity check")
    with torch.no_grad():
        expected = model.logits(torch.from_numpy(x)).numpy()
    fp32 = onnx_runner(target, threads, schema)
    diff, same = parity(expected, fp32(x), schema)
    if diff > 1e-3 or not same:
        raise RuntimeError(f"{target}: ONNX differs from PyTorch (max |diff| {diff:.2e}, same decoding {same})")
    print(f"{target.name}: parity max |diff| {diff:.2e}, same decoding {same}")
    hflip = trained_with_tta(ckpt)  # its OOF logits average the mirror: so do its int8 OOF and serving
    entry = {"fold": k, "path": target.name, "parity_max_abs_diff": diff, "parity_same_decoding": same,
             "model": ckpt["model"], "preprocess": prep.to_dict(), "tta_hflip": hflip}
    if not int8:
        return entry, {}
    calib_ids = train[train["fold"] != k][ID].to_numpy()[:calib_images]
    calib, skipped = usable_batch([image_path(images, i) for i in calib_ids], prep)
    report_skipped(skipped, f"{run} fold {k}: int8 calibration")
    int8_path = onnx_dir / f"{run}_fold{k}.int8.onnx"
    quantize_int8(target, int8_path, [calib[i:i + 16] for i in range(0, len(calib), 16)])
    entry["int8_path"] = int8_path.name
    quantised = onnx_runner(int8_path, threads, schema)
    if hflip:
        fp32, quantised = mirrored(fp32), mirrored(quantised)
    batches = [placeholder_batch(val_paths[i:i + 64], prep) for i in range(0, len(val_paths), 64)]
    oof = {"fp32": np.concatenate([fp32(b) for b in batches]),
           "int8": np.concatenate([quantised(b) for b in batches]), "targets": schema.encode(val),
           "ids": val[ID].to_numpy()}
    return entry, oof


def export_run(run: str, paths: list[Path], schema: Schema, train: pd.DataFrame, images: Path, onnx_dir: Path,
               **checks) -> tuple[dict, dict]:
    """Every fold of one run (``checks``: export_fold's keywords); with ``int8``, the run's OOF score in
    fp32 and int8. Returns the manifest entry and, with ``int8``, the run's OOF logits in fp32 and
    int8 ONNX ({"ids", "fp32", "int8"})."""
    entry = {"run": run, "folds": []}
    oofs = []
    for k, path in enumerate(paths):
        fold, oof = export_fold(run, k, path, schema, train, images, onnx_dir, **checks)
        entry["folds"].append(fold)
        oofs.append(oof)
    preps = {json.dumps(f["preprocess"], sort_keys=True) for f in entry["folds"]}
    if len(preps) > 1:  # one Member serves every fold of a run with one preprocessing
        raise DataError(f"run {run}: its folds were trained with different preprocessing ({sorted(preps)}); "
                        f"retrain them with one config")
    if len({f["tta_hflip"] for f in entry["folds"]}) > 1:
        raise DataError(f"run {run}: some of its folds were scored with tta_hflip and some without; retrain them "
                        f"with one config")
    entry.update(model=entry["folds"][0]["model"], preprocess=entry["folds"][0]["preprocess"],
                 tta_hflip=entry["folds"][0]["tta_hflip"])
    if checks["int8"]:
        targets = np.concatenate([o["targets"] for o in oofs])
        fp32_score, _ = score_logits(schema, targets, np.concatenate([o["fp32"] for o in oofs]))
        int8_score, _ = score_logits(schema, targets, np.concatenate([o["int8"] for o in oofs]))
        entry.update(oof_fp32=fp32_score, oof_int8=int8_score)
        print(f"{run}: OOF score fp32 {fp32_score:.4f}, int8 {int8_score:.4f} ({int8_score - fp32_score:+.4f})")
        return entry, {k: np.concatenate([o[k] for o in oofs]) for k in ("ids", "fp32", "int8")}
    return entry, {}


def export_merged(ens: dict, entries: list[dict], schema: Schema, test_paths: list[Path], onnx_dir: Path, *,
                  threads: int, parity_images: int, timing_images: int) -> dict:
    """The whole ensemble as one graph, checked against separate sessions on ``parity_images`` test
    images; with ``timing_images``, both timed single-stream on that many and the faster used.
    Returns the manifest's keys."""
    prep = Preprocess.from_dict(entries[0]["preprocess"])
    merged_path = onnx_dir / "ensemble.onnx"
    files = fold_files(onnx_dir, {e["run"]: e for e in entries}, ens["models"])
    export_graph(files, ens["weights"], ens["biases"], schema, prep, merged_path)
    batch, skipped = usable_batch(test_paths, prep, max(timing_images, parity_images))
    report_skipped(skipped, "merged graph: parity and timing")
    merged = onnx_runner(merged_path, threads, schema)
    members = fold_members(onnx_dir, {e["run"]: e for e in entries}, ens["models"], (), False, threads, schema)
    diff, same = merged_parity(merged, members, ens, schema, batch[:parity_images])
    keys = {"merged": {"path": merged_path.name, "preprocess": prep.to_dict(), "parity_max_abs_diff": diff,
                       "parity_same_decoding": same, "parity_images": min(parity_images, len(batch)),
                       "ensemble": ensemble_digest(ens)},
            "use": "merged" if same and diff <= MERGED_PARITY else "separate"}
    if not timing_images:
        print(f"merged graph: max |diff| {diff:.1e} against separate sessions; not timed (--timing-images 0)")
        return keys
    images = [batch[i:i + 1] for i in range(min(timing_images, len(batch)))]
    separate = lambda x: combine_members(run_members(members, {prep: x}), ens, schema)
    t_sep = statistics.median(single_stream_ms(separate, images))
    t_merged = statistics.median(single_stream_ms(merged, images))
    keys["use"] = "merged" if t_merged < t_sep and same else "separate"
    print(f"one image, {threads} threads, median: separate sessions {t_sep:.1f} ms, merged graph "
          f"{t_merged:.1f} ms (max |diff| {diff:.1e}); infer.py uses: {keys['use']}")
    return {**keys, "timing_ms_per_image": {"separate_sessions": t_sep, "merged_graph": t_merged,
                                            "threads": threads, "images": len(images)}}


def export(cfg: ExportConfig) -> Manifest:
    """What ``python export.py`` does; returns the manifest it wrote."""
    run_dir = RunDir(cfg.out_dir)
    schema, data = run_dir.schema, read_dataset(cfg.data_dir)
    train = run_dir.train_rows(data.train)
    ens = load_ensemble(run_dir, cfg.models)
    runs = run_dir.complete_runs() if cfg.budget_ms else ens["models"]  # under a budget, any run may serve
    checks = dict(threads=cfg.threads, parity_images=cfg.parity_images, int8=cfg.int8, calib_images=cfg.calib_images)
    exported = {run: export_run(run, [run_dir.fold_file(run, k, "best.pt") for k in range(run_dir.n_folds)],
                                schema, train, data.train_images, run_dir.onnx_dir, **checks) for run in runs}
    manifest = Manifest(models=ens["models"], schema=schema.fingerprint, members=[exported[r][0] for r in runs],
                        config=dataclasses.asdict(cfg))
    ens_entries = [exported[run][0] for run in ens["models"]]
    if cfg.merge and cfg.budget_ms:
        (run_dir.onnx_dir / "ensemble.onnx").unlink(missing_ok=True)  # an earlier export's: the manifest drops it
        print("merged graphs: the budget builds one for each candidate that one graph can serve (ensemble.json's "
              "among them), checks it against its separate sessions and times it")
    elif cfg.merge and mergeable(ens_entries):
        test_paths = [image_path(data.test_images, i) for i in data.test[ID]]
        keys = export_merged(ens, ens_entries, schema, test_paths, run_dir.onnx_dir, threads=cfg.threads,
                             parity_images=cfg.parity_images, timing_images=cfg.timing_images)
        manifest = dataclasses.replace(manifest, **keys)
    elif cfg.merge:
        print("no merged graph: the runs differ in preprocessing, or one averages the mirror (tta_hflip), "
              "which a merged graph does not")
    if cfg.budget_ms:
        manifest.serve = choose_serving(run_dir, exported, data, budget_ms=cfg.budget_ms,
                                        int8_max_drop=cfg.int8_max_drop, merge=cfg.merge,
                                        latency_images=cfg.latency_images, parity_images=cfg.parity_images,
                                        threads=cfg.threads, progress=cfg.progress)
    options = (" --int8" if cfg.int8 else "") + (f" --models {','.join(cfg.models)}" if cfg.models else "")
    options += f" --budget-ms {cfg.budget_ms:g}" if cfg.budget_ms else ""
    manifest.write(run_dir, f"python export.py --data-dir {cfg.data_dir} --out-dir {{root}}{options}",
                   with_ensemble=not cfg.models or bool(cfg.budget_ms))  # the budget reads its method and candidates
    rows = [{"run": e["run"], "fold": f["fold"], "max_abs_diff": f["parity_max_abs_diff"],
             "same_decoding": f["parity_same_decoding"], **({"int8": f["int8_path"]} if "int8_path" in f else {})}
            for e in manifest.members for f in e["folds"]]
    print("\n" + pd.DataFrame(rows).to_string(index=False) + f"\nwrote {run_dir.manifest_path}")
    return manifest

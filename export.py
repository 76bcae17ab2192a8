"""Export the ensemble's fold checkpoints to ONNX, check parity, quantise, and choose how to serve.

    python export.py                         # runs of ensemble.json (or every run) -> <out-dir>/onnx/
    python export.py --int8                  # also int8 static quantisation (QDQ), with its OOF score change
    python export.py --budget-ms 500         # serve the best configuration whose p99 (or max), measured here, fits

Every fold's ``best.pt`` becomes ``onnx/<run>_fold<k>.onnx`` (dynamic batch; schema and
preprocessing embedded as metadata). Each export is checked against PyTorch on real images of its
fold's validation rows: maximum absolute logit difference (must be <= 1e-3) and identical decoding.
When all members share one preprocessing, the whole ensemble (folds, weights, biases) is also
exported as one graph, ``onnx/ensemble.onnx``; both ways are timed single-stream and the faster
one is recorded in ``onnx/manifest.json`` (``use``), which infer.py follows. With ``--budget-ms``,
every complete run is exported (a distilled student too), and every candidate configuration (the
ensemble, smaller ensembles, each run alone; merged, fp32, int8 members; all folds or one) is
scored by nested CV and timed end to end here: the best that fits is written to the manifest
(``serve``), with every candidate in ``onnx/budget.csv`` (utils/serve/budget.py).

Latency of the seed's backbones at 224 px: ``python -m utils.bench.latency``.
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

from tqdm import tqdm

from utils.serve import budget

from utils import provenance
from utils.ensemble.blend import combine_members, ensemble_digest, expand_weights, head_log_softmax, load_ensemble, load_oof
from utils.config import CommonConfig, option, run_command
from utils.errors import DataError
from utils.io import atomic_write_csv, atomic_write_json
from utils.ensemble.metric import score_logits
from utils.train.model import checkpoint_preprocess, load_checkpoint
from utils.serve.graph import EnsembleGraph, LogitsOnly, export_onnx, quantize_int8
from utils.run import RunDir
from utils.data.schema import CATEGORY, ID, Schema, image_path, read_dataset
from utils.serve.members import (MERGED_PARITY, fold_members, merged_parity, mirrored, onnx_runner, parity,
                           placeholder_batch, run_members, single_stream_ms, trained_with_tta, usable_batch)
from utils.data.transforms import Preprocess


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


def report_skipped(skipped: list, what: str) -> None:
    if skipped:
        print(f"{what}: {len(skipped)} unreadable image(s) skipped: "
              + ", ".join(f"{p.name} ({reason.split(':')[0]})" for p, reason in skipped[:5]))


def metadata(schema: Schema, run: str, prep, **extra) -> dict:
    """What an ONNX file says about itself (utils.serve.graph.read_metadata reads it back)."""
    return {"fingerprint": schema.fingerprint, "schema": schema.to_dict(), "run": run,
            "preprocess": prep.to_dict(), **extra}


def export_fold(cfg: ExportConfig, run: str, k: int, path: Path, schema: Schema, data, train: pd.DataFrame,
                onnx_dir: Path) -> tuple[dict, dict]:
    """One fold to ONNX, checked against PyTorch; with ``int8``, also quantised, with the fp32 and
    int8 logits of every validation row. Returns (manifest entry of the fold, its OOF logits)."""
    model, ckpt = load_checkpoint(path, schema)
    prep = checkpoint_preprocess(ckpt)
    target = onnx_dir / f"{run}_fold{k}.onnx"
    export_onnx(LogitsOnly(model), target, prep.img_size, metadata(schema, run, prep, fold=k, model=ckpt["model"]))
    val = train[train["fold"] == k]
    val_paths = [image_path(data.train_images, i) for i in val[ID]]
    x, skipped = usable_batch(val_paths, prep, cfg.parity_images)
    report_skipped(skipped, f"{run} fold {k}: parity")
    if not len(x):
        raise DataError(f"run {run} fold {k}: none of its validation images can be read for the parity check")
    with torch.no_grad():
        expected = model.logits(torch.from_numpy(x)).numpy()
    fp32 = onnx_runner(target, cfg.threads, schema)
    diff, same = parity(expected, fp32(x), schema)
    if diff > 1e-3 or not same:
        raise RuntimeError(f"{target}: ONNX differs from PyTorch (max |diff| {diff:.2e}, same decoding {same})")
    print(f"{target.name}: parity max |diff| {diff:.2e}, same decoding {same}")
    hflip = trained_with_tta(ckpt)  # its OOF logits average the mirror: so do its int8 OOF and serving
    entry = {"fold": k, "path": target.name, "parity_max_abs_diff": diff, "parity_same_decoding": same,
             "model": ckpt["model"], "preprocess": prep.to_dict(), "tta_hflip": hflip}
    if not cfg.int8:
        return entry, {}
    calib_ids = train[train["fold"] != k][ID].to_numpy()[: cfg.calib_images]
    calib, skipped = usable_batch([image_path(data.train_images, i) for i in calib_ids], prep)
    report_skipped(skipped, f"{run} fold {k}: int8 calibration")
    int8_path = onnx_dir / f"{run}_fold{k}.int8.onnx"
    quantize_int8(target, int8_path, [calib[i:i + 16] for i in range(0, len(calib), 16)])
    entry["int8_path"] = int8_path.name
    int8 = onnx_runner(int8_path, cfg.threads, schema)
    if hflip:
        fp32, int8 = mirrored(fp32), mirrored(int8)
    batches = [placeholder_batch(val_paths[i:i + 64], prep) for i in range(0, len(val_paths), 64)]
    oof = {"fp32": np.concatenate([fp32(b) for b in batches]), "int8": np.concatenate([int8(b) for b in batches]),
           "targets": schema.encode(val), "ids": val[ID].to_numpy()}
    return entry, oof


def export_run(cfg: ExportConfig, run: str, paths: list[Path], schema: Schema, data, train: pd.DataFrame,
               onnx_dir: Path) -> tuple[dict, dict]:
    """Every fold of one run; with ``int8``, the run's OOF score in fp32 and int8. Returns the
    manifest entry and, with ``int8``, the run's OOF logits in fp32 and int8 ONNX ({"ids", "fp32", "int8"})."""
    entry = {"run": run, "folds": []}
    oofs = []
    for k, path in enumerate(paths):
        fold, oof = export_fold(cfg, run, k, path, schema, data, train, onnx_dir)
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
    if cfg.int8:
        targets = np.concatenate([o["targets"] for o in oofs])
        fp32_score, _ = score_logits(schema, targets, np.concatenate([o["fp32"] for o in oofs]))
        int8_score, _ = score_logits(schema, targets, np.concatenate([o["int8"] for o in oofs]))
        entry.update(oof_fp32=fp32_score, oof_int8=int8_score)
        print(f"{run}: OOF score fp32 {fp32_score:.4f}, int8 {int8_score:.4f} ({int8_score - fp32_score:+.4f})")
        return entry, {k: np.concatenate([o[k] for o in oofs]) for k in ("ids", "fp32", "int8")}
    return entry, {}


def mergeable(entries: list[dict]) -> bool:
    """Runs that one graph can serve: one preprocessing, and none that averages the mirror."""
    return len({json.dumps(e["preprocess"], sort_keys=True) for e in entries}) == 1 and \
        not any(e.get("tta_hflip") for e in entries)


def export_graph(fold_paths: list[list[Path]], weights, biases, schema: Schema, prep: Preprocess, path: Path) -> None:
    """Runs' fold checkpoints (one list per run), blended with ``weights`` and ``biases``, as one
    ONNX graph: what infer.py would compute from separate sessions."""
    fold_models = [[load_checkpoint(p, schema)[0] for p in paths] for paths in fold_paths]
    graph = EnsembleGraph(fold_models, expand_weights(weights, schema), biases, schema)
    export_onnx(graph, path, prep.img_size, metadata(schema, "ensemble", prep))


def export_merged(cfg: ExportConfig, ens: dict, entries: list[dict], schema: Schema, data, onnx_dir: Path) -> dict:
    """The whole ensemble as one graph; timed against separate sessions (under ``--budget-ms`` the
    budget times both, among its candidates, and chooses: no timing here). Returns the manifest keys."""
    prep = Preprocess.from_dict(entries[0]["preprocess"])
    merged_path = onnx_dir / "ensemble.onnx"
    export_graph([ens["folds"][run] for run in ens["models"]], ens["weights"], ens["biases"], schema, prep, merged_path)
    batch, skipped = usable_batch([image_path(data.test_images, i) for i in data.test[ID]], prep,
                                  max(cfg.timing_images, cfg.parity_images))
    report_skipped(skipped, "merged graph: parity and timing")
    images = [batch[i:i + 1] for i in range(min(cfg.timing_images, len(batch)))]
    merged = onnx_runner(merged_path, cfg.threads, schema)
    members = fold_members(onnx_dir, {e["run"]: e for e in entries}, ens["models"], (), False, cfg.threads, schema)
    separate = lambda x: combine_members(run_members(members, {prep: x}), ens, schema)
    diff, same = merged_parity(merged, members, ens, schema, batch[: cfg.parity_images])
    keys = {"merged": {"path": merged_path.name, "preprocess": prep.to_dict(), "parity_max_abs_diff": diff,
                       "parity_same_decoding": same, "parity_images": min(cfg.parity_images, len(batch)),
                       "ensemble": ensemble_digest(ens)},
            "use": "merged" if same and diff <= MERGED_PARITY else "separate"}
    if cfg.budget_ms:
        print(f"merged graph: max |diff| {diff:.1e} against separate sessions; timed with the budget's candidates")
        return keys
    t_sep = statistics.median(single_stream_ms(separate, images))
    t_merged = statistics.median(single_stream_ms(merged, images))
    keys["use"] = "merged" if t_merged < t_sep and same else "separate"
    print(f"one image, {cfg.threads} threads, median: separate sessions {t_sep:.1f} ms, merged graph "
          f"{t_merged:.1f} ms (max |diff| {diff:.1e}); infer.py uses: {keys['use']}")
    return {**keys, "timing_ms_per_image": {"separate_sessions": t_sep, "merged_graph": t_merged,
                                            "threads": cfg.threads, "images": len(images)}}


def choose_serving(cfg: ExportConfig, run_dir: RunDir, exported: dict, data) -> dict:
    """Under ``--budget-ms``: every candidate configuration scored and timed here; the best that
    fits (utils/serve/budget.py). Raises, naming the fastest, when none does."""
    if not run_dir.ensemble_path.is_file():
        raise DataError(f"--budget-ms weighs the candidates with {run_dir.ensemble_path}'s method: run ensemble.py first")
    schema, spec = run_dir.schema, json.loads(run_dir.ensemble_path.read_text())
    rows, runs = run_dir.train_rows(data.train), list(exported)
    position = pd.Series(np.arange(len(rows)), index=rows[ID].to_numpy())
    members = dict(zip(runs, load_oof(run_dir, runs, rows[ID].to_numpy())))
    int8_members = {}  # with --int8: each member's int8 OOF logits, for the candidates that quantise it
    for run, (entry, oof) in exported.items():
        if oof:
            z = np.empty_like(oof["int8"])
            z[position[oof["ids"]].to_numpy()] = oof["int8"]
            int8_members[run] = head_log_softmax(z, schema)
    int8_ok = budget.int8_allowed({run: entry for run, (entry, oof) in exported.items() if oof}, cfg.int8_max_drop)
    scorer = budget.Scorer(members, int8_members, schema.encode(rows), rows["fold"].to_numpy(), schema, spec)
    preps = {run: Preprocess.from_dict(exported[run][0]["preprocess"]) for run in runs}
    variants, optimistic = [], {r for r in runs if run_dir.optimistic_student(r)}
    for models in budget.candidates(scorer, spec["models"], runs):
        merge = cfg.merge and mergeable([exported[r][0] for r in models])
        variants += budget.variants_of(scorer, models, int8_ok, merge, optimistic)
    paths = [image_path(data.test_images, i) for i in data.test[ID]]  # the usable ones: timed, and the parity's
    x, skipped = usable_batch(paths, next(iter(preps.values())), max(cfg.latency_images, cfg.parity_images))
    report_skipped(skipped, "budget: timing")
    passed_over = {p for p, _ in skipped}
    items = [(p, c) for p, c in zip(paths[: len(x) + len(skipped)], data.test[CATEGORY]) if p not in passed_over]
    parity_paths, items = [p for p, _ in items[: cfg.parity_images]], items[: cfg.latency_images]
    for k, v in enumerate(tqdm(variants, desc="budget", disable=not cfg.progress)):
        one_image = serving_fn(cfg, run_dir, v, preps, exported, k, parity_paths)
        v.p50, v.p99, v.timed = budget.time_variant(one_image, items)
    table = budget.table(variants, cfg.budget_ms)
    atomic_write_csv(run_dir.onnx_dir / "budget.csv", table)
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        print(f"\nserving candidates, end to end per image, single stream, {cfg.threads} threads, {len(items)} "
              f"images; budget {cfg.budget_ms:.0f} ms for the {budget.tail_name(len(items))}\n"
              + table.to_string(index=False, float_format="{:.4f}".format))
    chosen = budget.choose(variants, cfg.budget_ms)
    for v in variants:  # the merged graphs built to be timed: only the chosen one is kept
        if v.path and v is not chosen:
            (run_dir.onnx_dir / v.path).unlink(missing_ok=True)
    if chosen is None:
        fastest = min(variants, key=lambda v: v.p99)
        raise DataError(f"nothing fits a budget of {cfg.budget_ms:.0f} ms for the {budget.tail_name(len(items))} on this "
                        f"machine: the fastest is {fastest.name} at {fastest.p99:.1f} ms (every candidate: "
                        f"{run_dir.onnx_dir / 'budget.csv'})")
    flag = f", optimistic: {','.join(chosen.optimistic)} saw its validation labels" if chosen.optimistic else ""
    print(f"serving {chosen.name}: score {chosen.score:.4f} (nested CV{flag}), {budget.tail_name(chosen.timed)} "
          f"{chosen.p99:.1f} ms <= {cfg.budget_ms:.0f} ms")
    return {"name": chosen.name, "models": chosen.models, "weights": np.asarray(chosen.weights).tolist(),
            "biases": np.asarray(chosen.biases, dtype=float).round(6).tolist(), "folds": chosen.folds,
            "format": chosen.format, "int8": chosen.int8, "path": chosen.path, "score": chosen.score,
            "p50_ms": chosen.p50, "p99_ms": chosen.p99, "budget_ms": cfg.budget_ms, "threads": cfg.threads,
            "images": len(items), "tail": budget.tail_name(chosen.timed), "optimistic": chosen.optimistic}


def serving_fn(cfg: ExportConfig, run_dir: RunDir, v, preps: dict, exported: dict, k: int, parity_paths: list):
    """One image end to end (decode, preprocess, members, blend, decode) as variant ``v`` serves it. A
    merged graph is first checked against the separate sessions it replaces, on ``parity_paths``, as
    the main merged graph is: a graph that differs by more than MERGED_PARITY is an error."""
    schema = run_dir.schema
    ens = {"models": v.models, "weights": v.weights, "biases": v.biases}
    if v.format == "merged":
        prep = preps[v.models[0]]
        v.path = f"budget_{k}.onnx"
        export_graph([[run_dir.fold_file(r, f, "best.pt") for f in range(run_dir.n_folds)] for r in v.models],
                     v.weights, v.biases, schema, prep, run_dir.onnx_dir / v.path)
        session = onnx_runner(run_dir.onnx_dir / v.path, cfg.threads, schema)
        separate = fold_members(run_dir.onnx_dir, {r: e for r, (e, _) in exported.items()}, v.models, (),
                                False, cfg.threads, schema)  # fp32, every fold: what the graph bakes in
        x = usable_batch(parity_paths, prep)[0]
        diff, same = merged_parity(session, separate, ens, schema, x)
        if diff > MERGED_PARITY or not same:
            raise RuntimeError(f"{v.path} ({v.name}): the merged graph differs from its separate sessions on "
                               f"{len(x)} images (max |diff| {diff:.2e}, same decoding {same})")
        return lambda item: schema.predict(session(prep(item[0])[None]))
    members = fold_members(run_dir.onnx_dir, {r: e for r, (e, _) in exported.items()}, v.models, v.int8,
                           v.folds == "one", cfg.threads, schema)

    def predict_one(item):
        images = {p: p(item[0])[None] for p in {m.prep for m in members}}
        return schema.predict(combine_members(run_members(members, images), ens, schema))
    return predict_one


def made_from(cfg: ExportConfig, run_dir: RunDir, manifest: dict) -> dict:
    """The manifest is made from the checkpoints of every run it exported, ensemble.json (whose
    weights the merged graph bakes in and whose method weighs the budget's candidates) and the ONNX
    files it lists: a change to any of them after export is noticed."""
    onnx = [run_dir.onnx_dir / f[key] for e in manifest["members"] for f in e["folds"]
            for key in ("path", "int8_path") if key in f]
    if "merged" in manifest:
        onnx.append(run_dir.onnx_dir / manifest["merged"]["path"])
    if manifest.get("serve", {}).get("path"):
        onnx.append(run_dir.onnx_dir / manifest["serve"]["path"])
    checkpoints = [run_dir.fold_file(e["run"], f["fold"], "best.pt") for e in manifest["members"] for f in e["folds"]]
    used = checkpoints + onnx
    if run_dir.ensemble_path.is_file() and not cfg.models:
        used.append(run_dir.ensemble_path)
    options = (" --int8" if cfg.int8 else "") + (f" --models {','.join(cfg.models)}" if cfg.models else "")
    return provenance.record(used, run_dir.path,
                             rebuild=f"python export.py --data-dir {cfg.data_dir} --out-dir {{root}}{options}")


def main(cfg: ExportConfig) -> dict:
    run_dir = RunDir(cfg.out_dir)
    schema, data = run_dir.schema, read_dataset(cfg.data_dir)
    train = run_dir.train_rows(data.train)
    ens = load_ensemble(run_dir, cfg.models)
    runs = run_dir.complete_runs() if cfg.budget_ms else ens["models"]  # under a budget, any run may serve
    exported = {run: export_run(cfg, run, [run_dir.fold_file(run, k, "best.pt") for k in range(run_dir.n_folds)],
                                schema, data, train, run_dir.onnx_dir) for run in runs}
    entries = [exported[run][0] for run in runs]
    manifest = {"models": ens["models"], "schema": schema.fingerprint, "members": entries, "use": "separate",
                "config": dataclasses.asdict(cfg)}
    ens_entries = [exported[run][0] for run in ens["models"]]
    if cfg.merge and mergeable(ens_entries):
        manifest.update(export_merged(cfg, ens, ens_entries, schema, data, run_dir.onnx_dir))
    elif cfg.merge:
        print("no merged graph: the runs differ in preprocessing, or one averages the mirror (tta_hflip), "
              "which a merged graph does not")
    if cfg.budget_ms:
        manifest["serve"] = choose_serving(cfg, run_dir, exported, data)
    manifest["provenance"] = made_from(cfg, run_dir, manifest)
    atomic_write_json(run_dir.manifest_path, manifest)
    rows = [{"run": e["run"], "fold": f["fold"], "max_abs_diff": f["parity_max_abs_diff"],
             "same_decoding": f["parity_same_decoding"], **({"int8": f["int8_path"]} if "int8_path" in f else {})}
            for e in entries for f in e["folds"]]
    print("\n" + pd.DataFrame(rows).to_string(index=False) + f"\nwrote {run_dir.manifest_path}")
    return manifest


if __name__ == "__main__":
    run_command(main, ExportConfig, __doc__)

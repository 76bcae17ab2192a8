"""Ensemble members as plain callables, each with the preprocessing its checkpoint describes: what
infer.py serves, export parity-checks and the budget times; and the parity and timing helpers."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.blend import combine_members, ensemble_digest
from utils.data.dataset import read_or_placeholder
from utils.data.schema import Schema
from utils.data.transforms import Preprocess
from utils.errors import DataError
from utils.run import RunDir
from utils.serve.graph import make_session
from utils.serve.manifest import Manifest
from utils.train.model import checkpoint_preprocess, load_checkpoint, trained_with_tta


@dataclass
class Member:
    """One run of the ensemble: a callable per fold (normalised images [B, 3, S, S] -> logits
    [B, L]), the preprocessing its checkpoint describes, and whether the run was trained with
    ``tta_hflip`` (its OOF logits, hence its ensemble weights, average the mirror: so does serving)."""
    run: str
    folds: list[Callable[[np.ndarray], np.ndarray]]
    prep: Preprocess
    hflip: bool = False


def torch_members(ens: dict, schema: Schema) -> list[Member]:
    """The runs' best.pt checkpoints, in eval mode."""
    members = []
    for run in ens["models"]:
        folds, ckpt = [], None
        for path in ens["folds"][run]:
            model, ckpt = load_checkpoint(path, schema)
            folds.append(lambda x, m=model: m.logits(torch.from_numpy(x)).float().numpy())
        members.append(Member(run, folds, checkpoint_preprocess(ckpt), trained_with_tta(ckpt)))
    return members


def onnx_runner(path: Path, threads: int, schema: Schema | None = None) -> Callable[[np.ndarray], np.ndarray]:
    session = make_session(path, threads, schema)
    return lambda x: session.run(None, {"image": x})[0]


def onnx_members(run_dir: RunDir, ens: dict, schema: Schema, int8: bool, threads: int) -> tuple[list[Member], bool, dict]:
    """What export.py chose to serve: the configuration that fits the latency budget (manifest
    ``serve``), or one session of the merged ensemble graph when it was faster, or per-fold
    sessions. Returns (members, merged, the ensemble to blend them with)."""
    manifest = Manifest.read(run_dir, ens["models"])
    if manifest.serve and ens.get("from_ensemble_json") and not int8:
        return served(run_dir, manifest, schema, threads)
    if manifest.use == "merged" and not int8:
        m = manifest.merged
        if m.get("ensemble") == ensemble_digest(ens):
            run = onnx_runner(run_dir.onnx_dir / m["path"], threads, schema)
            return [Member("ensemble", [run], Preprocess.from_dict(m["preprocess"]))], True, ens
        print(f"{run_dir.onnx_dir / m['path']} holds the weights and biases of {run_dir.ensemble_path.name} as "
              f"exported; the ensemble asked for here differs (--models?), so the per-fold ONNX files serve it")
    by_run = manifest.by_run
    for run in ens["models"] if int8 else ():
        if any("int8_path" not in fold for fold in by_run[run]["folds"]):
            raise DataError(f"{run_dir.manifest_path}: no int8 model for {run}; run export.py --int8")
    members = fold_members(run_dir.onnx_dir, by_run, ens["models"], ens["models"] if int8 else (), False, threads, schema)
    return members, False, ens


def served_ensemble(serve: dict) -> dict:
    """The blend of the configuration export.py --budget-ms chose (a manifest's ``serve``)."""
    return {"models": serve["models"], "weights": np.asarray(serve["weights"]),
            "biases": np.asarray(serve["biases"], dtype=np.float32)}


def served(run_dir: RunDir, manifest: Manifest, schema: Schema, threads: int) -> tuple[list[Member], bool, dict]:
    """The members of the configuration export.py --budget-ms chose."""
    serve = manifest.serve
    ens = served_ensemble(serve)
    by_run = manifest.by_run
    if serve["format"] == "merged":
        prep = Preprocess.from_dict(by_run[serve["models"][0]]["preprocess"])
        return [Member("ensemble", [onnx_runner(run_dir.onnx_dir / serve["path"], threads, schema)], prep)], True, ens
    return fold_members(run_dir.onnx_dir, by_run, serve["models"], serve["int8"], serve["folds"] == "one", threads,
                        schema), False, ens


def fold_files(onnx_dir: Path, entries: dict, models: list[str]) -> list[list[Path]]:
    """The fp32 ONNX file of every fold of ``models``, one list per run, from their manifest
    ``entries`` ({run: entry}): what a merged graph joins (``utils.serve.graph.export_graph``)."""
    return [[onnx_dir / f["path"] for f in entries[run]["folds"]] for run in models]


def fold_members(onnx_dir: Path, entries: dict, models: list[str], int8, one_fold: bool, threads: int,
                 schema: Schema) -> list[Member]:
    """Per-fold ONNX sessions of ``models`` from their manifest ``entries`` ({run: entry}): the
    int8 files for the runs in ``int8``, the first fold alone with ``one_fold``."""
    members = []
    for run in models:
        key = "int8_path" if run in int8 else "path"
        folds = entries[run]["folds"][: 1 if one_fold else None]
        members.append(Member(run, [onnx_runner(onnx_dir / f[key], threads, schema) for f in folds],
                              Preprocess.from_dict(entries[run]["preprocess"]),
                              entries[run].get("tta_hflip", False)))
    return members


def mirrored(fold: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fold`` with hflip TTA: the mean of its logits on the images and on their mirror."""
    return lambda x: (fold(x) + fold(np.ascontiguousarray(x[..., ::-1]))) / 2


def run_members(members: list[Member], images: dict, tta_hflip: bool = False) -> dict:
    """{run: [fold logits]} for one batch; ``images`` maps each Preprocess to its batch.
    TTA (``tta_hflip``, or a member trained with it) averages each fold's logits with the mirror's."""
    return {m.run: [(mirrored(fold) if tta_hflip or m.hflip else fold)(images[m.prep]) for fold in m.folds]
            for m in members}


def preprocess_batch(paths, prep: Preprocess) -> np.ndarray:
    """Images decoded and transformed as for evaluation: float32 [N, 3, S, S]."""
    return np.stack([prep(p) for p in paths]).astype(np.float32)


def usable_batch(paths, prep: Preprocess, n: int | None = None) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Evaluation inputs (float32 [k, 3, S, S]) of the first ``n`` usable images among ``paths`` (all
    of them by default), and (path, reason) of each unusable one passed over: export's parity,
    calibration and timing images skip a bad file, as training and infer.py tolerate it."""
    images, skipped = [], []
    for path in paths:
        if n is not None and len(images) >= n:
            break
        pixels, error = read_or_placeholder(path, prep)
        if error:
            skipped.append((Path(path), error))
        else:
            images.append(prep.normalize(prep.transform()(pixels)))
    empty = np.zeros((0, 3, prep.img_size, prep.img_size), np.float32)
    return (np.stack(images).astype(np.float32) if images else empty), skipped


def report_skipped(skipped: list, what: str) -> None:
    """One line naming the first unusable images ``usable_batch`` passed over, if any."""
    if skipped:
        print(f"{what}: {len(skipped)} unreadable image(s) skipped: "
              + ", ".join(f"{p.name} ({reason.split(':')[0]})" for p, reason in skipped[:5]))


def placeholder_batch(paths, prep: Preprocess) -> np.ndarray:
    """Evaluation inputs of every image, an unusable one as the grey placeholder: the inputs
    training's OOF logits were computed on."""
    return np.stack([prep.normalize(prep.transform()(read_or_placeholder(p, prep)[0])) for p in paths])


MERGED_PARITY = 1e-3  # the largest |logit difference| a merged graph may show against separate sessions


def merged_parity(merged: Callable, members: list[Member], ens: dict, schema: Schema, x: np.ndarray) -> tuple[float, bool]:
    """(max |diff|, same decoding) of a merged ensemble graph against the separate sessions it replaces
    (``members``, blended with ``ens``'s weights and biases), on the inputs ``x``."""
    return parity(combine_members(run_members(members, {members[0].prep: x}), ens, schema), merged(x), schema)


def parity(a: np.ndarray, b: np.ndarray, schema: Schema) -> tuple[float, bool]:
    """(max |a - b|, whether every head decodes the same) of two logits arrays."""
    same = all((a[:, h.logits].argmax(1) == b[:, h.logits].argmax(1)).all() for h in schema.heads)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf"), same  # a NaN or inf logit is never parity
    return float(np.abs(a - b).max()), same


def single_stream_ms(fn: Callable, inputs: list) -> list[float]:
    """Wall time of ``fn(x)`` for each input in turn, in milliseconds."""
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return times

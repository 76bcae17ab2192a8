"""Inference (``python infer.py``): the ensemble on the test images, streamed in batches, into a
validated submission.

Members, weights and biases come from ``<out-dir>/ensemble.json`` (equal weights without it).
The ONNX backend serves what ``<out-dir>/onnx/manifest.json`` says: under ``export.py
--budget-ms``, the configuration chosen to fit the latency budget. Images are decoded and
preprocessed by the same transform factory as in training. Each row's own category heads are
decoded, ``dummy_value`` fills the slots past ``len``; the result is validated, then written
atomically. An image that is missing, empty, truncated or not an image still gets its row,
predicted from its category's most frequent values, with a warning naming the id. When
``<data-dir>/test_solution.csv`` exists (the demo), the score is printed.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from utils.blend import combine_members, load_ensemble, load_test_logits
from utils.config import CommonConfig, option
from utils.data.dataset import TestImages
from utils.data.schema import CATEGORY, ID, read_category_attributes, read_test
from utils.metric import solution_score
from utils.run import RunDir
from utils.serve.members import onnx_members, run_members, torch_members
from utils.serve.submission import make_submission, submission_from_predictions, write_submission


@dataclass
class InferConfig(CommonConfig):
    output: str = option("submission.csv", "the submission to write")
    backend: str = option("onnx", "onnx (export.py's models) or torch (the best.pt checkpoints)",
                          choices=("onnx", "torch"))
    int8: bool = option(False, "onnx: the int8-quantised models (export.py --int8)")
    from_logits: bool = option(False, "build the submission from train.py's test_logits.npz, no images read")
    models: Optional[list[str]] = option(None, "runs (a,b,c), equal weights and no biases; "
                                               "default: ensemble.json's, else every run")
    tta_hflip: bool = option(False, "average each model's logits with the mirrored image's")
    batch_size: int = option(32, "images per batch")
    workers: int = option(2, "data loader worker processes")
    threads: int = option(0, "compute threads (0 = every core)")
    progress: bool = option(True, "progress bars")


def predict_images(cfg: InferConfig, run_dir: RunDir, test: pd.DataFrame, ens: dict, images_dir: Path):
    """Blended scores decoded batch by batch; memory holds one batch of images at a time, and
    each row's class indices. Returns (decoded rows, ids of bad images with their reasons, the runs
    served: export.py's budgeted choice may be fewer than the ensemble's)."""
    schema = run_dir.schema
    if cfg.backend == "torch":
        members, merged = torch_members(ens, schema), False
    else:
        members, merged, ens = onnx_members(run_dir, ens, schema, cfg.int8, cfg.threads)
    preps = sorted({m.prep for m in members}, key=lambda p: json.dumps(p.to_dict(), sort_keys=True))
    ids, categories = test[ID].to_numpy(), test[CATEGORY].to_numpy()
    loader = torch.utils.data.DataLoader(TestImages(ids, images_dir, preps), batch_size=cfg.batch_size,
                                         num_workers=cfg.workers, shuffle=False)
    fallback = schema.prior_logits()
    preds, bad = np.empty((len(test), len(schema.heads)), dtype=np.int16), {}
    with torch.inference_mode():
        for batch in tqdm(loader, desc="infer", disable=not cfg.progress, dynamic_ncols=True):
            images = {p: p.normalize(batch["images"][k]).numpy() for k, p in enumerate(preps)}
            logits = run_members(members, images, cfg.tta_hflip)
            scores = logits["ensemble"][0] if merged else combine_members(logits, ens, schema)
            index = batch["index"].numpy()
            for k in np.flatnonzero(~batch["ok"].numpy()):
                row_id = int(ids[index[k]])
                bad[row_id] = batch["error"][k]
                warnings.warn(f"test image of id {row_id} could not be used ({batch['error'][k]}); its row is "
                              f"predicted from its category's most frequent values", stacklevel=2)
                scores[k] = fallback
            preds[index] = schema.predict(scores)  # 2 bytes per head and row: memory stays flat
    return submission_from_predictions(ids, categories, preds, schema), bad, ens["models"]


def predict_from_logits(run_dir: RunDir, test: pd.DataFrame, ens: dict) -> pd.DataFrame:
    """The submission from the test logits each fold saved at training time."""
    member_logits = {run: load_test_logits(run_dir, run, test[ID].to_numpy()) for run in ens["models"]}
    return make_submission(test[ID], test[CATEGORY], combine_members(member_logits, ens, run_dir.schema), run_dir.schema)


def infer(cfg: InferConfig) -> dict:
    """What ``python infer.py`` does; returns its summary."""
    start = time.perf_counter()
    run_dir, data_dir = RunDir(cfg.out_dir), Path(cfg.data_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    schema = run_dir.schema
    test = read_test(data_dir / "test.csv", schema.categories)
    ens = load_ensemble(run_dir, cfg.models)
    bad, served = {}, ens["models"]
    if cfg.from_logits:
        sub = predict_from_logits(run_dir, test, ens)
    else:
        sub, bad, served = predict_images(cfg, run_dir, test, ens, data_dir / "test_images")
    write_submission(sub, test, schema, cfg.output)
    seconds = time.perf_counter() - start
    result = solution_score(data_dir, sub, read_category_attributes(data_dir / "category_attributes.parquet"))
    source = "saved test logits" if cfg.from_logits else f"{cfg.backend}{' int8' if cfg.int8 else ''}" + \
        (" + hflip TTA" if cfg.tta_hflip else "")
    summary = pd.DataFrame([{"rows": len(sub), "served": "+".join(served), "source": source,
                             "bad_images": len(bad), "seconds": round(seconds, 1),
                             "images_per_s": round(len(sub) / seconds, 1)}])
    print("\n" + summary.to_string(index=False))
    if bad:
        print(f"{len(bad)} test image(s) could not be used; their rows hold the category's most frequent "
              f"values: ids {sorted(bad)[:10]}")
    print(f"wrote {cfg.output}" + (f"; score against test_solution.csv: {result:.4f}" if result is not None else ""))
    return {"submission": sub, "score": result, "bad": bad, "seconds": seconds}


"""Write submission.csv: the ensemble on the test images, streamed in batches.

    python infer.py                                   # demo run -> submission.csv
    python infer.py --data-dir data/real --out-dir runs/real --output subs/real.csv
    python infer.py --backend torch                   # PyTorch checkpoints instead of ONNX
    python infer.py --tta-hflip true                  # average with the mirrored image
    python infer.py --from-logits true                # from train.py's saved test logits, no images

Members, weights and biases come from ``<out-dir>/ensemble.json`` (equal weights without it).
The ONNX backend reads ``<out-dir>/onnx/manifest.json`` from ``export.py``. Images are decoded and
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

from utils.baseline import solution_score
from utils.blend import combine_members, load_ensemble
from utils.config import CommonConfig, parse_config
from utils.io import load_logits
from utils.schema import CATEGORY, ID, DataError, Schema, image_path, read_category_attributes, read_test
from utils.submission import make_submission, submission_from_predictions, write_submission
from utils.data import read_or_placeholder
from utils.transforms import build_transform


@dataclass
class InferConfig(CommonConfig):
    output: str = "submission.csv"
    backend: str = "onnx"  # onnx (export.py's models) or torch (the best.pt checkpoints)
    int8: bool = False  # onnx: the int8-quantised models (export.py --int8 true)
    from_logits: bool = False  # build the submission from train.py's test_logits.npz
    models: Optional[str] = None  # comma-separated runs; default: ensemble.json's, else every run
    tta_hflip: bool = False
    batch_size: int = 32
    workers: int = 2
    threads: int = 0  # compute threads (0 = every core)
    progress: bool = True


# ----------------------------------------------------------------------------- members

@dataclass
class Member:
    """One run of the ensemble: a callable per fold (normalised images -> logits), and the
    preprocessing its checkpoint describes."""
    run: str
    folds: list
    img_size: int
    resize: str
    mean: tuple
    std: tuple

    @property
    def prep(self) -> tuple:
        return (self.img_size, self.resize, tuple(self.mean), tuple(self.std))


def torch_members(ens: dict, schema: Schema) -> list[Member]:
    from utils.model import load_checkpoint

    members = []
    for run in ens["models"]:
        folds, meta = [], None
        for path in ens["folds"][run]:
            model, meta = load_checkpoint(path, schema)
            folds.append(lambda x, m=model: m.logits(torch.from_numpy(x)).float().numpy())
        members.append(Member(run, folds, meta["img_size"], meta["resize"], tuple(meta["mean"]), tuple(meta["std"])))
    return members


def onnx_members(out_dir: Path, ens: dict, schema: Schema, int8: bool, threads: int) -> tuple[list[Member], bool]:
    """Per-fold sessions, or one session of the merged ensemble graph when export.py found it
    faster (manifest ``use: merged``). Returns (members, merged)."""
    from utils.onnx_utils import make_session

    manifest_path = out_dir / "onnx" / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} not found: run `python export.py --out-dir {out_dir}` first, "
                        f"or use --backend torch")
    manifest = json.loads(manifest_path.read_text())
    if manifest["models"] != ens["models"]:
        raise DataError(f"{manifest_path} was exported for runs {manifest['models']}, but the ensemble is "
                        f"{ens['models']}; re-run export.py")
    suffix = "int8_path" if int8 else "path"
    if manifest.get("use") == "merged" and not int8:
        m = manifest["merged"]
        session = make_session(out_dir / "onnx" / m["path"], threads, schema)
        run = lambda x, s=session: s.run(None, {"image": x})[0]
        return [Member("ensemble", [run], m["img_size"], m["resize"], tuple(m["mean"]), tuple(m["std"]))], True
    members = []
    for entry in manifest["members"]:
        folds = []
        for fold in entry["folds"]:
            if suffix not in fold:
                raise DataError(f"{manifest_path}: no int8 model for {entry['run']}; run export.py --int8 true")
            session = make_session(out_dir / "onnx" / fold[suffix], threads, schema)
            folds.append(lambda x, s=session: s.run(None, {"image": x})[0])
        members.append(Member(entry["run"], folds, entry["img_size"], entry["resize"], tuple(entry["mean"]),
                              tuple(entry["std"])))
    return members, False


# ----------------------------------------------------------------------------- streaming

class TestImages(torch.utils.data.Dataset):
    """Each test image decoded once per distinct preprocessing, as in training (draft decode at the
    target size, then the evaluation transform)."""

    def __init__(self, ids, categories, images_dir: Path, preps: list[tuple]):
        self.ids, self.categories, self.images_dir = list(ids), list(categories), images_dir
        self.preps = preps
        self.transforms = [build_transform(size, mean, std, resize) for size, resize, mean, std in preps]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        images, error = [], ""
        for (size, resize, _, _), tf in zip(self.preps, self.transforms):
            image, problem = read_or_placeholder(image_path(self.images_dir, self.ids[i]), size, resize)
            error = error or problem
            images.append(torch.from_numpy(tf(image)))
        return {"images": images, "index": i, "ok": not error, "error": error}


def run_members(members: list[Member], images: dict, tta_hflip: bool) -> dict:
    """{run: [fold logits]} for one batch; TTA averages each fold's logits with the mirror's."""
    out = {}
    for m in members:
        x = images[m.prep]
        logits = []
        for fold in m.folds:
            z = fold(x)
            if tta_hflip:
                z = (z + fold(np.ascontiguousarray(x[..., ::-1]))) / 2
            logits.append(z)
        out[m.run] = logits
    return out


def predict_images(cfg: InferConfig, schema: Schema, test: pd.DataFrame, ens: dict, images_dir: Path):
    """Blended scores decoded batch by batch; memory holds one batch of images at a time, and
    each row's class indices. Returns (decoded rows, ids of bad images with their reasons)."""
    if cfg.backend == "torch":
        members, merged = torch_members(ens, schema), False
    elif cfg.backend == "onnx":
        members, merged = onnx_members(Path(cfg.out_dir), ens, schema, cfg.int8, cfg.threads)
    else:
        raise ValueError(f"backend must be onnx or torch, got {cfg.backend!r}")
    preps = sorted({m.prep for m in members})
    ids, categories = test[ID].to_numpy(), test[CATEGORY].to_numpy()
    dataset = TestImages(ids, categories, images_dir, preps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False)
    fallback = schema.prior_logits()
    preds, bad = np.empty((len(test), len(schema.heads)), dtype=np.int16), {}
    with torch.inference_mode():
        for batch in tqdm(loader, desc="infer", disable=not cfg.progress, dynamic_ncols=True):
            images = {p: batch["images"][k].numpy() for k, p in enumerate(preps)}
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
    return submission_from_predictions(ids, categories, preds, schema), bad


def predict_from_logits(cfg: InferConfig, schema: Schema, test: pd.DataFrame, ens: dict) -> pd.DataFrame:
    """The submission from the test logits each fold saved at training time."""
    position = pd.Series(np.arange(len(test)), index=test[ID])
    member_logits = {}
    for run, paths in ens["folds"].items():
        member_logits[run] = []
        for ckpt in paths:
            ids, logits = load_logits(ckpt.parent / "test_logits.npz", schema.fingerprint)
            if len(ids) != len(test) or not np.isin(ids, test[ID]).all():
                raise DataError(f"{ckpt.parent / 'test_logits.npz'}: its ids do not match test.csv")
            ordered = np.empty_like(logits)
            ordered[position[ids].to_numpy()] = logits
            member_logits[run].append(ordered)
    return make_submission(test[ID], test[CATEGORY], combine_members(member_logits, ens, schema), schema)


def main(cfg: InferConfig) -> dict:
    start = time.perf_counter()
    out_dir, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    schema = Schema.load(out_dir / "schema.json")
    test = read_test(data_dir / "test.csv", schema.categories)
    ens = load_ensemble(out_dir, schema, cfg.models.split(",") if cfg.models else None)
    bad = {}
    if cfg.from_logits:
        sub = predict_from_logits(cfg, schema, test, ens)
    else:
        sub, bad = predict_images(cfg, schema, test, ens, data_dir / "test_images")
    write_submission(sub, test, schema, cfg.output)
    seconds = time.perf_counter() - start
    attrs = read_category_attributes(data_dir / "category_attributes.parquet")
    result = solution_score(data_dir, sub, attrs)
    source = "saved test logits" if cfg.from_logits else f"{cfg.backend}{' int8' if cfg.int8 else ''}" + \
        (" + hflip TTA" if cfg.tta_hflip else "")
    summary = pd.DataFrame([{"rows": len(sub), "members": len(ens["models"]), "source": source,
                             "bad_images": len(bad), "seconds": round(seconds, 1),
                             "images_per_s": round(len(sub) / seconds, 1)}])
    print("\n" + summary.to_string(index=False))
    if bad:
        print(f"{len(bad)} test image(s) could not be used; their rows hold the category's most frequent "
              f"values: ids {sorted(bad)[:10]}")
    print(f"wrote {cfg.output}" + (f"; score against test_solution.csv: {result:.4f}" if result is not None else ""))
    return {"submission": sub, "score": result, "bad": bad, "seconds": seconds}


if __name__ == "__main__":
    main(parse_config(InferConfig, description=__doc__))

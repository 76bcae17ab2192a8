"""A run folder's members scored on a larger held-out sample than the one they were trained beside.

A thousand held-out photos give a score whose standard error is about 0.009 in accuracy: the
difference between two members, or a blend and its best member, is often within it. Here each
fold's ``best.pt`` predicts the ``test.csv`` of ``--data-dir``, a dataset with the run's train rows
and another, larger test set (for Fashion-MNIST: the same ``train.csv``, 10,000 official test
photos), and the table sets every run's scores beside its OOF score:

    python -m utils.tools.real_data --out data/real10k --n-train 2000 --n-test 10000
    cp data/real/train.csv data/real10k/train.csv        # the same train rows: the run's folds hold
    python -m utils.bench.heldout --data-dir data/real10k --out-dir runs/fit_10m [--ensembles a.json,b.json]

Per run: its OOF score, each fold alone held out (the mean over folds: what the OOF estimates), the
difference, and the folds averaged. Then the blends: the run folder's ``ensemble.json``, any
``--ensembles`` over the same runs, and what export.py chose to serve (``onnx/manifest.json``). A
fold's logits on this test set are cached in ``<out-dir>/heldout/<data-dir name>/`` (made again
when its checkpoint's content changes); a fold whose own ``test_logits.npz`` already covers these ids (a run
trained with this data folder) is read, not predicted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from utils import provenance
from utils.bench.fit import accuracy
from utils.blend import combine_members, head_log_softmax, load_ensemble, load_test_logits
from utils.config import DataConfig, option, run_command
from utils.data.dataset import TestImages
from utils.data.schema import CATEGORY, ID, read_category_attributes, read_test
from utils.errors import DataError
from utils.io import load_logits, save_logits
from utils.metric import score_logits, solution_score
from utils.run import RunDir
from utils.serve.manifest import Manifest
from utils.serve.members import run_members, served_ensemble, torch_members
from utils.serve.submission import make_submission


@dataclass
class HeldOutConfig(DataConfig):
    out_dir: str = option("runs/demo", "the run folder whose runs are scored")
    models: list[str] = option(help="runs (a,b); default: those of the run folder's ensemble.json", factory=list)
    ensembles: list[str] = option(help="more ensemble.json files over these runs, scored beside the run "
                                       "folder's", factory=list)
    batch_size: int = option(64, "images per batch")
    workers: int = option(1, "data loader worker processes")
    progress: bool = option(True, "progress bars")


def fold_logits(cfg: HeldOutConfig, run_dir: RunDir, run: str, test: pd.DataFrame) -> list[np.ndarray]:
    """Each fold's raw logits on ``test`` [T, L] in its row order: the fold's own test logits when
    they cover exactly these ids, else the cache, else predicted from best.pt (and cached). Both
    files are checked against the checkpoint they were made from (``utils.provenance``)."""
    schema, ids = run_dir.schema, test[ID].to_numpy()
    cache = run_dir.path / "heldout" / Path(cfg.data_dir).name / run
    out, missing = {}, []
    for k in range(run_dir.n_folds):
        cached = cache / f"fold{k}.npz"
        try:
            if run_dir.fold_file(run, k, "test_logits.npz").is_file():  # a run trained with this data folder
                out[k] = load_test_logits(run_dir, run, ids, folds=[k])[0]
                continue
        except DataError:  # other ids, or stale
            pass
        if cached.is_file() and not provenance.changes(provenance.read(cached), run_dir.path):
            got, logits = load_logits(cached, schema.fingerprint)
            if np.array_equal(got, ids):
                out[k] = logits
                continue
        missing.append(k)
    if missing:
        ckpts = [run_dir.fold_file(run, k, "best.pt") for k in missing]
        ens = {"models": [run], "folds": {run: ckpts}}
        member = torch_members(ens, schema)[0]
        loader = torch.utils.data.DataLoader(TestImages(ids, Path(cfg.data_dir) / "test_images", [member.prep]),
                                             batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False)
        parts = [[] for _ in missing]
        with torch.inference_mode():
            for batch in tqdm(loader, desc=f"{run} on {len(ids)} images", disable=not cfg.progress, dynamic_ncols=True):
                if not batch["ok"].all():
                    bad = int(ids[batch["index"][~batch["ok"]][0]])
                    raise DataError(f"test image of id {bad} in {cfg.data_dir} could not be read: a held-out "
                                    "comparison needs every image")
                images = {member.prep: member.prep.normalize(batch["images"][0]).numpy()}
                for part, logits in zip(parts, run_members([member], images)[run]):
                    part.append(logits)
        cache.mkdir(parents=True, exist_ok=True)
        rebuild = f"python -m utils.bench.heldout --data-dir {cfg.data_dir} --out-dir {{root}}"
        for k, ckpt, part in zip(missing, ckpts, parts):
            out[k] = np.concatenate(part)
            save_logits(cache / f"fold{k}.npz", ids, out[k], schema.fingerprint, k,
                        provenance.record([ckpt], run_dir.path, rebuild))
    return [out[k] for k in range(run_dir.n_folds)]


def main(cfg: HeldOutConfig) -> pd.DataFrame:
    run_dir, data_dir = RunDir(cfg.out_dir), Path(cfg.data_dir)
    schema = run_dir.schema
    test = read_test(data_dir / "test.csv", schema.categories)
    solution = pd.read_csv(data_dir / "test_solution.csv") if (data_dir / "test_solution.csv").is_file() else None
    if solution is None or set(solution[ID]) != set(test[ID]):
        raise DataError(f"{data_dir}/test_solution.csv must label every id of its test.csv")
    targets = schema.encode(solution.set_index(ID).loc[test[ID]].reset_index())
    attrs = read_category_attributes(data_dir / "category_attributes.parquet")
    ensembles = {"ensemble.json": load_ensemble(run_dir)} if run_dir.ensemble_path.is_file() else {}
    for path in cfg.ensembles:
        spec = json.loads(Path(path).read_text())
        ens = load_ensemble(run_dir, spec["models"])
        ensembles[Path(path).name] = {**ens, "weights": np.asarray(spec["weights"]),
                                      "biases": np.asarray(spec["biases"], dtype=np.float32)}
    served = Manifest.read(run_dir).serve if run_dir.manifest_path.is_file() else None
    if served:  # export.py's choice: its members, weights and biases, every fold or the first
        ensembles["served (" + ("its first fold" if served["folds"] == "one" else "every fold") + ")"] = {
            **served_ensemble(served), "first_fold": served["folds"] == "one"}
    runs = cfg.models or next(iter(ensembles.values()), {}).get("models") or run_dir.complete_runs()
    runs = list(dict.fromkeys(runs + [r for e in ensembles.values() for r in e["models"]]))
    logits = {run: fold_logits(cfg, run_dir, run, test) for run in runs}

    def held_out(scores: np.ndarray) -> tuple[float, float]:
        sub = make_submission(test[ID], test[CATEGORY], scores, schema)
        return solution_score(data_dir, sub, attrs), accuracy(data_dir, sub)

    rows = []
    for run in runs:
        oof = json.loads((run_dir.path / run / "oof_score.json").read_text())["oof_score"]
        alone = float(np.mean([score_logits(schema, targets, z)[0] for z in logits[run]]))
        score, acc = held_out(np.mean([head_log_softmax(z, schema) for z in logits[run]], axis=0))
        rows.append({"what": run, "OOF": oof, "one fold held out": alone, "one fold - OOF": alone - oof,
                     "folds averaged": score, "accuracy": acc})
    for name, ens in ensembles.items():
        members = {run: z[:1] for run, z in logits.items()} if ens.get("first_fold") else logits
        score, acc = held_out(combine_members(members, ens, schema))
        weights = np.asarray(ens["weights"], dtype=float).reshape(len(ens["models"]), -1).mean(axis=1)
        rows.append({"what": f"{name}: " + ", ".join(f"{r} {w / weights.sum():.2f}"
                                                     for r, w in zip(ens["models"], weights)),
                     "folds averaged": score, "accuracy": acc})
    table = pd.DataFrame(rows)
    print(f"\n{len(test)} held-out rows of {data_dir}; runs of {run_dir.path}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
    return table


if __name__ == "__main__":
    run_command(main, HeldOutConfig, __doc__)

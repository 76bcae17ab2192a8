"""K-fold training of any timm backbone with one head per (category, attribute).

    python train.py --model efficientnet_b0 --fold 0          # fold 0, trained on the others
    python train.py --model resnet18 --fold all               # every fold in turn
    python train.py --model resnet18 --fold all --resume      # continue after an interruption
    python train.py --model densenet121 --config configs/demo.yaml --epochs 3 --img-size 128
    torchrun --nproc_per_node 2 train.py --model resnet18 --fold 0   # DistributedDataParallel

Config: defaults below < configs/<model>.yaml < --config files < flags (see utils/config.py).
Writes, in <out_dir>/<name>/fold<k>/ (name defaults to the model):
  best.pt            the best checkpoint; describes itself (model, args, image size, mean/std, schema)
  last.pt            the latest epoch's full state, for --resume
  oof_logits.npz     logits of the fold's validation rows, with their ids (utils/io.py)
  test_logits.npz    logits of every test row, with their ids
  history.csv/.png   one row per epoch: loss, val score, learning rates, images/s
  metrics.json       best epoch, val score, per-head table, bad images
  config.yaml        the resolved config
When every fold of a run is done, the run's OOF score over the whole train set is printed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from utils.config import CommonConfig, parse_config, save_config
from utils.data import EpochSampler, ImageDataset, balanced_weights, make_loader
from utils.engine import predict, train_one_epoch
from utils.folds import prepare_run
from utils.blend import load_oof
from utils.io import atomic_path, atomic_torch_save, atomic_write_csv, atomic_write_json, load_torch, save_logits
from utils.metric import score_logits, summarize
from utils.model import AttributeModel, HeadLoss, build_optimizer, load_checkpoint, warmup_cosine
from utils.schema import CATEGORY, ID, DataError, Schema, image_path, read_dataset
from utils.transforms import DEFAULT_AUG, DEFAULT_CATEGORY_AUG, build_transform


@dataclass
class TrainConfig(CommonConfig):
    model: str = "efficientnet_b0"  # any timm model name
    name: Optional[str] = None  # run name under out_dir (default: the model name)
    fold: str = "0"  # a fold number, or "all"
    n_folds: int = 5
    train_csv: Optional[str] = None  # replaces <data_dir>/train.csv, e.g. an augmented_train.csv
    # model
    pretrained: bool = False  # timm weights from the Hugging Face hub (needs network)
    pretrained_file: Optional[str] = None  # or a local weights file
    dropout: float = 0.2
    drop_path_rate: float = 0.0
    # preprocessing
    img_size: int = 224
    resize: str = "squash"  # squash to a square (as the seed), or pad keeping the aspect ratio
    draft: bool = True  # decode JPEGs at reduced scale when the target size allows
    aug: dict = field(default_factory=lambda: dict(DEFAULT_AUG))
    category_aug: dict = field(default_factory=lambda: dict(DEFAULT_CATEGORY_AUG))
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr_backbone: float = 3e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0  # gradual unfreezing: train the heads alone for this many epochs
    clip_grad: float = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16), bf16, fp16, off
    # class imbalance
    loss: str = "ce"  # ce, weighted_ce, focal, logit_adjusted (measured in the README)
    loss_tau: float = 1.0  # logit_adjusted: strength of the prior shift
    weight_cap: float = 10.0  # weighted_ce / balanced sampler: largest class weight
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    balanced_sampler: bool = False
    # control
    patience: int = 3  # early stopping on the val score; 0 = off
    tta_hflip: bool = False  # average with the mirrored image for OOF and test logits
    predict_test: bool = True  # write test_logits.npz (tune.py turns it off)
    max_bad_images: float = 0.01  # stop when a larger share of the train images is unreadable
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    stop_after: int = 0  # stop cleanly after this many epochs in this run (then --resume); 0 = never
    progress: bool = True


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE: DDP with NCCL on CUDA, gloo on CPU. Plain runs: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    return Dist(rank, world, dev)


def gather_rows(indices: np.ndarray, logits: np.ndarray, d: Dist) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's (indices, logits) and order them by index."""
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, (indices, logits))
        indices = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts])
    order = np.argsort(indices, kind="stable")
    indices, logits = indices[order], logits[order]
    keep = np.concatenate([[True], indices[1:] != indices[:-1]])  # padding repeats rows
    return indices[keep], logits[keep]


# ----------------------------------------------------------------------------- helpers

def amp_dtype(amp: str, device: torch.device):
    """auto: bf16 on CUDA, and on a CPU with native bf16 (1.5x faster training here, see README);
    off on other CPUs, where emulated bf16 is slower than fp32."""
    if amp == "auto" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if amp == "off":
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")


def row_paths(table: pd.DataFrame, images_dir: Path, csv_dir: Path | None = None) -> list[Path]:
    """Image path of every row: ``image`` column (relative to the CSV) when present, else by id."""
    if "image" in table and csv_dir is not None:
        return [csv_dir / p if isinstance(p, str) else image_path(images_dir, i)
                for p, i in zip(table["image"], table[ID])]
    return [image_path(images_dir, i) for i in table[ID]]


def model_args(cfg: TrainConfig, schema: Schema) -> dict:
    return {"backbone": cfg.model, "head_widths": [h.width for h in schema.heads],
            "dropout": cfg.dropout, "drop_path_rate": cfg.drop_path_rate}


def data_config(backbone: torch.nn.Module) -> tuple[list[float], list[float]]:
    """Mean and std from the backbone's pretrained config, resolved by timm (written once)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    return [float(x) for x in cfg["mean"]], [float(x) for x in cfg["std"]]


def save_history_plot(history: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(history["epoch"], history["train_loss"], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss")
    ax[1].plot(history["epoch"], history["val_score"], marker="o", color="C1")
    ax[1].set(xlabel="epoch", ylabel="val score")
    fig.suptitle(str(path.parent))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def print_table(title: str, table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 140, "display.max_rows", 200,
                           "display.float_format", "{:.4f}".format):
        print(f"\n{title}\n{table.to_string(index=False)}")


# ----------------------------------------------------------------------------- one fold

def split_fold(train: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of a fold. Augmented copies carry their source's fold, so a
    copy of a validation image is never trained on; and only original images are validated."""
    is_original = (train["source_id"] == train[ID]) if "source_id" in train else pd.Series(True, index=train.index)
    trn = train[train["fold"] != fold].reset_index(drop=True)
    val = train[(train["fold"] == fold) & is_original].reset_index(drop=True)
    return trn, val


def train_fold(cfg: TrainConfig, schema: Schema, train: pd.DataFrame, data, fold: int, d: Dist,
               report=None) -> dict:
    """Train one fold; write its outputs; return its metrics. ``report(epoch, score)`` is called
    after every epoch (tune.py uses it for pruning)."""
    run_dir = Path(cfg.out_dir) / (cfg.name or cfg.model) / f"fold{fold}"
    metrics_path = run_dir / "metrics.json"
    if cfg.resume and metrics_path.is_file():
        done = json.loads(metrics_path.read_text())
        if d.main:
            print(f"fold {fold}: already complete (val score {done['val_score']:.4f}); skipped")
        return done
    torch.manual_seed(cfg.seed)
    trn, val = split_fold(train, fold)
    if len(val) == 0 or len(trn) == 0:
        raise DataError(f"fold {fold} has {len(trn)} train and {len(val)} validation rows")
    trn_targets, val_targets = schema.encode(trn), schema.encode(val)

    loss = HeadLoss(schema, cfg.loss, weight_cap=cfg.weight_cap, gamma=cfg.focal_gamma,
                    tau=cfg.loss_tau, label_smoothing=cfg.label_smoothing)
    model = AttributeModel(pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file, loss=loss,
                           **model_args(cfg, schema))
    mean, std = data_config(model.backbone)
    model.to(d.device)
    csv_dir = Path(cfg.train_csv).parent if cfg.train_csv else data.root
    common = dict(img_size=cfg.img_size, resize=cfg.resize, draft=cfg.draft)
    train_tf = build_transform(cfg.img_size, mean, std, cfg.resize, train=True, aug=cfg.aug,
                               category_aug=cfg.category_aug, categories=schema.categories)
    eval_tf = build_transform(cfg.img_size, mean, std, cfg.resize)
    trn_ds = ImageDataset(row_paths(trn, data.train_images, csv_dir), trn[CATEGORY], trn_targets,
                          train_tf, augment_seed=cfg.seed + fold, **common)
    weights = balanced_weights(trn_targets, schema, cap=cfg.weight_cap) if cfg.balanced_sampler else None
    sampler = EpochSampler(len(trn_ds), cfg.seed + fold, d.rank, d.world, weights)
    per_rank_batch = max(1, cfg.batch_size // d.world)
    trn_loader = make_loader(trn_ds, per_rank_batch, cfg.workers, sampler, drop_last=len(trn_ds) > per_rank_batch)

    def shard(table, images_dir, base=None):
        ds = ImageDataset(row_paths(table, images_dir, base), table[CATEGORY], None, eval_tf, **common)
        part = torch.utils.data.Subset(ds, list(range(d.rank, len(ds), d.world)))
        return make_loader(part, per_rank_batch, cfg.workers)

    val_loader = shard(val, data.train_images, csv_dir)
    steps_per_epoch = len(trn_loader)
    optimizer = build_optimizer(model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
    dtype = amp_dtype(cfg.amp, d.device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=cfg.freeze_epochs > 0)

    state = {"epoch": -1, "best_score": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    last_path = run_dir / "last.pt"
    if cfg.resume and last_path.is_file():
        last = load_torch(last_path)
        schema.check_same(Schema.from_dict(last["schema"]), f"checkpoint {last_path}")
        model.load_state_dict(last["state_dict"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        state = {k: last[k] for k in state}
        if d.main:
            print(f"fold {fold}: resuming after epoch {state['epoch']} (best {state['best_score']:.4f})")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    meta = {"model": cfg.model, "model_args": model_args(cfg, schema), "img_size": cfg.img_size,
            "resize": cfg.resize, "mean": mean, "std": std, "schema": schema.to_dict(),
            "fingerprint": schema.fingerprint, "fold": fold, "config": dataclasses.asdict(cfg)}
    bad: dict = {}
    epochs_this_run = 0
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: the same with or without resume
        sampler.set_epoch(epoch)
        trn_ds.set_epoch(epoch)
        model.freeze_backbone(epoch < cfg.freeze_epochs)
        stats = train_one_epoch(net, trn_loader, optimizer, scheduler, d.device, amp_dtype=dtype,
                                scaler=scaler, clip_grad=cfg.clip_grad, ids=trn[ID].to_numpy(), bad=bad,
                                desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", progress=cfg.progress and d.main)
        if len(bad) > cfg.max_bad_images * len(trn):
            raise DataError(f"{len(bad)} of {len(trn)} train images are unreadable (more than "
                            f"max_bad_images={cfg.max_bad_images}), e.g. ids {sorted(bad)[:5]}")
        idx, logits = gather_rows(*predict(model, val_loader, d.device, amp_dtype=dtype,
                                           desc="validate", progress=cfg.progress and d.main), d)
        val_score, _ = score_logits(schema, val_targets[idx], logits)
        lrs = scheduler.get_last_lr()
        state["history"].append({"epoch": epoch + 1, "train_loss": stats["loss"], "val_score": val_score,
                                 "lr_backbone": lrs[0], "lr_head": lrs[2],
                                 "images_per_s": stats["images_per_s"] * d.world,
                                 "seconds": stats["seconds"], "frozen": epoch < cfg.freeze_epochs})
        improved = val_score > state["best_score"]
        if improved:
            state.update(best_score=val_score, best_epoch=epoch + 1, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        if d.main:
            if improved:
                atomic_torch_save(run_dir / "best.pt", {**meta, "state_dict": model.state_dict(),
                                                        "epoch": epoch + 1, "val_score": val_score})
            atomic_torch_save(last_path, {**state, "state_dict": model.state_dict(), "schema": schema.to_dict(),
                                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "scaler": scaler.state_dict() if scaler else {}})
            history = pd.DataFrame(state["history"])
            atomic_write_csv(run_dir / "history.csv", history)
            save_history_plot(history, run_dir / "history.png")
            print(f"fold {fold} epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f}  val "
                  f"{val_score:.4f}{' *' if improved else ''}  {stats['images_per_s'] * d.world:.1f} img/s")
        if report is not None:
            report(epoch, val_score)
        epochs_this_run += 1
        if cfg.patience and state["bad_epochs"] >= cfg.patience:
            if d.main:
                print(f"fold {fold}: early stop, no improvement for {cfg.patience} epochs")
            break
        if cfg.stop_after and epochs_this_run >= cfg.stop_after and epoch + 1 < cfg.epochs:
            if d.main:
                print(f"fold {fold}: stopped after {epochs_this_run} epoch(s) (stop_after); continue with --resume")
            return {"stopped": True, **state}

    # the best checkpoint writes the fold's OOF and test logits
    best_path = run_dir / "best.pt"
    if d.world > 1:
        dist.barrier()
    best, _ = load_checkpoint(best_path, schema)
    best.to(d.device)
    idx, oof = gather_rows(*predict(best, val_loader, d.device, amp_dtype=dtype, hflip=cfg.tta_hflip,
                                    desc="OOF", progress=cfg.progress and d.main), d)
    if cfg.predict_test:
        test_loader = shard(data.test, data.test_images)
        test_idx, test_logits = gather_rows(*predict(best, test_loader, d.device, amp_dtype=dtype, hflip=cfg.tta_hflip,
                                                     desc="test", progress=cfg.progress and d.main), d)
    final, table = score_logits(schema, val_targets[idx], oof)
    metrics = {"fold": fold, "val_score": final, "best_epoch": state["best_epoch"],
               "epochs_run": state["epoch"] + 1, "bad_images": {str(k): v for k, v in sorted(bad.items())},
               "per_head": table.to_dict(orient="records")}
    if d.main:
        save_logits(run_dir / "oof_logits.npz", val[ID].to_numpy()[idx], oof, schema.fingerprint, fold)
        if cfg.predict_test:
            save_logits(run_dir / "test_logits.npz", data.test[ID].to_numpy()[test_idx], test_logits,
                        schema.fingerprint, fold)
        atomic_write_json(metrics_path, metrics)  # written last: its presence marks the fold complete
        if bad:
            print(f"fold {fold}: {len(bad)} unreadable image(s) skipped: ids {sorted(bad)[:10]}")
    return metrics


def report_oof(run_root: Path, schema: Schema, train: pd.DataFrame, n_folds: int) -> float | None:
    """When every fold of a run is done: its OOF score over the whole train set, printed."""
    if not all((run_root / f"fold{k}" / "oof_logits.npz").is_file() for k in range(n_folds)):
        return None
    originals = train[train["source_id"] == train[ID]] if "source_id" in train else train
    ids = originals[ID].to_numpy()
    logits = load_oof(run_root.parent, [run_root.name], schema, ids, n_folds)[0]  # checks coverage
    final, table = score_logits(schema, schema.encode(originals), logits)
    _, per_cat = summarize(table)
    print_table(f"{run_root.name}: OOF over {len(ids)} train rows ({n_folds} folds)", per_cat)
    print(f"{run_root.name} OOF score: {final:.4f}")
    atomic_write_json(run_root / "oof_score.json", {"oof_score": final, "per_category": per_cat.to_dict(orient="records")})
    return final


def main(cfg: TrainConfig) -> dict:
    d = setup_distributed(cfg.device)
    if d.world > 1 or cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    data = read_dataset(cfg.data_dir, cfg.train_csv)
    if d.main:  # rank 0 fits and writes schema.json and folds.csv; the others read them
        schema, train = prepare_run(data, cfg.out_dir, cfg.n_folds, cfg.seed)
    if d.world > 1:
        dist.barrier()
        if not d.main:
            schema, train = prepare_run(data, cfg.out_dir, cfg.n_folds, cfg.seed)
    folds = list(range(cfg.n_folds)) if cfg.fold == "all" else [int(cfg.fold)]
    if any(not 0 <= k < cfg.n_folds for k in folds):
        raise ValueError(f"fold must be 'all' or in 0..{cfg.n_folds - 1}, got {cfg.fold!r}")
    start = time.perf_counter()
    results = {}
    for k in folds:
        results[k] = train_fold(cfg, schema, train, data, k, d)
    if d.main:
        rows = [{"fold": k, "val_score": r.get("val_score", r.get("best_score")), "best_epoch": r.get("best_epoch")}
                for k, r in results.items()]
        print_table(f"{cfg.name or cfg.model}: folds ({time.perf_counter() - start:.0f} s)", pd.DataFrame(rows))
        report_oof(Path(cfg.out_dir) / (cfg.name or cfg.model), schema, train, cfg.n_folds)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShiftScaleRotate.*")
        main(parse_config(TrainConfig, model_config=True, description=__doc__))

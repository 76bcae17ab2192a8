"""The frozen-feature route (``frozen_backbone: true``): the cheap way to a CLIP-scale backbone on
a CPU. Every train and test image is embedded once by the frozen backbone (the plain image, plus
``frozen_views`` augmented views of each train image), the embeddings are cached, and only the
heads train on them: many epochs in seconds. ``head: knn`` trains nothing at all: a k-nearest
neighbour vote over the fold's train embeddings.

The cache is ``<out_dir>/embeddings/<key>.npz``. The key hashes everything an embedding depends
on: the model and its arguments (``model_kwargs``, keep_head, the image size), its weights as
loaded (a digest of the backbone's state, whether they came from ``pretrained_file``, the hub or
a seed), the autocast dtype, timm's and torch's versions, the preprocessing, the views with their
augmentation and seed, and every image file embedded (name, size, modification time). A change to
any of them is another key, so the embeddings are computed again, and the run says so; folds and
heads on the same backbone share one file.

A fold writes what a fine-tuned fold writes: best.pt (the backbone's weights with the trained
heads, or the kNN bank), OOF and test logits, metrics.json; ensemble.py, export.py and infer.py
take it unchanged: what it shares with the fine-tuned route (rows, model, record, checkpoints,
outputs) is the ``Fold`` it is given (utils/train/fold.py). Under torchrun, rank 0 embeds while the
others wait; heads train in every rank (identically) and rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils import provenance
from utils.data.dataset import ImageDataset, make_loader
from utils.data.schema import CATEGORY, ID, IGNORE_INDEX, image_path, row_paths
from utils.io import atomic_write
from utils.train.engine import autocast, model_input, train_step
from utils.train.fold import Fold
from utils.train.model import WarmupCosine, load_checkpoint, retarget

UNUSABLE = "unusable image (embedded as a grey placeholder)"


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (every tensor's name, dtype, shape and bytes): whatever decided the
    weights (a file, the hub, a seed, a conversion), the same weights give the same digest."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(backbone: torch.nn.Module, arch: dict, views: int, view_aug: list | None, prep, paths: list[Path],
              dtype) -> str:
    """A hash of everything the embeddings depend on: the backbone's architecture arguments (``arch``:
    model, model_kwargs, keep_head, img_size) and its weights as loaded (``state_digest``), the
    autocast dtype, timm's and torch's versions, the preprocessing, the ``views`` with their
    augmentation and seed (``view_aug``), and every image file. (``layout``: the cache file's own
    format, raised when its arrays change so an older cache is rebuilt, not misread.)"""
    import timm

    what = {"layout": 3, **arch, "weights": state_digest(backbone), "dtype": str(dtype),
            "timm": timm.__version__, "torch": torch.__version__, "preprocess": prep.to_dict(),
            "views": views, "aug": view_aug if views else None, "images": provenance.files_digest(paths)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FrozenFold:
    """Trains ``fold``'s heads on cached embeddings of its frozen backbone: to the epoch loop, a route
    like the fine-tuned one (an epoch of training, predictions, the best checkpoint's model)."""

    def __init__(self, fold: Fold):
        self.fold = f = fold
        cfg = f.cfg
        f.model.freeze_backbone(True)
        self.cache = self.embeddings(f.table)
        self.trn_x, self.trn_t = self.training_embeddings()
        self.val_x, _ = self.rows_of(f.val, None, views=False)
        if cfg.head == "knn":
            self.fill_bank()
        self.epochs = 1 if cfg.head == "knn" else cfg.epochs  # a kNN vote trains nothing
        self.steps_per_epoch = steps = -(-len(self.trn_x) // cfg.batch_size)
        heads = [p for p in f.model.heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": heads, "lr": cfg.lr_head, "role": "head"}],
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.epochs * steps, int(cfg.warmup_epochs * steps)))
        self.scaler = None  # heads train in fp32

    # -- the cache
    def embeddings(self, train: pd.DataFrame) -> dict:
        """{"train" [N, F], "views" [V, N, F], "test" [T, F]} in the order of the original train rows
        and of test.csv: from the cache when its key matches, else computed (by rank 0) and cached."""
        f, cfg = self.fold, self.fold.cfg
        originals = train[train["source_id"] == train[ID]] if "source_id" in train else train
        train_paths = row_paths(originals, f.data.train_images, f.csv_dir)
        test_paths = [image_path(f.data.test_images, i) for i in f.data.test[ID]]
        arch = {"model": cfg.model, **{k: f.model_args[k] for k in ("model_kwargs", "keep_head", "img_size")}}
        key = cache_key(f.model.backbone, arch, cfg.frozen_views, [cfg.aug, cfg.category_aug, cfg.seed], f.prep,
                        train_paths + test_paths, f.dtype)
        self.cache_path = path = f.run_dir.path / "embeddings" / f"{key}.npz"
        if f.d.main:
            if path.is_file():
                print(f"fold {f.fold}: embeddings reused from {path}")
            else:
                self.embed_all(originals, train_paths, test_paths, path)
        f.d.barrier()
        with np.load(path, allow_pickle=False) as z:
            cache = {k: z[k] for k in z.files}
        cache["position"] = {int(i): k for k, i in enumerate(cache["train_ids"])}
        return cache

    @torch.no_grad()
    def embed(self, paths, categories, transform, seed=None) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, F], usable [N]): an unusable image is embedded as the grey placeholder."""
        f = self.fold
        ds = ImageDataset(paths, categories, None, transform, f.prep, augment_seed=seed)
        backbone, out, ok = f.model.backbone.eval(), [], []
        for batch in make_loader(ds, max(f.per_rank_batch, 64), f.workers, device=f.d.device):
            with autocast(f.d.device, f.dtype):
                x = model_input(batch["image"], f.prep, f.d.device, f.channels_last)
                out.append(backbone(x).float().cpu())
            ok.append(batch["ok"])
        return torch.cat(out).numpy(), torch.cat(ok).numpy()

    def embed_all(self, originals: pd.DataFrame, train_paths, test_paths, path: Path) -> None:
        f, cfg = self.fold, self.fold.cfg
        start, cats = time.perf_counter(), originals[CATEGORY].tolist()
        plain, usable = self.embed(train_paths, cats, f.prep.transform())
        train_tf = f.prep.transform(train=True, aug=cfg.aug, category_aug=cfg.category_aug,
                                    categories=f.schema.categories)
        views = [self.embed(train_paths, cats, train_tf, seed=cfg.seed + 1000 * (v + 1))[0]
                 for v in range(cfg.frozen_views)]
        test, test_usable = self.embed(test_paths, f.data.test[CATEGORY].tolist(), f.prep.transform())
        arrays = {"train_ids": originals[ID].to_numpy(), "train": plain, "train_usable": usable,
                  "test_ids": f.data.test[ID].to_numpy(), "test": test, "test_usable": test_usable,
                  "views": np.stack(views) if views else np.zeros((0,) + plain.shape, np.float32)}
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
        print(f"fold {f.fold}: embedded {len(plain)} train images ({cfg.frozen_views} augmented view(s) each) "
              f"and {len(test)} test images in {time.perf_counter() - start:.1f} s; cached in {path}")

    def positions(self, table: pd.DataFrame) -> np.ndarray:
        """The cache rows of a table's rows (an augmented copy takes its source's)."""
        source = table["source_id"] if "source_id" in table else table[ID]
        return np.array([self.cache["position"][int(i)] for i in source], dtype=np.int64)

    def rows_of(self, table: pd.DataFrame, targets, views: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of a table's rows (an augmented copy takes its source's), with every view."""
        rows = self.positions(table)
        stacks = [self.cache["train"]] + (list(self.cache["views"]) if views else [])
        x = torch.from_numpy(np.concatenate([s[rows] for s in stacks]))
        t = None if targets is None else torch.from_numpy(np.concatenate([targets] * len(stacks)))
        return x, t

    def usable_targets(self, usable: np.ndarray) -> np.ndarray:
        """The fold's train targets, with an unusable image's labels ignored (as fine-tuning does),
        counted in ``bad``, and past ``max_bad_images`` an error."""
        f = self.fold
        targets = f.rows["targets"][: len(f.trn)].copy()
        targets[~usable] = IGNORE_INDEX
        f.bad = {("train", int(i)): UNUSABLE for i in f.trn[ID][~usable]}
        f.check_bad()
        return targets

    def training_embeddings(self) -> tuple[torch.Tensor, torch.Tensor | dict]:
        """The fold's train rows (every view) and their targets; for a student (``teacher``), the
        teacher's probabilities too, and the test images' embeddings as unlabelled rows."""
        f = self.fold
        n, usable = len(f.trn), self.cache["train_usable"][self.positions(f.trn)]
        x, hard = self.rows_of(f.trn, self.usable_targets(usable), views=True)
        if not f.cfg.teacher:
            return x, hard
        views = len(x) // n
        repeat = lambda a: torch.from_numpy(np.concatenate([np.asarray(a)] * views))
        heads = f.rows["soft_heads"][:n] & usable[:, None]  # an unusable image learns nothing from the teacher
        targets = {"hard": hard, "soft": repeat(f.rows["soft"][:n]), "soft_heads": repeat(heads)}
        if len(f.rows["ids"]) > n:  # distill_test: the test rows, in test.csv order, as student_rows appends them
            x = torch.cat([x, torch.from_numpy(self.cache["test"])])
            test_usable = self.cache["test_usable"]  # an unusable test image learns nothing either, as fine-tuning
            f.bad.update({("test", int(i)): UNUSABLE for i in self.cache["test_ids"][~test_usable]})
            for key, extra in (("hard", f.rows["targets"][n:]), ("soft", f.rows["soft"][n:]),
                               ("soft_heads", f.rows["soft_heads"][n:] & test_usable[:, None])):
                targets[key] = torch.cat([targets[key], torch.as_tensor(extra).to(targets[key].dtype)])
        return x, targets

    def fill_bank(self) -> None:
        """The kNN bank: the fold's original train rows with a usable image (plain embeddings), each
        once, and their labels. An augmented copy (augment.py) takes its source's embedding, so it
        would repeat its source's vote; an unusable image is a grey placeholder, which would vote
        with a label it does not show. The bank's size goes into the checkpoint's model arguments."""
        f, n = self.fold, len(self.fold.trn)
        original = (f.trn["source_id"] == f.trn[ID]).to_numpy() if "source_id" in f.trn else np.ones(n, bool)
        keep = original & self.cache["train_usable"][self.positions(f.trn)]
        onehot = torch.from_numpy(f.schema.one_hot(f.rows["targets"][:n][keep]))
        counts, prior = onehot.sum(0), torch.zeros(f.schema.n_logits)
        for h in f.schema.heads:
            prior[h.logits] = counts[h.logits] / counts[h.logits].sum().clamp(min=1)
        f.model.heads.fill(self.trn_x[:n][torch.from_numpy(keep)], onehot, prior)
        f.model_args["knn_bank"] = int(keep.sum())

    # -- what the epoch loop (utils/train/kfold.py) asks of a route
    save_each_epoch = False  # an epoch takes a fraction of a second: the loop keeps the best weights in
    # memory and writes the checkpoints once, when training stops (an interrupted fold trains its heads
    # again: seconds)

    def retarget(self, epochs: int) -> None:
        """The heads' schedule ends after ``epochs`` epochs instead (as FoldTrainer.retarget)."""
        retarget(self.scheduler, [epochs * self.steps_per_epoch])
        self.epochs = epochs

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the fold's train embeddings (every view), in a seeded order."""
        f, cfg = self.fold, self.fold.cfg
        start, total = time.perf_counter(), 0.0
        if cfg.head != "knn":
            f.model.train()
            heads = HeadsOnly(f.model)
            order = torch.randperm(len(self.trn_x), generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
            for rows in order.split(cfg.batch_size):
                t = {k: v[rows] for k, v in self.trn_t.items()} if isinstance(self.trn_t, dict) else self.trn_t[rows]
                total += train_step(heads, self.trn_x[rows], t, self.optimizer, clip_grad=cfg.clip_grad) * len(rows)
                self.scheduler.step()
                if f.ema is not None:
                    f.ema.update(f.model)
        seconds = time.perf_counter() - start
        return {"loss": total / len(self.trn_x), "images_per_s": len(self.trn_x) / max(seconds, 1e-9),
                "seconds": seconds, "data_wait": 0.0}  # embeddings already in memory

    @torch.no_grad()
    def head_logits(self, x: torch.Tensor, model) -> np.ndarray:
        model.eval()
        return torch.cat([model.head_logits(b) for b in x.split(1024)]).numpy()

    def validate(self, model, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the fold's validation rows, logits) from the cached plain embeddings (the
        mirror is not embedded: ``mirror`` has no effect on this route)."""
        return np.arange(len(self.fold.val)), self.head_logits(self.val_x, model)

    def predict_test(self, model, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return self.cache["test_ids"], self.head_logits(torch.from_numpy(self.cache["test"]), model)

    def best_model(self):
        f = self.fold
        return load_checkpoint(f.dir / "best.pt", f.schema)[0]


class HeadsOnly(torch.nn.Module):
    """The model's heads and loss on embeddings, in the shape ``train_step`` expects."""

    def __init__(self, model):
        super().__init__()
        self.model, self.loss = model, model.loss

    def forward(self, x, targets=None, normaliser=None):
        logits = self.model.head_logits(x)
        return {"logits": logits, "loss": self.model.loss(logits.float(), targets, normaliser)}

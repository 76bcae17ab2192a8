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
take it unchanged. Under torchrun, rank 0 embeds while the others wait; heads train in every rank
(identically) and rank 0 writes.
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
from utils.train.engine import autocast, model_input, train_step
from utils.io import atomic_write
from utils.ensemble.metric import score_logits
from utils.train.model import load_checkpoint, warmup_cosine
from utils.data.schema import CATEGORY, ID, IGNORE_INDEX, image_path, row_paths
from utils.train.trainer import FoldTrainer


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


def cache_key(cfg, prep, paths: list[Path], backbone: torch.nn.Module, dtype) -> str:
    """A hash of everything the embeddings depend on: the backbone's architecture arguments and its
    weights as loaded (``state_digest``), the autocast dtype, timm's and torch's versions, the
    preprocessing, the views with their augmentation and seed, and every image file. (``layout``: the
    cache file's own format, raised when its arrays change so an older cache is rebuilt, not misread.)"""
    import timm

    what = {"layout": 3, "model": cfg.model, "model_kwargs": cfg.model_kwargs, "keep_head": cfg.keep_head,
            "img_size": cfg.img_size, "weights": state_digest(backbone), "dtype": str(dtype),
            "timm": timm.__version__, "torch": torch.__version__, "preprocess": prep.to_dict(),
            "views": cfg.frozen_views,
            "aug": [cfg.aug, cfg.category_aug, cfg.seed] if cfg.frozen_views else None,
            "images": provenance.files_digest(paths)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FrozenFold(FoldTrainer):
    """One fold of the frozen route: FoldTrainer's steps, on cached embeddings."""

    def __init__(self, cfg, schema, train, data, fold, d, run_dir):
        super().__init__(cfg, schema, train, data, fold, d, run_dir)
        self.model.freeze_backbone(True)
        self.cache = self.embeddings(train)
        self.trn_x, self.trn_t = self.training_embeddings()
        self.val_x, _ = self.rows_of(self.val, None, views=False)
        if cfg.head == "knn":
            self.fill_bank()
        steps = -(-len(self.trn_x) // cfg.batch_size)
        heads = [p for p in self.model.heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": heads, "lr": cfg.lr_head, "role": "head"}],
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.epochs * steps, int(cfg.warmup_epochs * steps)))

    def decoded_images(self):
        return None  # every image is decoded once anyway, for its embedding

    # -- the cache
    def image_paths(self, originals: pd.DataFrame) -> tuple[list[Path], list[Path]]:
        return (row_paths(originals, self.data.train_images, self.csv_dir),
                [image_path(self.data.test_images, i) for i in self.data.test[ID]])

    def embeddings(self, train: pd.DataFrame) -> dict:
        """{"train" [N, F], "views" [V, N, F], "test" [T, F]} in the order of the original train rows
        and of test.csv: from the cache when its key matches, else computed (by rank 0) and cached."""
        originals = train[train["source_id"] == train[ID]] if "source_id" in train else train
        train_paths, test_paths = self.image_paths(originals)
        key = cache_key(self.cfg, self.prep, train_paths + test_paths, self.model.backbone, self.dtype)
        path = self.run_dir.path / "embeddings" / f"{key}.npz"
        if self.d.main:
            if path.is_file():
                print(f"fold {self.fold}: embeddings reused from {path}")
            else:
                self.embed_all(originals, train_paths, test_paths, path)
        self.d.barrier()
        with np.load(path, allow_pickle=False) as z:
            cache = {k: z[k] for k in z.files}
        cache["position"] = {int(i): k for k, i in enumerate(cache["train_ids"])}
        return cache

    @torch.no_grad()
    def embed(self, paths, categories, transform, seed=None) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, F], usable [N]): an unusable image is embedded as the grey placeholder."""
        ds = ImageDataset(paths, categories, None, transform, self.prep, augment_seed=seed)
        backbone, out, ok = self.model.backbone.eval(), [], []
        for batch in make_loader(ds, max(self.per_rank_batch, 64), self.workers, device=self.d.device):
            with autocast(self.d.device, self.dtype):
                x = model_input(batch["image"], self.prep, self.d.device, self.channels_last)
                out.append(backbone(x).float().cpu())
            ok.append(batch["ok"])
        return torch.cat(out).numpy(), torch.cat(ok).numpy()

    def embed_all(self, originals: pd.DataFrame, train_paths, test_paths, path: Path) -> None:
        start, cats = time.perf_counter(), originals[CATEGORY].tolist()
        plain, usable = self.embed(train_paths, cats, self.prep.transform())
        train_tf = self.prep.transform(train=True, aug=self.cfg.aug, category_aug=self.cfg.category_aug,
                                       categories=self.schema.categories)
        views = [self.embed(train_paths, cats, train_tf, seed=self.cfg.seed + 1000 * (v + 1))[0]
                 for v in range(self.cfg.frozen_views)]
        test, test_usable = self.embed(test_paths, self.data.test[CATEGORY].tolist(), self.prep.transform())
        arrays = {"train_ids": originals[ID].to_numpy(), "train": plain, "train_usable": usable,
                  "test_ids": self.data.test[ID].to_numpy(), "test": test, "test_usable": test_usable,
                  "views": np.stack(views) if views else np.zeros((0,) + plain.shape, np.float32)}
        atomic_write(path, lambda f: np.savez(f, **arrays))
        print(f"fold {self.fold}: embedded {len(plain)} train images ({self.cfg.frozen_views} augmented view(s) each) "
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
        n, targets = len(self.trn), self.rows["targets"][: len(self.trn)].copy()
        targets[~usable] = IGNORE_INDEX
        self.bad = {("train", int(i)): UNUSABLE for i in self.trn[ID][~usable]}
        self.check_bad(n)
        return targets

    def training_embeddings(self) -> tuple[torch.Tensor, torch.Tensor | dict]:
        """The fold's train rows (every view) and their targets; for a student (``teacher``), the
        teacher's probabilities too, and the test images' embeddings as unlabelled rows."""
        n, usable = len(self.trn), self.cache["train_usable"][self.positions(self.trn)]
        x, hard = self.rows_of(self.trn, self.usable_targets(usable), views=True)
        if not self.cfg.teacher:
            return x, hard
        views = len(x) // n
        repeat = lambda a: torch.from_numpy(np.concatenate([np.asarray(a)] * views))
        heads = self.rows["soft_heads"][:n] & usable[:, None]  # an unusable image learns nothing from the teacher
        targets = {"hard": hard, "soft": repeat(self.rows["soft"][:n]), "soft_heads": repeat(heads)}
        if len(self.rows["ids"]) > n:  # distill_test: the test rows, in test.csv order, as student_rows appends them
            x = torch.cat([x, torch.from_numpy(self.cache["test"])])
            test_usable = self.cache["test_usable"]  # an unusable test image learns nothing either, as fine-tuning
            self.bad.update({("test", int(i)): UNUSABLE for i in self.cache["test_ids"][~test_usable]})
            for key, extra in (("hard", self.rows["targets"][n:]), ("soft", self.rows["soft"][n:]),
                               ("soft_heads", self.rows["soft_heads"][n:] & test_usable[:, None])):
                targets[key] = torch.cat([targets[key], torch.as_tensor(extra).to(targets[key].dtype)])
        return x, targets

    def fill_bank(self) -> None:
        """The kNN bank: the fold's train rows (plain embeddings) and their labels."""
        onehot = torch.from_numpy(self.schema.one_hot(self.rows["targets"][: len(self.trn)]))
        counts, prior = onehot.sum(0), torch.zeros(self.schema.n_logits)
        for h in self.schema.heads:
            prior[h.logits] = counts[h.logits] / counts[h.logits].sum().clamp(min=1)
        self.model.heads.fill(self.trn_x[: len(self.trn)], onehot, prior)

    # -- the epoch loop, on cached embeddings
    def fit(self, report=None) -> bool:
        """Epochs take a fraction of a second here, so the best weights are kept in memory and the
        checkpoints written once, when the fold's training stops (an interrupted fold trains its
        heads again: seconds)."""
        if self.cfg.head == "knn":
            stats, val_score = self.train_epoch(0)  # nothing to train: one pass scores and saves the bank
            self.checkpoint(self.record(0, stats, val_score), 0, val_score)
            self.log(f"fold {self.fold}: kNN vote (k={self.model.heads.k}) over {len(self.trn)} train rows: "
                     f"val {val_score:.4f}")
            finished = True
        else:
            finished = super().fit(report)
        if self.d.main:
            self.save_best(*self.best)
            self.save_last()
            self.save_history()
        return finished

    def checkpoint(self, improved: bool, epoch: int, val_score: float) -> None:
        if improved:
            self.best = ({k: v.clone() for k, v in self.scored.state_dict().items()}, epoch, val_score)
        if self.tracker is not None:
            self.tracker.log(self.state["history"][-1])

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        cfg, start, total = self.cfg, time.perf_counter(), 0.0
        if cfg.head != "knn":
            torch.manual_seed(cfg.seed * 1000 + epoch)
            self.model.train()
            heads = HeadsOnly(self.model)
            order = torch.randperm(len(self.trn_x), generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
            for rows in order.split(cfg.batch_size):
                t = {k: v[rows] for k, v in self.trn_t.items()} if isinstance(self.trn_t, dict) else self.trn_t[rows]
                total += train_step(heads, self.trn_x[rows], t, self.optimizer, clip_grad=cfg.clip_grad) * len(rows)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model)
        seconds = time.perf_counter() - start
        stats = {"loss": total / len(self.trn_x), "images_per_s": len(self.trn_x) / max(seconds, 1e-9),
                 "seconds": seconds, "data_wait": 0.0}  # embeddings already in memory
        return stats, score_logits(self.schema, self.val_targets, self.head_logits(self.val_x))[0]

    @torch.no_grad()
    def head_logits(self, x: torch.Tensor, model=None) -> np.ndarray:
        model = (model or self.scored).eval()
        return torch.cat([model.head_logits(b) for b in x.split(1024)]).numpy()

    def finalise(self) -> dict:
        """OOF and test logits from the best checkpoint's heads on the cached embeddings."""
        best, _ = load_checkpoint(self.dir / "best.pt", self.schema)
        test = None
        if self.cfg.predict_test:
            test = (self.cache["test_ids"], self.head_logits(torch.from_numpy(self.cache["test"]), best))
        return self.write_outputs(np.arange(len(self.val)), self.head_logits(self.val_x, best), test)


class HeadsOnly(torch.nn.Module):
    """The model's heads and loss on embeddings, in the shape ``train_step`` expects."""

    def __init__(self, model):
        super().__init__()
        self.model, self.loss = model, model.loss

    def forward(self, x, targets=None, normaliser=None):
        logits = self.model.head_logits(x)
        return {"logits": logits, "loss": self.model.loss(logits.float(), targets, normaliser)}

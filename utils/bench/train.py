"""Training throughput: the loader alone, the model-only ceiling, the full step, a real epoch.

    python -m utils.bench.train                                       # resnet18, efficientnet_b0 at 128 and 224
    python -m utils.bench.train --models resnet18 --sizes 96 --workers-sweep 0,1,2
    python -m utils.bench.train --sizes 128 --workers-sweep 2 --epoch false --compile

For each model and size, images per second of:
  loader            the data loader alone (decode, augment, collate), ``workers`` processes
  ceiling           the model-only step: the kit's own step (forward, head losses, backward,
                    clipping, AdamW) on batches already in memory; nothing can train faster
  full step         the same step fed by the real loader (persistent workers)
  full / ceiling    what the loader and the pipeline cost
  train.py epoch    one real epoch of the fold trainer on these images, first batch included
and, to justify the defaults (utils/throughput.py): the ceiling in contiguous and channels_last
memory format, the full step with each number of loader workers in ``--workers-sweep``, and bf16
autocast, but only on a CPU with native bf16 (elsewhere it is emulated, and says so); with
``--compile``, the ceiling under torch.compile and the seconds its compilation took.
"""
from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time
from dataclasses import dataclass

import pandas as pd
import torch

from utils.bench import machine
from utils.config import DataConfig, option, run_command
from utils.data import EpochSampler, ImageDataset, make_loader
from utils.distributed import Dist
from utils.engine import native_bf16, train_one_epoch
from utils.model import AttributeModel, HeadLoss, build_optimizer, data_config, warmup_cosine
from utils.run import RunDir
from utils.schema import CATEGORY, Schema, read_dataset
from utils.throughput import loader_workers, use_channels_last
from utils.trainer import FoldTrainer, TrainConfig, model_args, row_paths
from utils.transforms import Preprocess


@dataclass
class BenchTrainConfig(DataConfig):
    models: list[str] = option(help="timm backbones (a,b,c)", factory=lambda: ["resnet18", "efficientnet_b0"])
    sizes: list[int] = option(help="input sizes in pixels (a,b,c)", factory=lambda: [128, 224])
    batch_size: int = option(32, "images per step")
    images: int = option(256, "images per measurement")
    workers: int = option(2, "loader workers of the loader and full-step rows")
    workers_sweep: list[int] = option(help="loader workers to compare for the full step (a,b,c)", factory=lambda: [0, 1, 2])
    repeats: int = option(3, "interleaved repetitions of every step measurement; the best is kept")
    epoch: bool = option(True, "also time one real train.py epoch (the fold trainer) per model and size")
    epoch_images: int = option(2048, "rows of the real epoch's run (2 folds: half of them train)")
    compile: bool = option(False, "also time the ceiling under torch.compile, and its compile time (minutes)")


class Case:
    """One model at one size: its model, preprocessing, images and targets."""

    def __init__(self, cfg: BenchTrainConfig, data, schema, model_name: str, size: int):
        self.cfg, self.data, self.schema, self.size, self.name = cfg, data, schema, size, model_name
        self.rows = data.train.iloc[: cfg.images]
        self.targets = schema.encode(self.rows)
        self.recipe = TrainConfig(model=model_name, img_size=size)
        torch.manual_seed(0)
        self.model = AttributeModel(loss=HeadLoss(schema), **model_args(self.recipe, schema))  # as train.py builds it
        self.prep = Preprocess(size, *data_config(self.model.backbone))

    def loader(self, workers: int):
        tf = self.prep.transform(train=True, aug=self.recipe.aug, category_aug=self.recipe.category_aug,
                                 categories=self.schema.categories)
        ds = ImageDataset(row_paths(self.rows, self.data.train_images), self.rows[CATEGORY], self.targets, tf,
                          self.prep, augment_seed=0)
        return make_loader(ds, self.cfg.batch_size, workers, EpochSampler(len(ds), 0), drop_last=True, persistent=True)

    def steps(self, batches, channels_last: bool, dtype=None, compiled: bool = False) -> float:
        """images/s of the kit's training step over ``batches`` (after two untimed warm-up steps,
        whose seconds are kept in ``warmup_s``: with ``compiled``, the compile time)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        net = torch.compile(self.model) if compiled else self.model
        opt = build_optimizer(self.model, 1e-4, 1e-3, 0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10_000, 0))
        run = lambda b: train_one_epoch(net, b, opt, sched, torch.device("cpu"), amp_dtype=dtype,
                                        clip_grad=1.0, channels_last=channels_last, progress=False)
        start = time.perf_counter()
        run(itertools.islice(iter(batches), 2))
        self.warmup_s = time.perf_counter() - start
        return run(batches)["images_per_s"]

    def in_memory(self) -> list[dict]:
        """Batches of random images with real targets, already in memory."""
        g = torch.Generator().manual_seed(0)
        n = self.cfg.images // self.cfg.batch_size
        t = torch.as_tensor(self.targets[: n * self.cfg.batch_size])
        return [{"image": torch.randn(self.cfg.batch_size, 3, self.size, self.size, generator=g),
                 "target": t[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]} for k in range(n)]


def loader_only(case: Case, workers: int) -> float:
    loader = case.loader(workers)
    next(iter(loader))  # worker start-up, not decode speed
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["image"])
    return n / (time.perf_counter() - start)


def real_epoch(case: Case, workers: int) -> float:
    """images/s of the fold trainer's first epoch (first batch and worker start-up included), in
    fp32 like the ceiling it is compared with (``amp: auto`` would take bf16 on a native-bf16 CPU)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=case.name, img_size=case.size, batch_size=case.cfg.batch_size, epochs=1,
                          n_folds=2, workers=workers, out_dir=out, progress=False, patience=0, amp="off")
        rows = case.data.train.iloc[: case.cfg.epoch_images].reset_index(drop=True)
        data = dataclasses.replace(case.data, train=rows, test=case.data.test.iloc[:8])
        schema, table = RunDir(out).prepare(data, 2, 0)
        trainer = FoldTrainer(cfg, schema, table, data, 0, Dist(), RunDir(out))
        stats, _ = trainer.train_epoch(0)
    return stats["images_per_s"]


def measure(cfg: BenchTrainConfig, case: Case) -> list[dict]:
    """The rows of one case. Step rates are the best of ``repeats`` interleaved measurements (the
    machine's noise only ever slows a run down)."""
    cl = use_channels_last("auto", case.model.backbone)
    label, memory = f"{case.name} {case.size}", case.in_memory()
    loaders = {w: case.loader(w) for w in cfg.workers_sweep}
    best: dict[str, float] = {}
    for _ in range(cfg.repeats):
        runs = {"ceiling": (memory, cl), "other": (memory, not cl),
                **{f"full{w}": (loader, cl) for w, loader in loaders.items()}}
        for key, (batches, fmt) in runs.items():
            best[key] = max(best.get(key, 0.0), case.steps(batches, fmt))
    ceiling = best["ceiling"]
    rows = [{"case": label, "measure": "loader alone", "workers": cfg.workers, "img_per_s": loader_only(case, cfg.workers)},
            {"case": label, "measure": f"ceiling, {'channels_last' if cl else 'contiguous'} (auto)", "img_per_s": ceiling},
            {"case": label, "measure": f"ceiling, {'contiguous' if cl else 'channels_last'}", "img_per_s": best["other"],
             "of_ceiling": best["other"] / ceiling}]
    rows += [{"case": label, "measure": "full step", "workers": w, "img_per_s": best[f"full{w}"],
              "of_ceiling": best[f"full{w}"] / ceiling} for w in cfg.workers_sweep]
    if cfg.epoch:
        w = loader_workers("auto", Dist())
        epoch = real_epoch(case, w)
        rows.append({"case": label, "measure": "train.py epoch (auto workers, fp32)", "workers": w, "img_per_s": epoch,
                     "of_ceiling": epoch / ceiling})
    if native_bf16():
        bf16 = max(case.steps(memory, cl, torch.bfloat16) for _ in range(cfg.repeats))
        rows.append({"case": label, "measure": "ceiling, bf16 autocast", "img_per_s": bf16, "of_ceiling": bf16 / ceiling})
    else:
        rows.append({"case": label, "measure": "ceiling, bf16 autocast: not measured (emulated on this CPU)"})
    if cfg.compile:
        rate = case.steps(memory, cl, compiled=True)
        rows.append({"case": label, "measure": f"ceiling, torch.compile (compiled in {case.warmup_s:.0f} s)",
                     "img_per_s": rate, "of_ceiling": rate / ceiling})
    return rows


def main(cfg: BenchTrainConfig) -> pd.DataFrame:
    data = read_dataset(cfg.data_dir)
    schema = Schema.fit(data.train, data.category_attrs)
    rows = []
    for name in cfg.models:
        for size in cfg.sizes:
            case_rows = measure(cfg, Case(cfg, data, schema, name, size))
            rows += case_rows
            print(pd.DataFrame(case_rows).to_string(index=False, float_format="{:.2f}".format, na_rep=""), flush=True)
    table = pd.DataFrame(rows)
    print(f"\ntraining throughput, batch {cfg.batch_size}, {cfg.images} images per measure, fp32 unless said; "
          f"{torch.get_num_threads()} compute threads\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.2f}".format, na_rep=""))
    return table


if __name__ == "__main__":
    run_command(main, BenchTrainConfig, __doc__)

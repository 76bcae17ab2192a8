"""Training throughput: the loader alone, the model-only ceiling, the full step, a real epoch.

    python -m utils.bench.train                                       # resnet18, efficientnet_b0 at 128 and 224
    python -m utils.bench.train --models resnet18 --sizes 96 --workers-sweep 0,1,2
    python -m utils.bench.train --sizes 128 --workers-sweep 2 --epoch false --compile
    python -m utils.bench.train --device cuda --sizes 224 --batch-size 256 --images 4096 --workers 8 --workers-sweep 8

For each model and size, images per second of:
  decode cache      decoding every image once, with every core (utils/data/decoded.py)
  loader            the data loader alone (augment, collate), ``workers`` processes: reading the
                    decode cache, as training does, and decoding on the fly; and the batched path
                    (utils/data/batched.py): its workers' gathers alone, then with the augmentation on
                    the device; images/s per worker where the workers do all the work
  full, batched     the full step fed by the batched path
  ceiling           the model-only step: the kit's own step (forward, head losses, backward,
                    clipping, AdamW) on batches already in memory; nothing can train faster
  full step         the same step fed by the real loader (persistent workers, decode cache)
  full / ceiling    what the loader and the pipeline cost (the median of the ratios within each
                    interleaved repeat)
  data wait         the share of a full step's time spent waiting for the batch and moving it
                    to the device: the loader's cost without the noise of the step's own speed
  first steps       seconds of the case's first two ceiling steps (kernel loading; on CUDA,
                    cuDNN's autotuning with --cudnn-benchmark), left out of every rate
  train.py epoch    train.py's first epoch (worker start and first batch included) and its
                    second, trained in a process of its own: 2 folds of the data, half of it trained on
and, to justify the defaults (utils/train/throughput.py): the ceiling in contiguous and channels_last
memory format, the full step with each number of loader workers in ``--workers-sweep`` and
without the decode cache, and bf16 autocast, but only on a CPU with native bf16 (elsewhere it is
emulated, and says so); with ``--compile``, the ceiling under torch.compile and the seconds its
compilation took. On CUDA the ceiling's batches wait on the GPU already, and bf16 is always timed.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler

from utils.bench import fresh_process, machine
from utils.config import DataConfig, option, parse_config, run_command
from utils.data.batched import BatchAugment
from utils.data.dataset import Batches, EpochSampler, ImageDataset, make_loader
from utils.data.decoded import DecodedImages, decode_workers
from utils.data.schema import CATEGORY, Schema, read_dataset, row_paths
from utils.data.transforms import Preprocess
from utils.train.config import TrainConfig
from utils.train.distributed import Dist
from utils.train.engine import train_one_epoch
from utils.train.fold import model_args
from utils.train.model import AttributeModel, HeadLoss, WarmupCosine, build_optimizer, data_config
from utils.train.throughput import configure_device, input_rate, keep_freed_memory, loader_workers, use_channels_last

CORES = os.cpu_count() or 1  # the decode cache is built with every core, as train.py builds it


@dataclass
class BenchTrainConfig(DataConfig):
    models: list[str] = option(help="timm backbones (a,b,c)", factory=lambda: ["resnet18", "efficientnet_b0"])
    sizes: list[int] = option(help="input sizes in pixels (a,b,c)", factory=lambda: [128, 224])
    batch_size: int = option(32, "images per step")
    images: int = option(256, "images per measurement")
    workers: int = option(2, "loader workers of the loader and full-step rows")
    workers_sweep: list[int] = option(help="loader workers to compare for the full step (a,b,c)", factory=lambda: [0, 1, 2])
    repeats: int = option(3, "interleaved repetitions of every step measurement; medians are kept")
    device: str = option("auto", "cpu, cuda, or auto (cuda where there is one)")
    epoch: bool = option(True, "also time train.py's first two epochs, run as train.py, per model and size")
    compile: bool = option(False, "also time the ceiling under torch.compile, and its compile time (minutes)")
    cudnn_benchmark: bool = option(False, "CUDA: cuDNN autotuning, as train.py's cudnn_benchmark")
    keep_freed_memory: bool = option(True, "malloc keeps the memory a step frees, as train.py sets it on CPU "
                                           "(utils/train/throughput.py); false: glibc's default")


class Case:
    """One model at one size: its model, preprocessing, images and targets."""

    def __init__(self, cfg: BenchTrainConfig, data, schema, model_name: str, size: int):
        self.cfg, self.data, self.schema, self.size, self.name = cfg, data, schema, size, model_name
        self.device = bench_device(cfg)
        self.first_warmup_s = None  # the case's first two steps: kernel loading, cuDNN autotuning
        self.rows = data.train.iloc[: cfg.images]
        self.targets = schema.encode(self.rows)
        self.recipe = TrainConfig(model=model_name, img_size=size)
        torch.manual_seed(0)
        self.model = AttributeModel(loss=HeadLoss(schema), **model_args(self.recipe, schema)).to(self.device)
        self.prep = Preprocess(size, *data_config(self.model.backbone))
        self.paths = row_paths(self.rows, self.data.train_images)
        self.tmp = tempfile.TemporaryDirectory()
        start = time.perf_counter()
        self.images = DecodedImages.build_or_load(self.tmp.name, self.paths, self.prep, CORES,
                                                  progress=False, log=lambda text: None)
        self.decode_rate = len(self.paths) / (time.perf_counter() - start)

    def loader(self, workers: int, cached: bool = True):
        tf = self.prep.transform(train=True, aug=self.recipe.aug, category_aug=self.recipe.category_aug,
                                 categories=self.schema.categories)
        ds = ImageDataset(self.paths, self.rows[CATEGORY], self.targets, tf, self.prep, augment_seed=0,
                          images=self.images if cached else None)
        return make_loader(ds, self.cfg.batch_size, workers, EpochSampler(len(ds), 0), drop_last=True, persistent=True,
                           device=self.device)

    def batched(self, workers: int):
        """(the batched path's loader, its BatchAugment): batches gathered from the decode cache by
        ``workers`` processes, augmented on the device (utils/data/batched.py)."""
        ds = ImageDataset(self.paths, self.rows[CATEGORY], self.targets, None, self.prep, augment_seed=0,
                          images=self.images)
        sampler = BatchSampler(EpochSampler(len(ds), 0), self.cfg.batch_size, drop_last=True)
        augment = BatchAugment(self.size, self.recipe.aug, self.recipe.category_aug, self.schema.categories)
        return make_loader(Batches(ds), None, workers, sampler, persistent=True, device=self.device), augment

    def steps(self, batches, channels_last: bool, dtype=None, compiled: bool = False, augment=None) -> dict:
        """``train_one_epoch``'s stats (images/s, data wait) of the kit's training step over
        ``batches``, after two untimed warm-up steps, whose seconds are kept in ``warmup_s``
        (with ``compiled``, the compile time)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        net = torch.compile(self.model) if compiled else self.model
        opt = build_optimizer(self.model, 1e-4, 1e-3, 0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(10_000, 0))
        run = lambda b: train_one_epoch(net, b, opt, sched, self.device, prep=self.prep, amp_dtype=dtype,
                                        clip_grad=1.0, channels_last=channels_last, augment=augment, progress=False)
        start = time.perf_counter()
        run(itertools.islice(iter(batches), 2))
        self.warmup_s = time.perf_counter() - start
        if self.first_warmup_s is None:
            self.first_warmup_s = self.warmup_s
        return run(batches)

    def in_memory(self) -> list[dict]:
        """Batches of random images with real targets, already in memory (on the device)."""
        g = torch.Generator().manual_seed(0)
        n = self.cfg.images // self.cfg.batch_size
        t = torch.as_tensor(self.targets[: n * self.cfg.batch_size])
        return [{"image": torch.randn(self.cfg.batch_size, 3, self.size, self.size, generator=g).to(self.device),
                 "target": t[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]} for k in range(n)]


def loader_only(case: Case, workers: int, cached: bool = True, batched: bool = False, augment: bool = True) -> float:
    """Images per second of the loader alone over the case's images, its workers' start left out:
    the per-image path (``cached``: reading the decode cache, else decoding), or the batched one
    (its gathers, and with ``augment`` its augmentation on the device)."""
    loader, on_device = case.batched(workers) if batched else (case.loader(workers, cached), None)
    return input_rate(loader, case.device, on_device if augment else None, batches=len(loader))


def train_quietly(argv: list[str]) -> None:
    """What train.py runs (``utils.train.kfold.train`` on its parsed config), its output discarded."""
    from utils.train.kfold import train

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        train(parse_config(TrainConfig, argv, model_config=True))


def real_epochs(case: Case) -> list[dict]:
    """train.py's first and second epochs (images/s and data wait, from history.csv): its training
    (``utils.train.kfold.train``) in a fresh process of its own, as a user runs it, its decode cache built
    before the first epoch, the first epoch's worker start-up and first batch included; fp32 like
    the ceiling it is compared with (``amp: auto`` would take bf16 on a native-bf16 CPU), and the
    Case's model (no drop path)."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["--data-dir", str(case.cfg.data_dir), "--out-dir", out, "--model", case.name, "--img-size",
                str(case.size), "--batch-size", str(case.cfg.batch_size), "--epochs", "2", "--n-folds", "2", "--fold",
                "0", "--workers", "auto", "--amp", "off", "--device", case.device.type, "--drop-path-rate", "0",
                "--patience", "0", "--predict-test", "false", "--progress", "false"]
        child = fresh_process(train_quietly, argv)
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"training failed in its process (exit {child.exitcode}): train.py {' '.join(argv)}")
        history = pd.read_csv(Path(out) / case.name / "fold0" / "history.csv")
    return history[["images_per_s", "data_wait"]].to_dict("records")


def measure(cfg: BenchTrainConfig, case: Case) -> list[dict]:
    """The rows of one case. Every step measurement is repeated ``repeats`` times, interleaved:
    a rate is the median of its repeats, and a ratio to the ceiling the median of the ratios
    within each repeat, whose measurements ran minutes apart at most (a shared machine's speed
    drifts by 10-20 % over a run; paired ratios cancel most of that)."""
    cl = use_channels_last("auto", case.model.backbone)
    label, memory = f"{case.name} {case.size}", case.in_memory()
    loaders = {w: case.loader(w) for w in cfg.workers_sweep}
    decoding = case.loader(cfg.workers, cached=False)
    batched, augment = case.batched(cfg.workers)
    runs = {"ceiling": (memory, cl, None), "other": (memory, not cl, None), "decoding": (decoding, cl, None),
            "batched": (batched, cl, augment), **{f"full{w}": (loader, cl, None) for w, loader in loaders.items()}}
    repeats = [{key: case.steps(batches, fmt, augment=aug) for key, (batches, fmt, aug) in runs.items()}
               for _ in range(cfg.repeats)]
    first_steps = case.first_warmup_s
    rates = pd.DataFrame([{key: stats["images_per_s"] for key, stats in r.items()} for r in repeats])
    waits = pd.DataFrame([{key: stats["data_wait"] for key, stats in r.items()} for r in repeats])
    median = lambda key: float(rates[key].median())
    of = lambda key: float((rates[key] / rates["ceiling"]).median())
    waiting = lambda key: float(waits[key].median())
    w = max(cfg.workers, 1)
    per_image, gathers = loader_only(case, cfg.workers), loader_only(case, cfg.workers, batched=True, augment=False)
    rows = [{"case": label, "measure": "decode cache, built once", "workers": decode_workers(len(case.paths), CORES),
             "img_per_s": case.decode_rate},
            {"case": label, "measure": "loader alone", "workers": cfg.workers, "img_per_s": per_image,
             "per_worker": per_image / w},
            {"case": label, "measure": "loader alone, decoding on the fly", "workers": cfg.workers,
             "img_per_s": loader_only(case, cfg.workers, cached=False)},
            {"case": label, "measure": "loader alone, batched: the gathers", "workers": cfg.workers,
             "img_per_s": gathers, "per_worker": gathers / w},
            {"case": label, "measure": f"loader alone, batched: gathers + augmentation on {case.device.type}",
             "workers": cfg.workers, "img_per_s": loader_only(case, cfg.workers, batched=True)},
            {"case": label, "measure": f"ceiling, {'channels_last' if cl else 'contiguous'} (auto)",
             "img_per_s": median("ceiling"), "first_steps_s": first_steps},
            {"case": label, "measure": f"ceiling, {'contiguous' if cl else 'channels_last'}",
             "img_per_s": median("other"), "of_ceiling": of("other")}]
    rows += [{"case": label, "measure": "full step", "workers": w, "img_per_s": median(f"full{w}"),
              "of_ceiling": of(f"full{w}"), "data_wait": waiting(f"full{w}")} for w in cfg.workers_sweep]
    rows.append({"case": label, "measure": "full step, decoding on the fly", "workers": cfg.workers,
                 "img_per_s": median("decoding"), "of_ceiling": of("decoding"), "data_wait": waiting("decoding")})
    rows.append({"case": label, "measure": f"full step, batched (augmented on {case.device.type})",
                 "workers": cfg.workers, "img_per_s": median("batched"), "of_ceiling": of("batched"),
                 "data_wait": waiting("batched")})
    ceiling = median("ceiling")
    if cfg.epoch:
        w = loader_workers("auto", Dist())
        rows += [{"case": label, "measure": f"train.py epoch {k} (auto workers, fp32)", "workers": w,
                  "img_per_s": epoch["images_per_s"], "of_ceiling": epoch["images_per_s"] / ceiling,
                  "data_wait": epoch["data_wait"]} for k, epoch in enumerate(real_epochs(case), 1)]
    if case.device.type == "cuda" or native_bf16():
        bf16 = float(np.median([case.steps(memory, cl, torch.bfloat16)["images_per_s"]
                                for _ in range(cfg.repeats)]))
        rows.append({"case": label, "measure": "ceiling, bf16 autocast", "img_per_s": bf16, "of_ceiling": bf16 / ceiling})
    else:
        rows.append({"case": label, "measure": "ceiling, bf16 autocast: not measured (emulated on this CPU)"})
    if cfg.compile:
        rate = case.steps(memory, cl, compiled=True)["images_per_s"]
        rows.append({"case": label, "measure": f"ceiling, torch.compile (compiled in {case.warmup_s:.0f} s)",
                     "img_per_s": rate, "of_ceiling": rate / ceiling})
    return rows


def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 / AMX): where it is emulated, the bf16
    ceiling is not timed (5-19x slower than fp32, BENCHMARKS.md; amp auto measures it per model)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bench_device(cfg: BenchTrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return torch.device(cfg.device)


def main(cfg: BenchTrainConfig) -> pd.DataFrame:
    kept = False
    if bench_device(cfg).type == "cuda":
        configure_device(Dist(device=bench_device(cfg)), cfg.cudnn_benchmark)  # as train.py sets them
    elif cfg.keep_freed_memory:
        kept = keep_freed_memory()
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
          f"{torch.get_num_threads()} compute threads; malloc {'keeps freed memory' if kept else 'as glibc sets it'}"
          f"\nmachine: {machine()}")
    print(table.to_string(index=False, float_format="{:.2f}".format, na_rep=""))
    return table


if __name__ == "__main__":
    run_command(main, BenchTrainConfig, __doc__)

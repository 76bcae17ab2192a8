"""The training engine: one epoch of training, and prediction. Small functions that take values,
not the config, so the fold trainer and the benchmarks share them."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from tqdm import tqdm

from utils.data.dataset import warn_bad
from utils.errors import NonFiniteLoss
from utils.train.config import AMP


def amp_dtype(amp: str, measured=None):
    """The autocast dtype of ``amp``: None (fp32) for off, bf16 or fp16 as named, and for auto
    ``measured()``: whichever of fp32 and bf16 measured faster for the model on this machine
    (utils/train/precision.py; a CPU flag said it wrongly on both kinds of CPU, BENCHMARKS.md)."""
    if amp not in AMP:
        raise ValueError(f"amp must be one of {AMP}, got {amp!r}")
    if amp == "auto":
        if measured is None:
            raise ValueError("amp auto is decided by measuring the model (utils.train.precision.measured_dtype)")
        return measured()
    if amp == "off":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the device, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_input(images: torch.Tensor, prep, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A loader's batch as the model takes it: moved to the device as uint8 (non-blocking from
    pinned memory on CUDA: a quarter of float32's bytes), NHWC when asked, then normalised there
    by ``prep`` (``Preprocess.normalize``). A float batch is taken as already normalised (the
    benchmark's in-memory batches)."""
    x = images.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if x.dtype != torch.uint8:
        return x
    if prep is None:
        raise ValueError("a batch of uint8 pixels needs the Preprocess that normalises it")
    return prep.normalize(x)


def split(targets, k: int) -> list:
    """``k`` chunks of a target tensor, or of every tensor of a dict of them (distillation)."""
    if isinstance(targets, dict):
        parts = {name: t.chunk(k) for name, t in targets.items()}
        return [{name: p[i] for name, p in parts.items()} for i in range(len(next(iter(parts.values()))))]
    return list(targets.chunk(k))


def targets_to(targets, device: torch.device):
    if isinstance(targets, dict):
        return {name: t.to(device, non_blocking=True) for name, t in targets.items()}
    return targets.to(device, non_blocking=True)


def train_step(model, images: torch.Tensor, targets, optimizer, *, amp_dtype=None, scaler=None,
               clip_grad: float = 0.0, grad_accum: int = 1) -> float:
    """One optimiser step on one loaded batch, run as ``grad_accum`` chunks whose gradients add
    up. Each chunk's loss is divided by the whole batch's normaliser (its label count), so k chunks
    of B/k rows give exactly the update of one batch of B (for models without batch norm).
    Returns the batch's loss."""
    loss_fn = getattr(model, "module", model).loss
    normaliser = loss_fn.normaliser(targets)
    optimizer.zero_grad(set_to_none=True)
    chunks = list(zip(images.chunk(grad_accum), split(targets, grad_accum)))
    total = 0.0
    for k, (x, t) in enumerate(chunks):
        sync = k == len(chunks) - 1 or not hasattr(model, "no_sync")  # DDP: all-reduce once, on the last
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(x.device, amp_dtype):
                loss = model(x, t, normaliser=normaliser)["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss.item()}; lower the learning rate, or check the inputs "
                                    f"(amp, augmentations)")
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total


def train_one_epoch(model, loader, optimizer, scheduler, device: torch.device, *, prep=None, amp_dtype=None,
                    scaler=None, clip_grad: float = 0.0, grad_accum: int = 1, ema=None,
                    channels_last: bool = False, keys=None, bad: dict | None = None, augment=None,
                    desc: str = "train", progress: bool = True) -> dict:
    """One pass over ``loader`` (its pixels normalised by ``prep``); returns {"loss",
    "images_per_s", "seconds", "data_wait"}: the time counts from the request of the first batch
    (worker start-up and loading included), and ``data_wait`` is the share of it the step spent
    waiting for its batch, moving it to the device and, on the batched path (``augment``, a
    ``utils.data.batched.BatchAugment``), augmenting it there: what the input pipeline costs the step."""
    model.train()
    total, seen, waited, start = 0.0, 0, 0.0, time.perf_counter()
    ready = start
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        if bad is not None:
            warn_bad(batch, keys, bad)
        images = batch["image"]
        if augment is not None:  # the batched path: the batch's pixels are augmented on the device
            images = augment(images.to(device, non_blocking=True), batch["category"], batch["seed"])
        images = model_input(images, prep, device, channels_last)
        targets = targets_to(batch["target"], device)
        waited += time.perf_counter() - ready
        loss = train_step(model, images, targets, optimizer, amp_dtype=amp_dtype, scaler=scaler,
                          clip_grad=clip_grad, grad_accum=grad_accum)
        scheduler.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model)
        total += loss * len(images)
        seen += len(images)
        bar.set_postfix(loss=f"{total / seen:.4f}")
        ready = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds,
            "data_wait": waited / max(seconds, 1e-9)}


@torch.no_grad()
def predict(model, loader, device: torch.device, *, prep=None, amp_dtype=None, hflip: bool = False,
            channels_last: bool = False, desc: str = "predict", progress: bool = True, keys=None,
            bad: dict | None = None):
    """Logits of every row of the loader (its pixels normalised by ``prep``), in dataset order:
    (indices int64 [N], logits float32 [N, L]); with ``hflip``, the mean of the logits of the
    image and its mirror."""
    model.eval()
    indices, outputs = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        if bad is not None:
            warn_bad(batch, keys, bad)
        images = model_input(batch["image"], prep, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)["logits"].float()
            if hflip:
                logits = (logits + model(images.flip(3))["logits"].float()) / 2
        indices.append(batch["index"].numpy())
        outputs.append(logits.cpu().numpy())
    if not outputs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(indices).astype(np.int64), np.concatenate(outputs).astype(np.float32)

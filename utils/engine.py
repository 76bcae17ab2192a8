"""The training engine: one epoch of training, and prediction. Small functions that take values,
not the config, so the fold trainer and the benchmarks share them."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from tqdm import tqdm

from utils.data import warn_bad
from utils.errors import NonFiniteLoss

AMP = ("auto", "bf16", "fp16", "off")


def amp_dtype(amp: str, device: torch.device):
    """auto: bf16 on CUDA, and on a CPU with native bf16 (faster there, see BENCHMARKS.md); off on
    other CPUs, where emulated bf16 is slower than fp32."""
    if amp not in AMP:
        raise ValueError(f"amp must be one of {AMP}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type == "cpu" and not native_bf16()):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 / AMX); elsewhere bf16 is emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the device, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model, loader, optimizer, scheduler, device: torch.device, *, amp_dtype=None,
                    scaler=None, clip_grad: float = 0.0, ids=None, bad: dict | None = None,
                    desc: str = "train", progress: bool = True) -> dict:
    """One pass over ``loader``; returns {"loss", "images_per_s", "seconds"}."""
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        if bad is not None:
            warn_bad(batch, ids, bad)
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["target"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            loss = model(images, targets)["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {scheduler.last_epoch}; lower the "
                                f"learning rate, or check the inputs (amp, augmentations)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        total += loss.item() * len(images)
        seen += len(images)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def predict(model, loader, device: torch.device, *, amp_dtype=None, hflip: bool = False,
            desc: str = "predict", progress: bool = True, ids=None, bad: dict | None = None):
    """Logits of every row of the loader, in dataset order: (indices int64 [N], logits float32 [N, L]);
    with ``hflip``, the mean of the logits of the image and its mirror."""
    model.eval()
    indices, outputs = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        if bad is not None:
            warn_bad(batch, ids, bad)
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)["logits"].float()
            if hflip:
                logits = (logits + model(images.flip(3))["logits"].float()) / 2
        indices.append(batch["index"].numpy())
        outputs.append(logits.cpu().numpy())
    if not outputs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(indices).astype(np.int64), np.concatenate(outputs).astype(np.float32)

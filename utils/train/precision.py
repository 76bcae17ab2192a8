"""Mixed precision by measurement (``amp: auto``): bf16 autocast where a few timed steps of this
model, at this size and batch, on this machine, run faster in bf16 than in fp32; else fp32.

Whether bf16 pays depends on the machine and on the network, not on a CPU flag: on one CPU with
native bf16 it ran efficientnet_b0 at 0.56x and resnet18 at 0.65x of fp32, on another resnet18 at
1.59x; on a GPU it is usually faster (BENCHMARKS.md). So the first fold of a (machine, torch,
backbone, input size, batch, route) times ``STEPS`` interleaved steps in each dtype (after one
warm-up step each) on random images, the route's own work (forward and backward for fine-tuning,
the forward pass for the frozen route's embedding; a round in which one dtype took over ``CLEAR``
times the other's time ends it), and keeps the medians in

    $KIT_CACHE_DIR/precision.json   (default ~/.cache/fashion-attribute-kit/precision.json)

for every later run on the machine. The model's weights, gradients and statistics are left as
they were (it is timed in eval mode, its gradients dropped), and the global random state is not
touched: a run trains to the same weights whether it measured or read the cache. Under DDP every
rank times, and the ranks' means decide, so that they agree.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from utils.host import cpu
from utils.io import atomic_write_json
from utils.train.engine import autocast

STEPS = 3  # interleaved timed steps per dtype; the median of each is kept
CLEAR = 2.0  # a dtype this many times slower than the other after a round is not timed further
MEASURE_BATCH = 16  # at most this many images per timed step
MEASURE_PIXELS = 16 * 128 * 128  # on CPU, at most this many pixels per timed step (see measure_batch)


def measure_batch(batch: int, img_size: int, device: torch.device) -> int:
    """Images per timed step: the batch, at most MEASURE_BATCH; on CPU also at most MEASURE_PIXELS
    (16 images at 128 px, 5 at 224; at least 2), where the speed per image hardly depends on the
    batch and a step of 16 images at 224 px in emulated bf16 took about 10 s (a GPU needs its
    batch to show its speed)."""
    n = min(batch, MEASURE_BATCH)
    if device.type != "cuda":
        n = min(n, max(2, MEASURE_PIXELS // (img_size * img_size)))
    return max(1, n)


def cache_file() -> Path:
    root = os.environ.get("KIT_CACHE_DIR") or Path.home() / ".cache" / "fashion-attribute-kit"
    return Path(root) / "precision.json"


def machine(device: torch.device) -> str:
    """What the speeds depend on besides the model: the GPU's name, or the CPU's model and flags."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    model, flags = cpu()
    return f"cpu {model}; flags {' '.join(sorted(flags))}; threads={torch.get_num_threads()}"


def key(device: torch.device, backbone: str, img_size: int, batch: int, train: bool, channels_last: bool) -> str:
    return json.dumps({"machine": machine(device), "torch": torch.__version__, "backbone": backbone,
                       "img_size": img_size, "batch": batch, "train": train, "channels_last": channels_last},
                      sort_keys=True)


@contextmanager
def stepper(model: torch.nn.Module, img_size: int, batch: int, device: torch.device, train: bool,
            channels_last: bool):
    """A ``step(dtype) -> seconds`` on ``batch`` random images (with ``train``, the model's forward
    and backward pass; else its backbone's forward pass, the frozen route's embedding), ``dtype``
    None for fp32. What it times, ``time_steps`` here and fit.py's speeds share. Leaves the model,
    its gradients and the random state as they were."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(dtype) -> float:
        start = time.perf_counter()
        with torch.set_grad_enabled(train), autocast(device, dtype):
            out = (model(x)["logits"] if train else model.backbone(x)).float()  # the frozen route embeds
        if train:
            out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield step
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def time_steps(model: torch.nn.Module, img_size: int, batch: int, device: torch.device, train: bool,
               channels_last: bool, steps: int = STEPS, clear: float = CLEAR) -> dict[str, float]:
    """Seconds of one step in each dtype, {"fp32": s, "bf16": s}: the medians of ``steps``
    interleaved steps (fewer when a round shows one over ``clear`` times the other's time) after a
    warm-up step of each (``stepper``'s steps)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    times: dict[str, list[float]] = {name: [] for name in dtypes}
    with stepper(model, img_size, batch, device, train, channels_last) as step:
        for dtype in dtypes.values():
            step(dtype)  # kernels loaded, caches warm
        for _ in range(steps):
            for name, dtype in dtypes.items():
                times[name].append(step(dtype))
            fp32, bf16 = (np.median(t) for t in times.values())
            if max(fp32, bf16) > clear * min(fp32, bf16):
                break  # decided: emulated bf16 takes 6-20x fp32's time (BENCHMARKS.md); no need to wait on it
    return {name: float(np.median(t)) for name, t in times.items()}


def step_seconds(model, backbone: str, img_size: int, batch: int, device: torch.device, train: bool,
                 channels_last: bool, total=lambda values: values) -> tuple[dict[str, float], str]:
    """({"fp32": s, "bf16": s} per step of ``measure_batch(batch, ...)`` images, where they came
    from): the machine's cache, or timed now and cached. ``total`` averages a list of values over
    the ranks: the means decide, and the means are cached (each rank's own timing, cached by
    whichever rank wrote last, had a later run on this machine take bf16 where the first had taken
    fp32, and its logits differ). fit.py plans from the same seconds."""
    batch = measure_batch(batch, img_size, device)
    entry = key(device, backbone, img_size, batch, train, channels_last)
    path = cache_file()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    seconds = cache.get(entry)
    source = f"cached in {path}"
    if seconds is None:
        seconds = time_steps(model, img_size, batch, device, train, channels_last)
        source = f"timed now, cached in {path}"
    fp32, bf16 = total([seconds["fp32"], seconds["bf16"]])
    seconds = {"fp32": fp32, "bf16": bf16}  # the ranks' means: what decided is what is cached
    if entry not in cache:
        cache = json.loads(path.read_text()) if path.is_file() else {}  # another run may have written meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**cache, entry: seconds})
    return seconds, source


def measured_dtype(model, backbone: str, img_size: int, batch: int, device: torch.device, train: bool,
                   channels_last: bool, total=lambda values: values, log=print):
    """bf16 when it measured faster for this model on this machine, else None (fp32): from the
    machine's cache, or timed now and cached (``step_seconds``)."""
    seconds, source = step_seconds(model, backbone, img_size, batch, device, train, channels_last, total)
    fp32, bf16 = seconds["fp32"], seconds["bf16"]
    choice = torch.bfloat16 if bf16 < fp32 else None
    log(f"amp auto: {'bf16' if choice else 'fp32'} ({'training' if train else 'embedding'} step of "
        f"{measure_batch(batch, img_size, device)} images at {img_size} px: fp32 {fp32 * 1000:.0f} ms, "
        f"bf16 {bf16 * 1000:.0f} ms; {source})")
    return choice

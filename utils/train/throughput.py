"""How training uses the machine: threads, loader workers, memory format. Each rule here was
measured (``python -m utils.bench.train``; figures in BENCHMARKS.md) rather than assumed.

- Threads. On CPU each process computes with its share of the cores (``torch.set_num_threads``);
  loader workers compute with one thread each and no OpenCV pool (``utils.data.dataset``).
- Memory. On CPU, malloc keeps what a step frees for the next step (``keep_freed_memory``).
- Decoding. Every image is decoded and sized once per run folder, before the first fold, and
  read from there at every epoch (``utils/data/decoded.py``): the loader does a third of the work.
- Batches. Loaders carry uint8 pixels, normalised by the step on the device
  (``engine.model_input``): a quarter of float32's bytes between processes and to a GPU.
- Loader workers (``workers: auto``). On CUDA: enough to feed the GPU, one per core left after the
  training process, at most 8 (a draft-mode JPEG decode at 224 px runs at a few hundred images
  per second per core). On CPU the step, not the decode, is the bottleneck; 2 workers measured as
  fast as 0 or 1 on 2 cores or faster, so ``auto`` is 2 (one per 4 cores beyond 8).
  Training on CPU, workers run in Linux's idle scheduling class (``utils.data.dataset.init_worker``):
  they use the cores the step leaves idle rather than preempt its compute threads.
- channels_last (``channels_last: auto``): on for every convolutional backbone, off for
  transformers (a ViT's only convolution is its patch embedding). oneDNN's NHWC kernels measured
  faster for the training step on CPU (resnet18 1.19x, efficientnet_b0 1.48x at 128 px), and on
  CUDA tensor cores take NHWC.
- Augmentation (``batch_aug: auto``). On CPU, image by image in the loader workers: there the
  batched path (``utils/data/batched.py``) takes its work from the step's own cores: it measured
  5-7x fewer images per second than two per-image workers, and cost the full step 12-16 % at
  224 px (BENCHMARKS.md). On CUDA, the faster of the two
  as ``input_rate`` measures them at the start of a fold (the batches the step gets, augmented on
  the device: a copy per image in the workers for the batched path).
- cuDNN autotuning (``cudnn_benchmark: false``). On an H200, efficientnet_b0 in bf16 at 224 px
  spent about 45 s autotuning at the start of every fold (a 57 s first epoch against 11 s for the
  next) for no faster a step afterwards; resnet18 autotunes in a second and may gain ~10 %.
  TF32 matmuls are on for CUDA.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import time

import torch
import torch.nn as nn

from utils.train.distributed import Dist


def cores_per_process(d: Dist) -> int:
    return max(1, (os.cpu_count() or 1) // d.world)


def configure_device(d: Dist, cudnn_benchmark: bool = False) -> None:
    """Threads and the allocator on CPU; TF32 matmuls and, when asked, cuDNN autotuning on CUDA."""
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark  # autotune each input shape once (see above)
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_num_threads(cores_per_process(d))
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default it maps a large block (activations, gradients) afresh at each allocation and
    returns it at free (its threshold only adapts as the run goes on), so every step page-faults
    its working set in again: 20,000-200,000 faults a step, and the first epochs of a fold ran
    ~25 % slower than later ones. With the threshold fixed at its largest (32 MB) and the heap
    no longer trimmed, blocks up to 32 MB are reused, and steps are 12-18 % faster
    (BENCHMARKS.md), for ~5-10 % more resident memory. Larger blocks are still mapped. A no-op
    without glibc, and when the user set glibc's own ``MALLOC_*`` or ``GLIBC_TUNABLES``
    variables. Returns whether it changed anything."""
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(32 << 20))  # the most glibc takes on 64 bits
                and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))


def loader_workers(workers: int | str, d: Dist) -> int:
    """The number of loader worker processes for ``workers`` (a number, or auto; see above)."""
    if workers != "auto":
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be a number >= 0 or 'auto', got {workers!r}")
        return workers
    if d.device.type == "cuda":
        return max(2, min(8, cores_per_process(d) - 1))
    return max(2, cores_per_process(d) // 4)


def conv_layers(model: nn.Module) -> int:
    """The number of 2-d convolutions (a ViT has one: its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def use_channels_last(setting: str, backbone: nn.Module) -> bool:
    """Whether to run ``backbone`` in NHWC (``setting``: on, off or auto; see above)."""
    if setting in ("on", "off"):
        return setting == "on"
    return conv_layers(backbone) > 2  # transformers: NHWC would only concern the patch embedding


def input_rate(loader, device: torch.device, augment=None, batches: int = 8) -> float:
    """Images per second that ``loader`` (persistent workers) delivers to ``device``, augmented
    there by ``augment`` (the batched path's ``BatchAugment``) when given: the first ``batches`` of
    a fresh pass, timed from its start and the device synchronised at the end, once a first batch
    has started the workers (a pass already under way would have its next batches made)."""
    next(iter(loader), None)
    n, start = 0, time.perf_counter()
    for batch in itertools.islice(iter(loader), batches):
        x = batch["image"].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, batch["category"], batch["seed"])
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / max(time.perf_counter() - start, 1e-9)

"""Benchmarks: each a ``python -m utils.bench.<name>`` entry point over the package, printing a
table headed by the machine it ran on. BENCHMARKS.md keeps their results with the command.

    python -m utils.bench.train      training throughput: loader, model-only ceiling, full step
    python -m utils.bench.ensemble   the weight search at the real scale (20 x 70,000 x 42 heads)
    python -m utils.bench.latency    end-to-end latency per image of the seed's backbones
    python -m utils.bench.memory     infer.py's memory over a large test set (its inference in a process of its own)
    python -m utils.bench.models     one training step of each CLIP-scale and ImageNet config
    python -m utils.bench.precision  amp auto's quick timing of fp32 and bf16 against a longer one
    python -m utils.bench.regime     the fine-tuning regime on real photos from real weights, one change at a time
    python -m utils.bench.vs_timm    the kit's fine-tuning against timm's own train.py on the same photos
"""
from __future__ import annotations

import multiprocessing
import os

from utils.host import cpu

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The vector-ISA flags of this CPU that decide kernel speed (bf16 native or emulated)."""
    return [f for f in FLAGS if f in cpu()[1]]


def machine() -> str:
    """'<CPU model>, <n> cores, flags ..., torch <v>[, <GPU>]': the line every benchmark prints."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    flags = " ".join(cpu_flags()) or "none"
    return f"{cpu()[0]}, {os.cpu_count()} cores, flags {flags}{gpu}, torch {torch.__version__}"


def _forking(target, args) -> None:
    multiprocessing.set_start_method("fork", force=True)  # a spawned process defaults to spawn: fork as a script does
    target(*args)


def fresh_process(target, *args) -> multiprocessing.Process:
    """``target(*args)`` started in a fresh process of its own, as a command would run it: spawned
    (none of this process's memory), its own data-loader workers forked as under ``python
    train.py`` (spawned ones would each import torch anew at their first batch)."""
    proc = multiprocessing.get_context("spawn").Process(target=_forking, args=(target, args))
    proc.start()
    return proc

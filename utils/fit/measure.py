"""What fit.py measures before it plans: the data's own resolution, and for each (backbone, size)
it may use, images per second on this machine (``Measurer``).

- Training and forward-pass speed, and the precision of each: the faster dtype from the very timed
  steps that ``amp: auto`` takes (``utils.train.precision.step_seconds``: a few interleaved small
  steps in fp32 and bf16, cached per machine), so the plan and the training it plans agree on it;
  then the speed in that dtype at the batch the stages run (``timed_rate``). The model is built
  from random weights (speed does not depend on their values: no weights file is read).
- Decoding: a sample of the train images decoded and sized, in this process, times the cores.
- The frozen route's heads: a few optimiser steps of every MLP head on random embeddings.

A size that was not measured is extrapolated from a measured one by pixel count
(``Speed.at``); fit.py measures a size before a stage runs at it. Two sizes of one backbone whose
speeds per pixel differ by more than ``CONSISTENT`` times disagree: the slower is timed again and
the faster of its two timings kept (another process that starts during a second of timing slows
it; nothing makes it faster). A 64-px timing taken while another Python process was starting read
40 training img/s where the later ones read 148, and 96 px, timed afterwards, looked cheaper to
fine-tune than 64.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from utils.data.dataset import read_or_placeholder
from utils.data.schema import Schema, row_paths
from utils.data.transforms import Preprocess
from utils.fit.plan import Speed, ladder
from utils.train.engine import train_step
from utils.train.frozen import HeadsOnly
from utils.train.model import AttributeModel, HeadLoss, MLPHeads, data_config, feature_width
from utils.train.precision import step_seconds, stepper
from utils.train.throughput import conv_layers, use_channels_last

SAMPLE = 32  # images decoded to time decoding, and read to find the data's resolution
HEAD_HIDDEN = 256  # the frozen route's MLP heads (fit.py's recipe)
TRAIN_BATCH = 32  # train.py's batch_size
EMBED_BATCH = 64  # the frozen route's embedding batch (utils/train/frozen.py)
MIN_SECONDS = 0.5  # a speed is timed over at least this long (at most 5 steps), after a warm-up step
CONSISTENT = 2.5  # speeds per pixel of neighbouring sizes at most this far apart (tests/test_fit.py's recorded
# speeds of Lite0: 96 px ran 1.86x (training) and 2.15x (forward) 64 px's pixels a second, 128 px 0.74-0.94x 96 px's)


def timed_rate(model, size: int, batch: int, device: torch.device, train: bool, channels_last: bool,
               dtype) -> float:
    """Images/s of ``model`` on random images in ``dtype``: a training step (forward and backward)
    or the backbone's forward pass (validation, test and embedding), ``amp: auto``'s timed step
    (``stepper``) at the stage's batch, over at least MIN_SECONDS (at most 5 steps) after a warm-up."""
    with stepper(model, size, batch, device, train, channels_last) as step:
        step(dtype)  # kernels loaded, caches warm
        n, spent = 0, 0.0
        while n == 0 or (spent < MIN_SECONDS and n < 5):
            spent += step(dtype)
            n += 1
    return n * batch / spent


def native_size(data, n: int = SAMPLE * 2) -> int:
    """The median shorter side, in pixels, of up to ``n`` train images (headers only; unreadable
    ones are skipped here and reported by training)."""
    sides = []
    for path in row_paths(data.train.head(n), data.train_images):
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # training names it
            continue
    return int(np.median(sides)) if sides else 224


class Measurer:
    """Speeds on this machine, on demand: ``speed(b, s)`` returns the measured speed or else an
    extrapolation; ``measure(b, s)`` times it (a few seconds)."""

    def __init__(self, data, schema: Schema, device: torch.device, log=print):
        self.data, self.schema, self.device, self.log = data, schema, device, log
        self.measured: dict[tuple[str, int], Speed] = {}
        self.retimed: list[tuple[str, int, Speed, Speed]] = []  # (backbone, size, first timing, kept)
        self.models: dict[str, AttributeModel] = {}
        self.seconds = 0.0  # spent measuring

    def model(self, backbone: str) -> AttributeModel:
        if backbone not in self.models:
            torch.manual_seed(0)
            self.models[backbone] = AttributeModel(backbone, [h.width for h in self.schema.heads],
                                                   loss=HeadLoss(self.schema)).to(self.device)
        return self.models[backbone]

    def sizes(self, backbone: str) -> tuple[int, ...]:
        """The sizes ``backbone`` may run at: a convolutional one, the ladder up to the largest input
        size its weights were made for (timm's pretrained config: its input or test size); a
        transformer (one convolution, its patch embedding) only its own, which its position
        embeddings were trained at."""
        import timm

        pc = timm.models.get_pretrained_cfg(backbone)
        cap = max((c[-1] for c in (getattr(pc, "input_size", None), getattr(pc, "test_input_size", None)) if c),
                  default=224)
        return ladder(cap) if conv_layers(self.model(backbone).backbone) > 2 else (cap,)

    def speed(self, backbone: str, size: int) -> Speed:
        if (backbone, size) in self.measured:
            return self.measured[(backbone, size)]
        nearest = self.nearest(backbone, size)
        if nearest is None:
            return self.measure(backbone, size)
        return self.measured[(backbone, nearest)].at(size, nearest)

    def nearest(self, backbone: str, size: int) -> int | None:
        """The measured size of ``backbone`` nearest to ``size`` (other than ``size``), else None."""
        known = [s for b, s in self.measured if b == backbone and s != size]
        return min(known, key=lambda s: abs(s - size)) if known else None

    def measure(self, backbone: str, size: int) -> Speed:
        """Time ``backbone`` at ``size`` (``time``), then check it against the other sizes of the
        backbone measured nearest to it: more than ``CONSISTENT`` apart per pixel, the slower is timed
        again, once (``retimed``)."""
        other = self.nearest(backbone, size)  # the size extrapolation would have used
        self.measured[(backbone, size)] = self.time(backbone, size)
        if other is not None:
            slow = disagreeing(self.measured[(backbone, size)], size, self.measured[(backbone, other)], other)
            if slow is not None and not any(r[:2] == (backbone, slow) for r in self.retimed):
                self.retime(backbone, slow)
        return self.measured[(backbone, size)]

    def retime(self, backbone: str, size: int) -> Speed:
        """Time a measured (``backbone``, ``size``) again and keep the faster of its two timings (a
        timing is only ever slowed by what else runs), recorded in ``retimed``."""
        first, again = self.measured[(backbone, size)], self.time(backbone, size)
        kept = replace(first, train=max(first.train, again.train), infer=max(first.infer, again.infer),
                       decode=max(first.decode, again.decode))
        self.measured[(backbone, size)] = kept
        self.retimed.append((backbone, size, first, kept))
        return kept

    def time(self, backbone: str, size: int) -> Speed:
        """Time ``backbone`` at ``size``: the faster dtype of a training step and of a forward pass
        (amp auto's timing, small batches), then each in that dtype at the batch the stages use
        (per image, a CPU runs a large batch at a large size slower than a small one), and
        decoding."""
        start = time.perf_counter()
        model = self.model(backbone)
        channels_last = use_channels_last("auto", model.backbone)
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        rates, dtypes = {}, {}
        for train, batch in ((True, TRAIN_BATCH), (False, EMBED_BATCH)):
            seconds, _ = step_seconds(model, backbone, size, batch, self.device, train, channels_last)
            dtypes[train] = min(seconds, key=seconds.get)
            rates[train] = timed_rate(model, size, batch, self.device, train, channels_last,
                                      torch.bfloat16 if dtypes[train] == "bf16" else None)
        prep = Preprocess(size, *data_config(model.backbone), interpolation="cubic")
        paths = row_paths(self.data.train.head(SAMPLE), self.data.train_images)
        t0 = time.perf_counter()
        for p in paths:
            read_or_placeholder(p, prep)
        decode = len(paths) / max(time.perf_counter() - t0, 1e-9) * (os.cpu_count() or 1)
        self.seconds += time.perf_counter() - start
        return Speed(train=rates[True], infer=rates[False], decode=decode, dtype=dtypes[True])

    def head_rate(self, backbone: str, batch: int = 256, steps: int = 5) -> float:
        """Rows per second of the frozen route's heads (every MLP head, forward, backward, AdamW)."""
        start = time.perf_counter()
        widths = [h.width for h in self.schema.heads]
        heads = MLPHeads(feature_width(self.model(backbone).backbone), widths, HEAD_HIDDEN)
        net = HeadsOnly(_Heads(heads, HeadLoss(self.schema)))
        opt = torch.optim.AdamW(heads.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, heads.fc1.in_features, generator=g)
        t = torch.stack([torch.randint(0, w, (batch,), generator=g) for w in widths], dim=1)
        train_step(net, x, t, opt)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(net, x, t, opt)
        rate = steps * batch / max(time.perf_counter() - t0, 1e-9)
        self.seconds += time.perf_counter() - start
        return rate


def disagreeing(a: Speed, size_a: int, b: Speed, size_b: int) -> int | None:
    """The size whose training or forward speed per pixel is more than ``CONSISTENT`` times below the
    other's, else None."""
    for rate in ("train", "infer"):
        pa, pb = getattr(a, rate) * size_a ** 2, getattr(b, rate) * size_b ** 2
        if max(pa, pb) > CONSISTENT * min(pa, pb):
            return size_a if pa < pb else size_b
    return None


class _Heads(torch.nn.Module):
    """MLP heads and their loss, as ``HeadsOnly`` takes a model."""

    def __init__(self, heads: MLPHeads, loss: HeadLoss):
        super().__init__()
        self.heads, self.loss = heads, loss

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(x)

"""DistributedDataParallel plumbing: which rank this process is, and gathering its rows."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def total(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (so that every rank takes the same decision from them)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE: DDP with NCCL on CUDA, gloo on CPU. Plain runs: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    return Dist(rank, world, dev)


def teardown(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def gather_rows(indices: np.ndarray, logits: np.ndarray, d: Dist) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's (indices, logits) and order them by index."""
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, (indices, logits))
        indices = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts])
    order = np.argsort(indices, kind="stable")
    indices, logits = indices[order], logits[order]
    keep = np.concatenate([[True], indices[1:] != indices[:-1]])  # padding repeats rows
    return indices[keep], logits[keep]

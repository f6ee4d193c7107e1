"""The processes of one run under ``torchrun``: who am I, and sums and gathers across processes.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without it there is one process and
every function here is the identity. Backends: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..device import resolve_device

__all__ = ["Processes", "start", "all_sum", "all_gather", "finish"]


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    owned: bool = False  # whether start() began the process group (and so finish() ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(device_name: str) -> tuple[Processes, torch.device]:
    """Join (or begin) the process group; on CUDA each process takes the GPU ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(), resolve_device(device_name)
    import torch.distributed as dist

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), owned), device


def all_sum(values: list[float], procs: Processes, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64)."""
    if procs.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(t: Tensor, procs: Processes, device: torch.device) -> list[Tensor]:
    """Every process's ``t`` (same shape everywhere), in rank order, on the CPU."""
    if procs.world == 1:
        return [t]
    import torch.distributed as dist

    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(procs.world)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def finish(procs: Processes) -> None:
    """Wait for every process, then end the group if :func:`start` began it."""
    if procs.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if procs.owned:
            dist.destroy_process_group()

"""Process-group plumbing for ``torchrun``; in a single process every helper is a no-op.

The distillation task's student is wrapped in DistributedDataParallel; the method's own
trainable modules (connectors, projection heads) are small, so their gradients are averaged with
one all-reduce per step instead of a second DDP wrapper (and modules that legitimately get no
gradient, such as MoMA's key attention, need no ``find_unused_parameters``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def init_process_group(info: DistInfo) -> None:
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)


def destroy_process_group(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_run_dir(make: Callable[[], Path], info: DistInfo) -> Path:
    """Rank 0 creates the run folder; every rank learns its path."""
    if not info.enabled:
        return make()
    holder = [str(make()) if info.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def train_sampler(dataset, info: DistInfo, seed: int, epoch: int, generator: torch.Generator):
    if info.enabled:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return sampler
    return RandomSampler(dataset, generator=generator)


def wrap_task(task: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap the student in DDP (in place) and return the module the loop calls."""
    if not info.enabled:
        return task
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    unused = getattr(task.method, "student_has_unused_parameters", False)
    task.student = DDP(task.student, device_ids=device_ids, find_unused_parameters=unused)
    return task


def sync_method_grads(task: nn.Module, info: DistInfo) -> None:
    """Average the gradients of the method's own parameters across ranks."""
    if not info.enabled:
        return
    grads = [p.grad for p in task.method.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_across_ranks(values: dict[str, float], device: torch.device, info: DistInfo) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= info.world_size
    return dict(zip(keys, tensor.tolist()))

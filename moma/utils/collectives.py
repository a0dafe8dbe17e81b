"""Tensor collectives across the processes of a ``torchrun`` job, and DDP unwrapping.

Low-level: the distillation methods (MoMA's shuffle BN and key queue, CRD's memory banks) and the
training loop (sharded validation) use them alike. In a single process every helper is the
identity (or a plain permutation), so the methods run unchanged without a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap_parallel(module: nn.Module) -> nn.Module:
    """The module itself, also when DistributedDataParallel (or DataParallel) wraps it."""
    return getattr(module, "module", module)



def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """The number of rows every rank holds (one process: ``[rows]``)."""
    if not is_distributed():
        return [rows]
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(n) for n in every]


def all_gather_rows(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """The rows of every rank, concatenated in rank order; ranks may hold different numbers of rows
    (``sizes``, gathered when not given). One process: the tensor itself. No gradient flows
    through the gathered rows (keys, memory-bank updates and predictions need none)."""
    if not is_distributed():
        return tensor
    sizes = sizes if sizes is not None else gather_sizes(tensor.shape[0], tensor.device)
    longest = max(sizes)
    source = tensor.detach().contiguous()
    if source.shape[0] < longest:
        padded = source.new_zeros((longest, *source.shape[1:]))
        padded[:source.shape[0]] = source
        source = padded
    parts = [torch.empty_like(source) for _ in sizes]
    dist.all_gather(parts, source)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def rank_offsets(sizes: list[int]) -> list[int]:
    """Where each rank's rows start in the rows of all ranks."""
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += n
    return starts


def rank_rows(rows: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """The block of ``rows`` (all ranks', in rank order) that belongs to ``rank``."""
    start = rank_offsets(sizes)[rank]
    return rows[start:start + sizes[rank]]


def shuffled_slice(order: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Shuffle BN (MoCo, He et al. CVPR 2020, sec. 3.3): the global-batch rows that ``rank`` runs
    through the key encoder, i.e. its block of the shared permutation ``order``."""
    return rank_rows(order, sizes, rank)


def unshuffle(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo a shuffle: ``rows[j]`` belongs to global sample ``order[j]``; the result is in sample
    order (``out[order[j]] = rows[j]``)."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def shared_permutation(n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of ``n`` drawn on rank 0 and broadcast, so every rank holds the same."""
    order = torch.randperm(n, device=device)
    if is_distributed():
        dist.broadcast(order, src=0)
    return order

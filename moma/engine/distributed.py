"""Process-group plumbing for ``torchrun``; in a single process every helper is a no-op.

``torchrun --nproc_per_node N -m moma distill ...`` runs the same command in N processes: NCCL
on CUDA, gloo on CPU. The distillation task's student is wrapped in DistributedDataParallel; the
method's own trainable modules (connectors, projection heads) are small, so their gradients are
averaged with one all-reduce per step instead of a second DDP wrapper (and modules that
legitimately get no gradient, such as MoMA's key attention, need no ``find_unused_parameters``).
Everything else a method keeps (queues, memory banks, the teacher) starts from rank 0's copy and
stays identical because every rank applies the same gathered update.

A collective that one rank never reaches (it failed) would block the others forever; every
collective therefore has a timeout (``MOMA_DIST_TIMEOUT_MINUTES``, default 30), after which it
raises. Under torchrun the failed rank's non-zero exit also makes torchrun stop the others.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from moma.errors import ConfigError, MomaError
from moma.utils.collectives import unwrap_parallel

T = TypeVar("T")

TIMEOUT_ENV = "MOMA_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 30.0


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


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks before it raises."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = -1.0
    if not minutes > 0 or not math.isfinite(minutes):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def init_process_group(info: DistInfo, use_cuda: bool | None = None) -> None:
    """NCCL when the run uses CUDA, gloo otherwise (``use_cuda=None``: whenever CUDA is present)."""
    if not info.enabled or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    timeout = collective_timeout()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl", timeout=timeout, device_id=torch.device("cuda", info.local_rank))
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)


def destroy_process_group(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def run_on_main(make: Callable[[], T], info: DistInfo) -> T:
    """Rank 0 computes a picklable value and every rank returns it. An error on rank 0 is raised on
    every rank (the others would otherwise wait for a value that never comes)."""
    if not info.enabled:
        return make()
    payload: list = [None]
    error: BaseException | None = None
    if info.is_main:
        try:
            payload = [("value", make())]
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = exc
            shared = exc if isinstance(exc, MomaError) else MomaError(f"rank 0 failed: {type(exc).__name__}: {exc}")
            payload = [("error", shared)]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if error is not None:
        raise error
    if kind == "error":
        raise value
    return value


def broadcast_run_dir(make: Callable[[], Path], info: DistInfo) -> Path:
    """Rank 0 creates the run folder; every rank learns its path."""
    return Path(run_on_main(lambda: str(make()), info))


# ----------------------------------------------------------------------------- the training data


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: the same with any number of loader
    workers, persistent or not, and after a resume."""
    return (seed * 1_000_003 + epoch * 7919 + index * 104_729) % (2**63 - 1)


class EpochSampler(Sampler):
    """Training order of one epoch, set by ``set_epoch``; yields ``(index, augmentation seed)``.

    One process: a permutation of the data set seeded by ``epoch_seed(seed, epoch)``. Several
    processes: ``DistributedSampler``'s order (seeded by ``seed + epoch``, padded so that every
    rank has the same number of samples, rank r taking every world_size-th sample). The loader can
    keep its workers across epochs (``persistent_workers``): nothing random happens in a worker
    except the augmentation, and that is seeded per sample."""

    def __init__(self, num_samples: int, seed: int, info: DistInfo):
        from torch.utils.data import DistributedSampler

        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._distributed = None
        if info.enabled:
            self._distributed = DistributedSampler(range(num_samples), num_replicas=info.world_size, rank=info.rank,
                                                   shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self._distributed is not None:
            self._distributed.set_epoch(epoch)

    def _order(self) -> list[int]:
        if self._distributed is not None:
            return list(self._distributed)
        from moma.engine.device import epoch_seed

        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._order():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return len(self._distributed) if self._distributed is not None else self.num_samples


class PoolSampler(Sampler):
    """Draws from the unlabelled pool for one round (epoch) of training: ``set_round(epoch, count)``.

    The draws of the whole run form one stream: position t of a rank's stream is global position
    g = t * world_size + rank, which is element g mod n of the seeded permutation number g // n of the
    pool. Round e covers stream positions [e * count, (e + 1) * count). So every tile is drawn once
    before any is drawn again, ranks never draw the same position, nothing is read up front, and a
    resumed run draws exactly what it would have drawn. Yields ``(row, augmentation seed)``."""

    def __init__(self, num_samples: int, seed: int, info: DistInfo):
        self.num_samples = num_samples
        self.seed = seed
        self.rank, self.world = (info.rank, info.world_size) if info.enabled else (0, 1)
        self.start = 0
        self.count = 0
        self._cycle = -1
        self._perm: torch.Tensor | None = None

    def set_round(self, round_id: int, count: int) -> None:
        self.start, self.count = round_id * count, count

    def _permutation(self, cycle: int) -> torch.Tensor:
        if cycle != self._cycle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, cycle, 0x5EED) % (2**31 - 1))
            self._perm, self._cycle = torch.randperm(self.num_samples, generator=generator), cycle
        return self._perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for t in range(self.start, self.start + self.count):
            g = t * self.world + self.rank
            cycle, position = divmod(g, self.num_samples)
            row = int(self._permutation(cycle)[position])
            yield row, sample_seed(self.seed + 1, cycle, row)

    def __len__(self) -> int:
        return self.count


# ----------------------------------------------------------------------------- models


def broadcast_module_state(module: nn.Module, info: DistInfo) -> None:
    """Every parameter and buffer of ``module`` takes rank 0's value (random initialisations of
    heads, queues and memory banks; a teacher's re-initialised classifier)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def wrap_task(task: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap the student in DDP (in place; DDP also broadcasts rank 0's student), give every rank
    rank 0's method and teacher, and return the module the loop calls."""
    if not info.enabled:
        return task
    from torch.nn.parallel import DistributedDataParallel as DDP

    broadcast_module_state(task.method, info)
    if task.teacher is not None:
        broadcast_module_state(task.teacher, info)
    device_ids = [device.index] if device.type == "cuda" else None
    task.student = DDP(task.student, device_ids=device_ids,
                       find_unused_parameters=task.method.student_has_unused_parameters)
    return task


@contextmanager
def unwrapped_student(task: nn.Module):
    """The task with its plain student tap for the duration (no ``module.`` in state-dict keys), so
    that a training state is the same whatever the number of processes that wrote or reads it."""
    wrapped = task.student
    plain = unwrap_parallel(wrapped)
    if plain is wrapped:
        yield task
        return
    task.student = plain
    try:
        yield task
    finally:
        task.student = wrapped


def sync_method_grads(task: nn.Module, info: DistInfo) -> None:
    """Average the gradients of the method's own trainable parameters across ranks, as DDP does:
    one all-reduce of the flattened gradients plus one flag per parameter that says whether this
    rank produced a gradient. A parameter that got a gradient on any rank gets the sum over ranks
    divided by the world size on every rank (a rank without one contributes zeros, as DDP with
    ``find_unused_parameters``); one that got none anywhere keeps ``grad=None`` everywhere, so the
    optimiser skips it on every rank alike."""
    if not info.enabled:
        return
    params = [p for p in task.method.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    pieces = [p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
              for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([*pieces, flags])
    dist.all_reduce(flat)
    present = flat[-len(params):].tolist()
    offset = 0
    for p, count in zip(params, present):
        if count > 0:
            mean = (flat[offset:offset + p.numel()] / info.world_size).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = mean
            else:
                p.grad.copy_(mean)
        offset += p.numel()


def mean_across_ranks(values: dict[str, float], device: torch.device, info: DistInfo) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= info.world_size
    return dict(zip(keys, tensor.tolist()))

"""The optimiser and the learning-rate schedule of a run.

The learning rate is ``optim.lr``, or ``optim.lr_base`` scaled linearly with the global batch
(Goyal et al. 2017); the schedule is per step: linear warm-up, then cosine to ``optim.min_lr``,
step decay at ``optim.step_epochs``, or constant.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch

from moma.config import Config, OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter] | list[dict], global_batch: int) -> torch.optim.Optimizer:
    """``params``: parameters, or optimiser groups (a group's own ``weight_decay`` wins)."""
    lr = cfg.optim.effective_lr(global_batch)
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def cosine_factor(progress: float, base_lr: float, min_lr: float) -> float:
    """Cosine from base_lr to min_lr, as a multiplier of base_lr."""
    floor = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(optim: OptimConfig, step: int, steps_per_epoch: int, base_lr: float, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps`` as a multiplier of
    ``base_lr``."""
    warmup = optim.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if optim.scheduler == "constant":
        return 1.0
    if optim.scheduler == "step":
        return 0.1 ** sum(step // steps_per_epoch >= e for e in optim.step_epochs)
    total = max(1, total_steps - warmup)
    return cosine_factor(min(1.0, (step - warmup) / total), base_lr, optim.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR; its multiplier is a plain function, so its state_dict holds numbers only."""
    base_lr = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        return lr_factor(optim, step, steps_per_epoch, base_lr, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restart_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer, base_lr: float,
                     step: int, multiplier: Callable[[int], float]) -> None:
    """Continue the schedule at optimiser step ``step`` with ``base_lr``: a run resumed with another
    number of processes has another global batch (so learning rate) and number of steps per epoch."""
    scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    scheduler.last_epoch = step
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * multiplier(step)

"""Exponential moving averages of weights, as one fused multi-tensor operation.

The momentum update of MoCo (He et al., CVPR 2020, eq. 2) and of MoMA's teacher:
:math:`\\theta_t \\leftarrow \\alpha\\,\\theta_t + (1-\\alpha)\\,\\theta_s`. It is written as
``torch._foreach_lerp_`` (one kernel launch per group of tensors, as timm's ``ModelEmaV3`` with
``foreach=True`` and lightly's ``update_momentum``) rather than a Python loop of ``mul_``/``add_``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    r"""In place, for every pair: :math:`t \leftarrow \alpha t + (1 - \alpha) s` with
    :math:`\alpha` = ``momentum`` (a lerp from t towards s with weight :math:`1 - \alpha`)."""
    if len(targets) != len(sources):
        raise ValueError(f"EMA needs as many sources as targets ({len(sources)} vs {len(targets)})")
    if not targets:
        return
    torch._foreach_lerp_(targets, [s.detach() for s in sources], 1.0 - momentum)


@torch.no_grad()
def copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """In place, for every pair: ``t <- s``."""
    if targets:
        torch._foreach_copy_(targets, [s.detach() for s in sources])


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    r"""Momentum rising from ``base`` to 1 along a half cosine (BYOL, Grill et al. 2020, sec. 3.2;
    MoCo v3, Chen et al. 2021): :math:`\alpha_k = 1 - (1 - \alpha_0)\,(\cos(\pi k / K) + 1) / 2`."""
    progress = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def paired_buffers(target: nn.Module, source: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Buffers of two modules of the same structure, paired by name (shapes checked)."""
    return _pair(dict(target.named_buffers()), dict(source.named_buffers()))


def _pair(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]):
    if target.keys() != source.keys():
        only = sorted(set(target) ^ set(source))
        raise ValueError(f"modules differ in structure (e.g. '{only[0]}' is in only one of them)")
    for name, tensor in target.items():
        if tensor.shape != source[name].shape:
            raise ValueError(f"'{name}' has shape {tuple(tensor.shape)} in one module, {tuple(source[name].shape)} in the other")
    names = list(target)
    return [target[n] for n in names], [source[n] for n in names]

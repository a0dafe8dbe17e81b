"""Device, precision and seeding, chosen at run time (never a hard-coded ``.cuda()``)."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext

import numpy as np
import torch

from moma.errors import ConfigError


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"run.device '{spec}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device '{spec}': CUDA is not available on this machine; use run.device=cpu or auto")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. 'auto' is bf16 on CUDA and off on CPU (slow there)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor's memory (about 350 extra fill_ kernels per
        # ResNet-18 step); that only exposes reads of uninitialised memory, which no op here makes,
        # and results stay deterministic without it (PyTorch's note on fill_uninitialized_memory).
        torch.utils.deterministic.fill_uninitialized_memory = False


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: an epoch replays identically whether or not the run was resumed."""
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)

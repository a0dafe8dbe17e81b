"""The training state (``state.pt``): everything needed to resume a run, in a file that cannot
carry code.

It is written with ``torch.save`` but holds only tensors, numbers, strings, ``None`` and
dicts/lists/tuples of them, so ``torch.load(weights_only=True)`` reads it: that loader rebuilds
only those types and refuses any other object a pickle names (an object whose unpickling would
run a command is refused, not built). Run folders travel between people and machines; resuming one
must never execute what is in it. The NumPy RNG state, the one non-plain part, is stored as a
tensor of its key.

A file that is not such a state (an earlier version's full pickle, a foreign file, a damaged one)
is refused with a one-line message that names it and says what is wrong.
"""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moma.errors import CheckpointError
from moma.utils.io import atomic_path

STATE_FORMAT = "moma-distill training state"
STATE_VERSION = 2
REQUIRED_KEYS = ("epoch", "world_size", "task", "optimizer", "scheduler", "scaler", "rng", "best_score", "best_epoch",
                 "history", "times", "best_weights")
PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor)


@dataclass
class StepTimes:
    """Wall-clock seconds per step, split into data wait, compute and the method's extras."""

    data: float = 0.0
    compute: float = 0.0
    extras: float = 0.0
    steps: int = 0
    images: int = 0

    def as_dict(self) -> dict[str, float]:
        n = max(self.steps, 1)
        total = self.data + self.compute
        return {
            "data_wait_ms": 1000 * self.data / n,
            "forward_backward_ms": 1000 * (self.compute - self.extras) / n,
            "distill_extras_ms": 1000 * self.extras / n,
            "data_wait_share": self.data / total if total else 0.0,
            "images_per_second": self.images / total if total else 0.0,
        }


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    times: StepTimes = field(default_factory=StepTimes)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's (and CUDA's) generator states, as plain values and tensors."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def plain(value: Any, where: str = "state") -> Any:
    """``value`` with NumPy scalars turned into Python numbers; anything that is not a tensor,
    number, string, None or a dict/list/tuple of those is an error here, when the state is written,
    rather than a file that cannot be read back."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PLAIN_TYPES):
        return value
    if isinstance(value, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where}: {type(value).__name__} is not allowed in a training state (tensors and plain values only)")


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    content = plain({"format": STATE_FORMAT, "version": STATE_VERSION, **state})
    with atomic_path(path) as tmp:
        torch.save(content, tmp)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The state saved by :func:`save_training_state`, read without running any code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found: this run has no completed epoch to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"training state {path}: refused, it holds objects other than tensors and plain values, and loading "
            "those could run code (an earlier moma-distill's state.pt, or not ours); train the run again"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises several kinds for a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"training state {path}: cannot be read, the file is damaged or not a training "
                              f"state ({first})") from None
    return check_state(state, path)


def check_state(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"training state {path}: not a moma-distill training state (no '{STATE_FORMAT}' "
                              "marker); resume only folders written by `moma train`/`moma distill`")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"training state {path}: format version {state.get('version')!r}, this moma-distill "
                              f"reads version {STATE_VERSION}; train the run again")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"training state {path}: incomplete, missing {', '.join(repr(k) for k in missing)} "
                              "(the file is damaged)")
    return state


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)``, with a mismatch reported in one line that names the file."""
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    problem = "; ".join(f"{kind} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
                        for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    if not problem:
        try:
            module.load_state_dict(state)
            return
        except RuntimeError as exc:  # shapes differ: torch lists them, one per line
            problem = str(exc).strip().splitlines()[-1].strip()
    raise CheckpointError(f"training state {path} does not fit this run's model ({problem}); was the run "
                          "folder's config.yaml changed?")

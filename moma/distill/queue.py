"""A first-in-first-out queue of key vectors: MoCo's dictionary of negatives.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(arXiv 1911.05722), sec. 3.2: the keys of the current mini-batch are enqueued and the oldest are
dequeued, so the dictionary holds the keys of the last K samples.

Queue and pointer are persistent buffers, so a resumed run continues where it stopped (the
official MoMA code keeps the pointer as a Python int, which a restart resets to slot 0). Unlike
MoCo's ``_dequeue_and_enqueue``, the batch need not divide K: writes wrap around.

A step's keys are written only after its backward pass (:meth:`KeyQueue.stage`, then
:meth:`KeyQueue.commit` after the optimiser step): the InfoNCE logits read the queue in place, and
autograd needs those values unchanged until backward has used them. Staging avoids copying the
whole K x D queue every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """K key vectors of dimension ``dim``, initialised as random unit vectors (randn, then L2
    normalisation, as MoCo and the official MoMA code)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a key queue needs a positive size and dimension (got {size} x {dim})")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # slot the next key goes to
        self._staged: torch.Tensor | None = None  # keys of the last step, written by commit()

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, dim) into the next n slots, wrapping around; the pointer advances by n.
        With n > K only the last K keys survive, as they would with one-by-one writes."""
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"expected keys of shape (n, {self.keys.shape[1]}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n == 0:
            return
        kept = keys[-self.size:] if n > self.size else keys
        first = self.ptr + (n - kept.shape[0])
        slots = (first + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        self.keys.index_copy_(0, slots, kept.detach().to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def stage(self, keys: torch.Tensor) -> None:
        """Hold ``keys`` for the next :meth:`commit` (a second stage before a commit replaces them)."""
        self._staged = keys.detach()

    def commit(self) -> None:
        """Enqueue the staged keys, at most once."""
        if self._staged is not None:
            staged, self._staged = self._staged, None
            self.enqueue(staged)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.keys.shape[1]}"

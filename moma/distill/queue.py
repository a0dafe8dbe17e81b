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

Each slot also records whose key it holds (the sample's row in the training set, ``NEVER`` for a
slot not yet written), so that :meth:`KeyQueue.negative_mask` can leave out, per query, the slots
still holding their random initial vector and the slots holding the query's own earlier key: a
memory that cannot lie (MoCo's queue keeps both: a query meets random vectors for the first K / B
steps and its own stale key once per pass when K is about the training-set size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


NEVER = -1  # owner of a slot that still holds its random initial vector
UNKNOWN = -2  # owner of a key written without its sample's row


class KeyQueue(nn.Module):
    """K key vectors of dimension ``dim``, initialised as random unit vectors (randn, then L2
    normalisation, as MoCo and the official MoMA code), and the owner of each slot."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a key queue needs a positive size and dimension (got {size} x {dim})")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # slot the next key goes to
        self.register_buffer("owners", torch.full((size,), NEVER, dtype=torch.long))
        self._staged: tuple[torch.Tensor, torch.Tensor | None] | None = None  # written by commit()

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, owners: torch.Tensor | None = None) -> None:
        """Write ``keys`` (n, dim) into the next n slots, wrapping around; the pointer advances by n.
        With n > K only the last K keys survive, as they would with one-by-one writes. ``owners``:
        the training-set row of each key (None: unknown, never masked as a query's own key)."""
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"expected keys of shape (n, {self.keys.shape[1]}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n == 0:
            return
        if owners is None:
            owners = torch.full((n,), UNKNOWN, dtype=torch.long, device=self.keys.device)
        kept = keys[-self.size:] if n > self.size else keys
        first = self.ptr + (n - kept.shape[0])
        slots = (first + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        self.keys.index_copy_(0, slots, kept.detach().to(self.keys.dtype))
        self.owners.index_copy_(0, slots, owners[-kept.shape[0]:].to(self.owners))
        self.ptr.copy_((self.ptr + n) % self.size)

    def negative_mask(self, index: torch.Tensor) -> torch.Tensor:
        """(N, K) bool: True where slot j may serve query i as a negative, i.e. it has been written
        and does not hold a key of sample ``index[i]``."""
        written = self.owners != NEVER
        return written.unsqueeze(0) & (self.owners.unsqueeze(0) != index.view(-1, 1))

    def stage(self, keys: torch.Tensor, owners: torch.Tensor | None = None) -> None:
        """Hold ``keys`` for the next :meth:`commit` (a second stage before a commit replaces them)."""
        self._staged = (keys.detach(), None if owners is None else owners.detach())

    def commit(self) -> None:
        """Enqueue the staged keys, at most once."""
        if self._staged is not None:
            (keys, owners), self._staged = self._staged, None
            self.enqueue(keys, owners)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.keys.shape[1]}"

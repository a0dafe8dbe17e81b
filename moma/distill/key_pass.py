"""The teacher side of MoMA with a momentum teacher: the key pass, with BatchNorm in train mode and
shuffled ("shuffle BN", MoCo sec. 3.3) so that a key's batch statistics do not come from its
query's samples, and the keys gathered across processes for the queue."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from moma.models.taps import FeatureTap, TapOutputs
from moma.utils import collectives


@dataclass
class KeyPass(TapOutputs):
    """The teacher side of one MoMA step: the teacher's outputs (logits for the KL term) and the
    L2-normalised keys of the batch, in the batch's order. ``key_order`` is the permutation of a
    shuffle-BN pass across processes (the queue receives the gathered keys in that order)."""

    keys: torch.Tensor | None = None
    key_order: torch.Tensor | None = None


def pooled_features(model: nn.Module, out: TapOutputs) -> torch.Tensor:
    """The globally pooled feature vector the projection head reads (the code's ``feat[-1]``, the
    average-pooled map before dropout and classifier). For timm models whose ``global_pool`` output
    is the pre-logits embedding, the pooled map is used so that head dropout (efficientnet_b0:
    0.2) does not reach the query; otherwise timm's pre-logits embedding."""
    pool = getattr(model, "global_pool", None)
    fmap = out.feature_map
    if isinstance(pool, nn.Module) and fmap is not None and fmap.ndim == 4:
        pooled = pool(fmap).flatten(1)
        if pooled.shape[1] == out.embedding.shape[1]:
            return pooled
    return out.embedding.flatten(1)


def _norm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextmanager
def batchnorm_mode(model: nn.Module, training: bool):
    """Every BatchNorm layer of ``model`` in train (batch statistics, running stats updated) or eval
    mode for the duration, the rest of the model untouched (dropout stays as it is); restored after.
    The code's ``model_t.apply(set_bn_train)``, without leaving the teacher changed."""
    norms = _norm_layers(model)
    previous = [m.training for m in norms]
    for m in norms:
        m.training = training
    try:
        yield
    finally:
        for m, was in zip(norms, previous):
            m.training = was


@contextmanager
def running_stats_frozen(model: nn.Module):
    """BatchNorm layers normalise with batch statistics but leave their running statistics as they
    are (``track_running_stats`` off for the duration)."""
    norms = [m for m in _norm_layers(model) if m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def split_batch_forward(teacher: FeatureTap, images: torch.Tensor, splits: int) -> KeyPass:
    """Single-process stand-in for shuffle BN (MoCo sec. 3.3; the code's ``_shuffle_bn``): the batch
    is randomly permuted and cut into sub-batches that the teacher normalises separately, so a
    key's BatchNorm statistics come from other samples than its query's. Only the first
    sub-batch updates the running statistics, as each GPU's own teacher does in the code.
    Returns pooled features in ``embedding`` and logits, un-shuffled; ``splits`` 1: one plain pass.
    Several processes use the real shuffle BN across ranks (:func:`shuffle_across_ranks`)."""
    if splits == 1:
        out = teacher(images)
        return KeyPass(logits=out.logits, embedding=pooled_features(teacher.model, out))
    order = torch.randperm(images.shape[0], device=images.device)
    pooled, logits = [], []
    for i, chunk in enumerate(images[order].tensor_split(splits)):
        with running_stats_frozen(teacher) if i else nullcontext():
            out = teacher(chunk)
        pooled.append(pooled_features(teacher.model, out))
        logits.append(out.logits)
    restore = torch.argsort(order)
    return KeyPass(logits=torch.cat(logits)[restore], embedding=torch.cat(pooled)[restore])


def shuffle_across_ranks(teacher: FeatureTap, images: torch.Tensor) -> KeyPass:
    """Shuffle BN as the code's ``ContrastTrainer._shuffle_bn``: the images of all ranks are
    gathered, permuted by one random order drawn on rank 0 and broadcast, and each rank runs
    its teacher (BatchNorm on batch statistics) on its block of the shuffled global batch; the
    pooled features and logits are gathered and un-shuffled, and each rank keeps its own
    samples' rows. The order travels with the result, for :func:`gather_keys`."""
    rank = torch.distributed.get_rank()
    sizes = collectives.gather_sizes(images.shape[0], images.device)
    everyone = collectives.all_gather_rows(images, sizes)
    order = collectives.shared_permutation(sum(sizes), images.device)
    mine = everyone[collectives.shuffled_slice(order, sizes, rank)]
    if images.is_contiguous(memory_format=torch.channels_last):
        mine = mine.contiguous(memory_format=torch.channels_last)
    out = teacher(mine)
    pooled = pooled_features(teacher.model, out)
    rows = torch.cat([pooled.float(), out.logits.float()], dim=1)
    own = collectives.rank_rows(collectives.unshuffle(collectives.all_gather_rows(rows, sizes), order), sizes, rank)
    width = pooled.shape[1]
    return KeyPass(logits=own[:, width:].to(out.logits.dtype), embedding=own[:, :width].to(pooled.dtype),
                   key_order=order)


def gather_keys(keys: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Keys of every process, for the queue (the code's ``all_k``). One process: its own.
    After a shuffled key pass they come in the shuffled order, as the code's ``all_k`` (each
    GPU's keys of its shuffled block, gathered)."""
    if not collectives.is_distributed():
        return keys
    everyone = collectives.all_gather_rows(keys)
    return everyone if order is None else everyone[order]

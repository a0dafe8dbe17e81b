"""Contrastive building blocks shared by MoMA's variants: the InfoNCE loss over a positive key and
a memory of negatives, the projection head, and the diagnostics that say whether the contrastive
term carries per-sample information (docs/moma.md, "Diagnostics")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def infonce_logits(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""MoCo logits (He et al., CVPR 2020, eq. 1; MoMA ``MoCo._compute_logit``), in float32:

    .. math:: \ell_i = \big[\, q_i \cdot k_i^{+},\; q_i \cdot n_1,\; \dots,\; q_i \cdot n_K \,\big] / \tau

    ``query`` and ``positive`` are (N, D), ``negatives`` the queue (K, D); returns (N, 1 + K).
    ``mask`` (N, K): False leaves negative j out of row i (its logit is -inf).
    """
    with torch.autocast(query.device.type, enabled=False):
        q = query.float()
        pos = (q * positive.float()).sum(dim=1, keepdim=True)
        neg = q @ negatives.float().t()
        if mask is not None:
            neg = neg.masked_fill(~mask, float("-inf"))
        return torch.cat([pos, neg], dim=1) / temperature


def infonce_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""InfoNCE with the positive at index 0 (MoMA's :math:`L_{NCE}`, the code's ``CrossEntropyLoss``
    on the logits of :func:`infonce_logits` with label 0), averaged over the batch:

    .. math:: L_{NCE} = -\frac{1}{N}\sum_i \log \frac{\exp(q_i \cdot k_i^{+} / \tau)}
              {\exp(q_i \cdot k_i^{+} / \tau) + \sum_{j=1}^{K} \exp(q_i \cdot n_j / \tau)}
    """
    logits = infonce_logits(query, positive, negatives, temperature, mask)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))




class ProjectionHead(nn.Module):
    """The code's ``--head mlp``: Linear(d, d) -> ReLU -> Linear(d, feat_dim) -> L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x.flatten(1)), dim=1)




def contrast_diagnostics(query: torch.Tensor, positive: torch.Tensor, negatives: int | torch.Tensor) -> dict[str, torch.Tensor]:
    """Whether the contrastive term carries per-sample information (logged, never back-propagated):
    its chance level ln(K + 1), K the negatives each query meets (``negatives``: one number, or one
    per query when the memory masks slots; the mean over queries); the mean pairwise cosine of the queries and of the positive keys
    within the batch (1 = every sample maps to the same vector); in-batch retrieval, the share of
    queries whose best-scoring positive key is their own (chance 1/N); the mean query norm."""
    with torch.no_grad():
        return {
            "nce_chance": torch.log(torch.as_tensor(negatives, dtype=torch.float32, device=query.device) + 1).mean(),
            "nce_query_cos": mean_pairwise_cosine(query),
            "nce_key_cos": mean_pairwise_cosine(positive),
            "nce_retrieval": in_batch_retrieval(query, positive),
            "nce_query_norm": query.float().norm(dim=1).mean(),
            "nce_agreement": key_agreement(query, positive),
        }


def in_batch_retrieval(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Share of queries whose highest-scoring key among the batch's keys is their own (row i of
    ``keys``); chance 1/N. Logged, never back-propagated."""
    with torch.no_grad():
        scores = query.float() @ keys.float().t()
        return (scores.argmax(dim=1) == torch.arange(len(query), device=query.device)).float().mean()


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the N(N - 1) ordered pairs of distinct rows of ``x``."""
    n = x.shape[0]
    if n < 2:
        return torch.tensor(float("nan"), device=x.device)
    unit = F.normalize(x.float(), dim=1)
    total = unit.sum(dim=0)
    return (total @ total - n) / (n * (n - 1))  # sum over all pairs minus the N self-pairs


def batch_negative_mask(index: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: True where the key of row j may serve query i as an in-batch negative (another
    sample: j's training-set row differs from i's, which also leaves out the diagonal)."""
    return index.view(-1, 1) != index.view(1, -1)


def key_agreement(query: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each query with its own key minus the mean cosine with the other samples' keys
    of the batch: how far the student's embedding follows the teacher's per sample (0: not at all,
    whatever the two spaces' overall alignment; up to 2). Logged, never back-propagated."""
    with torch.no_grad():
        n = query.shape[0]
        if n < 2:
            return torch.tensor(float("nan"), device=query.device)
        cos = F.normalize(query.float(), dim=1) @ F.normalize(positive.float(), dim=1).t()
        matched = cos.diagonal().mean()
        unmatched = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
        return matched - unmatched

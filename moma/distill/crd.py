"""Contrastive Representation Distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020, arXiv 1910.10699).

The pooled features of both networks are embedded (a linear map and L2 normalisation, 128-d). Two
memory banks hold a momentum average of every training image's embedding, one per network. Each
student embedding is scored against the teacher bank's entry of the same image (the positive) and
K entries of other images (the negatives), and each teacher embedding likewise against the
student bank; the critic is h = exp(<v, m> / tau) / Z and the objective the NCE loss with uniform
noise. This is RepDistiller's ``ContrastMemory`` + ``ContrastLoss`` formulation.

Defaults follow RepDistiller (``-a 0 -b 0.8``, feat_dim 128, nce_k 16384, nce_t 0.07,
nce_m 0.5, mode 'exact'). As in RepDistiller's (and the official MoMA code's) instance-sampling
data sets, the negatives of an image are drawn from the images of the *other* classes
(``negatives='other_class'``); ``'other_sample'`` draws from every other image instead.

Where this differs from the reference code:

- the banks have one row per training image; the official MoMA code sizes them for ImageNet
  (1,281,167 rows) on every data set;
- negatives are drawn with replacement, in the training process (RepDistiller and torchdistill's
  ``CRDDatasetWrapper`` draw them without replacement in the data loader when the pool exceeds K),
  so the data pipeline is the same for every method;
- the banks are updated in :meth:`after_step` (after the optimiser step) instead of at the end
  of the forward pass; the next step sees the same bank either way.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moma.distill.base import DistillMethod, MethodContext, MethodParams
from moma.distill.registry import register_method
from moma.errors import ConfigError
from moma.utils.collectives import all_gather_rows

log = logging.getLogger(__name__)

NCE_EPS = 1e-7  # RepDistiller's eps in ContrastLoss


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    r"""NCE loss of CRD (Tian et al., ICLR 2020; RepDistiller's ``ContrastLoss``, its eq. 18).

    ``scores`` is ``[B, K+1]``: column 0 holds :math:`h(v_i, m_{i})` for the positive, columns
    1..K the negatives' :math:`h(v_i, m_{j})`, with :math:`h = \exp(\langle v, m\rangle/\tau)/Z`.
    With the uniform noise distribution :math:`P_n = 1/N` over the N training images:

    .. math:: L = -\frac{1}{B}\sum_i \Big[\log\frac{h_{i0}}{h_{i0} + K/N}
              + \sum_{k=1}^{K} \log\frac{K/N}{h_{ik} + K/N}\Big]

    (an ``eps`` of 1e-7 is added to each denominator, as in RepDistiller).
    """
    k = scores.shape[1] - 1
    noise = k / float(num_data)
    positive = scores[:, 0]
    negatives = scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + NCE_EPS))
    log_d0 = torch.log(noise / (negatives + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, sample_idx: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Unnormalised critic :math:`\exp(\langle m_j, v_i\rangle / \tau)` for each anchor
    :math:`v_i` (``[B, D]``) and the memory rows :math:`j` listed in ``sample_idx[i]`` (``[B, K+1]``).

    The bank is a constant here (no gradient). When the bank is smaller than the gathered rows
    (N < (K+1)·D), all N scores are computed with one matrix product and the wanted ones picked,
    which needs far less memory than gathering B·(K+1)·D bank entries.
    """
    bank = memory.detach()
    if bank.shape[0] <= sample_idx.shape[1] * bank.shape[1]:
        logits = (anchor @ bank.t()).gather(1, sample_idx)
    else:
        rows = bank[sample_idx]  # [B, K+1, D]
        logits = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(logits / temperature)


def momentum_update(rows: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    r"""Memory update of CRD (RepDistiller's ``ContrastMemory``):
    :math:`m \leftarrow \frac{\mu m + (1-\mu) v}{\lVert \mu m + (1-\mu) v \rVert_2}`."""
    mixed = rows * momentum + new * (1.0 - momentum)
    return mixed / mixed.norm(dim=1, keepdim=True)


def draw_other_rows(index: torch.Tensor, k: int, num_rows: int) -> torch.Tensor:
    """``[B, k]`` rows drawn uniformly, with replacement, from ``0..num_rows-1`` minus each ``index``."""
    draws = torch.randint(0, num_rows - 1, (index.shape[0], k), device=index.device)
    return draws + (draws >= index.unsqueeze(1)).long()


def draw_other_class_rows(target: torch.Tensor, k: int, rows_by_class: torch.Tensor,
                          class_start: torch.Tensor, class_count: torch.Tensor) -> torch.Tensor:
    """``[B, k]`` rows drawn uniformly, with replacement, from the rows whose class is not
    ``target``. ``rows_by_class`` lists the row indices sorted by class; class c occupies
    positions ``class_start[c] .. class_start[c] + class_count[c] - 1``."""
    start = class_start[target].unsqueeze(1)
    count = class_count[target].unsqueeze(1)
    pool = rows_by_class.shape[0] - count
    uniform = torch.rand(target.shape[0], k, device=target.device, dtype=torch.float64)
    position = torch.minimum((uniform * pool).long(), pool - 1)
    position = position + count * (position >= start).long()  # skip the target class's block
    return rows_by_class[position]


class Embed(nn.Module):
    """Linear map to ``feat_dim`` and L2 normalisation (RepDistiller's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


def _random_bank(rows: int, dim: int) -> torch.Tensor:
    """RepDistiller's initial bank: uniform in +-1/sqrt(D/3), so rows have unit norm on average."""
    bound = 1.0 / math.sqrt(dim / 3)
    return torch.rand(rows, dim).mul_(2 * bound).sub_(bound)


@register_method
class CRD(DistillMethod):
    name = "crd"
    summary = "contrastive representation distillation: NCE against memory banks of both networks' embeddings"
    reference = "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020 (arXiv 1910.10699)"

    class Params(MethodParams):
        beta: float = 0.8
        feat_dim: int = Field(128, ge=1)
        nce_k: int = Field(16384, ge=1)
        nce_t: float = Field(0.07, gt=0.0)
        nce_m: float = Field(0.5, ge=0.0, lt=1.0)
        negatives: Literal["other_class", "other_sample"] = "other_class"

    def __init__(self, params: Params, ctx: MethodContext):
        super().__init__(params, ctx)
        self.num_data = ctx.num_train_samples
        if self.num_data < 2:
            raise ConfigError(f"distill.method 'crd' needs at least 2 training images (got {self.num_data})")
        self.nce_k = params.nce_k
        if self.nce_k >= self.num_data:
            self.nce_k = self.num_data - 1
            log.warning("crd: nce_k=%d is not below the %d training images; using nce_k=%d",
                        params.nce_k, self.num_data, self.nce_k)
        self.embed_s = Embed(ctx.student_probe.embedding.shape[1], params.feat_dim)
        self.embed_t = Embed(ctx.teacher_probe.embedding.shape[1], params.feat_dim)
        self.register_buffer("memory_s", _random_bank(self.num_data, params.feat_dim))
        self.register_buffer("memory_t", _random_bank(self.num_data, params.feat_dim))
        self.register_buffer("normaliser", torch.full((2,), -1.0))  # Z of (student, teacher) anchors; -1 = unset
        self.by_class = params.negatives == "other_class" and self._index_classes(ctx.train_targets)
        self.loss_weights = {"crd": params.beta}
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._normaliser_known = False

    def _index_classes(self, targets: torch.Tensor | None) -> bool:
        """Buffers for class-aware sampling; False (with a warning) when it is not possible."""
        if targets is None or len(targets) != self.num_data:
            log.warning("crd: the training labels are not known here; negatives are drawn from every other image")
            return False
        targets = torch.as_tensor(targets, dtype=torch.long).cpu()
        if (targets < 0).any():
            log.warning("crd: the unlabelled pool has no classes; negatives are drawn from every other image")
            return False
        count = torch.bincount(targets)
        if (self.num_data - count[targets]).min() < 1:
            log.warning("crd: the training set has a single class; negatives are drawn from every other image")
            return False
        self.register_buffer("rows_by_class", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count, persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        return True

    def contrast_indices(self, index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B, K+1]`` bank rows: the positive (the image itself, mode 'exact') then K negatives."""
        if self.by_class:
            negatives = draw_other_class_rows(target, self.nce_k, self.rows_by_class, self.class_start, self.class_count)
        else:
            negatives = draw_other_rows(index, self.nce_k, self.num_data)
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def forward(self, student, teacher, batch):
        # float32 throughout: exp(<v, m> / 0.07) magnifies the rounding of half-precision products
        with torch.autocast(device_type=batch.index.device.type, enabled=False):
            v_s = self.embed_s(student.embedding)
            v_t = self.embed_t(teacher.embedding)
            sample_idx = self.contrast_indices(batch.index, batch.target)
            scores_s = contrast_scores(v_s, self.memory_t, sample_idx, self.params.nce_t)  # student anchors
            scores_t = contrast_scores(v_t, self.memory_s, sample_idx, self.params.nce_t)  # teacher anchors
            z = self._normaliser(scores_s, scores_t)
            loss = nce_loss(scores_s / z[0], self.num_data) + nce_loss(scores_t / z[1], self.num_data)
        if self.training:
            self._pending = (batch.index, v_s.detach(), v_t.detach())
        return {"crd": loss}

    def _normaliser(self, scores_s: torch.Tensor, scores_t: torch.Tensor) -> torch.Tensor:
        """Z of (student, teacher) anchors, estimated once from the first batch as mean(score) * N
        (RepDistiller), then kept (a buffer, so a resumed run keeps it)."""
        if not self._normaliser_known:  # the buffer is read once per process, not every step
            self._normaliser_known = bool(self.normaliser[0] > 0)
        if not self._normaliser_known:
            with torch.no_grad():
                means = torch.stack([scores_s.mean(), scores_t.mean()]).unsqueeze(0)
                self.normaliser.copy_(self._gather(means).mean(0) * self.num_data)
            self._normaliser_known = True
            log.info("crd: normalisation constants Z set to %.1f (student) and %.1f (teacher)", *self.normaliser.tolist())
        return self.normaliser

    def after_step(self) -> None:
        """Momentum update of both banks at this step's images."""
        if self._pending is None:
            return
        index, v_s, v_t = (self._gather(t) for t in self._pending)
        self._pending = None
        with torch.no_grad():
            momentum = self.params.nce_m
            self.memory_s[index] = momentum_update(self.memory_s[index], v_s.float(), momentum)
            self.memory_t[index] = momentum_update(self.memory_t[index], v_t.float(), momentum)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """This step's rows from every process, concatenated along dim 0 in rank order (identity in
        one process), so that every rank applies the same update to its banks and Z."""
        return all_gather_rows(tensor)

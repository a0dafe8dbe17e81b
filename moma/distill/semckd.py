"""Cross-layer distillation with semantic calibration (Chen, Mei, Wang, Feng & Chen, "Cross-Layer
Distillation with Semantic Calibration", AAAI 2021, arXiv 2012.03236).

Every intermediate stage of the student is projected onto every intermediate stage of the
teacher by its own learned connector, and the squared errors of the pairs are mixed with
per-sample attention weights: each student stage asks (query) which teacher stages (keys) carry
the semantics it should match. Queries and keys embed each sample's row of the stage's
batch-similarity matrix F F^T (B x B), as the authors' ``SelfA`` module does; the attention is a
softmax over the teacher stages.

Stages: RepDistiller-style ``feat[1:-1]`` of both networks as in the authors' code, i.e. timm
feature stages 1..n-1 (every stage but the stem), chosen separately for student and teacher.

Defaults: beta = 50 with cross-entropy 1 and no KL term. 50 is the SemCKD authors' own value for
ImageNet-style networks (their ResNet-34 -> ResNet-18 run, with ``-a 1``, i.e. KL weight 1) and
the value of the official MoMA comparison script (``-c 1 -d 0 -b 50``), which uses the same
kind of networks as this toolkit; the authors' CIFAR-100 value is 400. The KL term stays off,
as for the other feature methods in RepDistiller-style benchmarks (``-a 0``), so the method also
works with a teacher trained on other classes; set ``distill.kl_weight=1`` for the authors' mix.

As in the authors' code, the query embeddings take rows of length B (the batch size), so the
attention is defined for full batches only: a smaller final batch of an epoch gets no SemCKD term
(the authors skip such a batch altogether).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moma.distill.base import DistillMethod, MethodContext, MethodParams
from moma.distill.registry import register_method
from moma.errors import ConfigError
from moma.models.taps import num_stages

log = logging.getLogger(__name__)


def batch_similarity(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` Gram matrix of the flattened maps, entry (a, b) = <F_a, F_b>, in float32 (sums
    over C*H*W products can overflow half precision)."""
    flat = feature_map.flatten(1).float()
    with torch.autocast(device_type=flat.device.type, enabled=False):
        return flat @ flat.t()


def semckd_loss(projected: list[list[torch.Tensor]], targets: list[list[torch.Tensor]],
                attention: torch.Tensor) -> torch.Tensor:
    r"""SemCKD loss (Chen et al., AAAI 2021; the authors' ``SemCKDLoss``):

    .. math:: L = \frac{1}{B\,S} \sum_{b=1}^{B} \sum_{s=1}^{S} \sum_{t=1}^{T}
              \alpha_{b,st} \, \frac{1}{C_t H W} \big\lVert P_{st}(F^s_{b,s}) - F^t_{b,t} \big\rVert_2^2

    ``projected[s][t]`` is student stage s projected onto teacher stage t and ``targets[s][t]``
    the (size-matched) teacher map; ``attention`` is ``[B, S, T]`` with rows summing to one.
    """
    batch, num_student, num_teacher = attention.shape
    per_pair = torch.stack([
        torch.stack([(projected[s][t].float() - targets[s][t].float()).pow(2).flatten(1).mean(1)
                     for t in range(num_teacher)], dim=1)
        for s in range(num_student)
    ], dim=1)  # [B, S, T]
    return (attention * per_pair).sum() / (batch * num_student)


class MLPEmbed(nn.Module):
    """Linear - ReLU - Linear - L2 normalisation (the authors' ``MLPEmbed``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, 2 * dim_out), nn.ReLU(), nn.Linear(2 * dim_out, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class StageAttention(nn.Module):
    """Per-sample weights of every (student stage, teacher stage) pair (the authors' ``SelfA``)."""

    def __init__(self, batch_size: int, num_student: int, num_teacher: int, factor: int = 4):
        super().__init__()
        dim = max(1, batch_size // factor)
        self.queries = nn.ModuleList(MLPEmbed(batch_size, dim) for _ in range(num_student))
        self.keys = nn.ModuleList(MLPEmbed(batch_size, dim) for _ in range(num_teacher))

    def forward(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        query = torch.stack([q(batch_similarity(m)) for q, m in zip(self.queries, student_maps)], dim=1)  # [B, S, d]
        key = torch.stack([k(batch_similarity(m)) for k, m in zip(self.keys, teacher_maps)], dim=2)  # [B, d, T]
        return torch.softmax(torch.bmm(query, key), dim=-1)


def stage_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """conv1x1 - BN - ReLU - conv3x3 - BN - ReLU - conv1x1, 2 x C_t wide inside (the authors' ``AAEmbed``)."""
    mid = 2 * teacher_channels
    return nn.Sequential(
        nn.Conv2d(student_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, teacher_channels, 1, bias=False),
    )


def _feature_stages(probe, model, who: str) -> tuple[int, ...]:
    stages = tuple(range(1, num_stages(model)))
    if not stages:
        raise ConfigError(f"distill.method 'semckd' needs a {who} with at least 2 feature stages")
    if any(probe.features[s].dim() != 4 for s in stages):
        raise ConfigError(f"distill.method 'semckd' needs convolutional feature maps (B, C, H, W) from the {who}")
    return stages


@register_method
class SemCKD(DistillMethod):
    name = "semckd"
    summary = "cross-layer feature distillation: every student stage to every teacher stage, attention-weighted MSE"
    reference = "Chen et al., Cross-Layer Distillation with Semantic Calibration, AAAI 2021 (arXiv 2012.03236)"

    class Params(MethodParams):
        beta: float = 50.0
        factor: int = Field(4, ge=1)  # query/key width = batch size // factor (the authors' SelfA)

    def __init__(self, params: Params, ctx: MethodContext):
        super().__init__(params, ctx)
        if not ctx.batch_size or ctx.batch_size < 2:
            raise ConfigError(f"distill.method 'semckd' needs a known batch size of at least 2 (got {ctx.batch_size})")
        self.batch_size = ctx.batch_size
        if self.batch_size // params.factor < 4:
            log.warning("semckd: batch size %d gives %d-d query/key embeddings (the authors use 64 // 4 = 16); "
                        "the stage attention is close to uniform", self.batch_size, max(1, self.batch_size // params.factor))
        self.student_stages = _feature_stages(ctx.student_probe, ctx.student.model, "student")
        self.teacher_stages = _feature_stages(ctx.teacher_probe, ctx.teacher.model, "teacher")
        s_channels = [ctx.student_probe.features[s].shape[1] for s in self.student_stages]
        t_channels = [ctx.teacher_probe.features[t].shape[1] for t in self.teacher_stages]
        self.connectors = nn.ModuleList(
            nn.ModuleList(stage_connector(sc, tc) for tc in t_channels) for sc in s_channels
        )
        self.attention = StageAttention(self.batch_size, len(s_channels), len(t_channels), params.factor)
        self.loss_weights = {"semckd": params.beta}

    def forward(self, student, teacher, batch):
        student_maps = [student.features[s] for s in self.student_stages]
        teacher_maps = [teacher.features[t].detach() for t in self.teacher_stages]
        if student_maps[0].shape[0] != self.batch_size:
            log.debug("semckd: a batch of %d (not %d) gets no SemCKD term", student_maps[0].shape[0], self.batch_size)
            return {"semckd": student_maps[0].new_zeros((), dtype=torch.float32)}
        attention = self.attention(student_maps, teacher_maps)
        projected, targets = [], []
        for connectors, s_map in zip(self.connectors, student_maps):
            pairs = [self._project(connector, s_map, t_map) for connector, t_map in zip(connectors, teacher_maps)]
            projected.append([p for p, _ in pairs])
            targets.append([t for _, t in pairs])
        return {"semckd": semckd_loss(projected, targets, attention)}

    @staticmethod
    def _project(connector: nn.Module, s_map: torch.Tensor, t_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The larger map is average-pooled to the smaller's size (per dimension), as the authors do."""
        size = (min(s_map.shape[-2], t_map.shape[-2]), min(s_map.shape[-1], t_map.shape[-1]))
        if tuple(s_map.shape[-2:]) != size:
            s_map = F.adaptive_avg_pool2d(s_map, size)
        if tuple(t_map.shape[-2:]) != size:
            t_map = F.adaptive_avg_pool2d(t_map, size)
        return connector(s_map), t_map

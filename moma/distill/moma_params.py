"""MoMA's parameters: the two presets (the design chosen on validation data and the published
code) and how the ``auto`` values (keys, momentum, queue size) resolve for a run."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import Field, model_validator

from moma.distill.base import MethodParams
from moma.distill.batch_attention import AttentionWiring

log = logging.getLogger(__name__)

PAPER_QUEUE_SIZE = 16384  # --nce_k in train_student_moma.py and scripts/run_moma.sh

#: Each preset fills the parameters the user leaves unset. ``default`` is the design chosen on
#: validation data (docs/moma.md, "Choosing the default"); ``official-code`` is the published code.
PRESETS: dict[str, dict[str, object]] = {
    "default": {"keys": "auto", "key_attention": "ema", "attention": "rezero", "normalize": True,
                "single_teacher_pass": True, "momentum": "auto", "queue_size": "auto", "mask_memory": True},
    "official-code": {"keys": "momentum", "key_attention": "frozen", "attention": "plain", "normalize": False,
                      "single_teacher_pass": False, "momentum": 0.999, "queue_size": PAPER_QUEUE_SIZE,
                      "mask_memory": False},
}
#: ``momentum: auto`` keeps the paper's ratio of run length to EMA horizon: about 5,000 optimiser
#: steps (50 epochs of ~100 steps) for a horizon of 1 / (1 - 0.999) = 1,000 steps.
AUTO_MOMENTUM_RATIO = 5.0
FALLBACK_MOMENTUM = 0.999


class MoMAParams(MethodParams):
    preset: Literal["default", "official-code"] = Field(
        "default", description="default: the design chosen on validation data; official-code: the published code "
        "(frozen key attentions, no residual, two teacher passes). Parameters set explicitly override the preset")
    keys: Literal["auto", "momentum", "teacher"] | None = Field(
        None, description="where the keys come from. momentum: a momentum teacher, an EMA of the student that starts "
        "as the teacher (the paper; needs the student's architecture); teacher: the frozen teacher through a key "
        "head whose EMA copy fills the memory (any teacher, any student start); auto: momentum when the student "
        "starts as a copy of the teacher, else teacher")
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] | None = Field(
        None, description="EMA coefficient alpha of teacher, key head and key attention (code: --alpha 0.999); "
        "auto = 1 - 5 / (optimiser steps of the run), which is 0.999 at the paper's run length")
    momentum_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: alpha rises from `momentum` to 1 over `momentum_steps` (BYOL / MoCo v3); not in MoMA")
    momentum_steps: int | None = Field(None, ge=1, description="optimiser steps of the cosine momentum schedule")
    nce_temperature: float = Field(0.15, gt=0.0, description="InfoNCE temperature tau (code: nce_t forced to 0.15 for moma)")
    queue_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="negatives K (code: --nce_k 16384); auto = min(16384, training tiles) rounded to the batch")
    feat_dim: int = Field(512, ge=1, description="projection width (code: --feat_dim, --head mlp)")
    num_heads: int = Field(4, ge=1, description="heads of the batch attention (hard-coded 4 in the code)")
    beta: float = Field(1.0, ge=0.0, description="weight of the nce term (code: -b, 1 in run_moma.sh)")
    key_attention: Literal["frozen", "ema"] | None = Field(
        None, description="frozen: two key attentions (positive, enqueued) left at their random init, as the code; "
        "ema: one key attention for both, an EMA of the query attention (the paper's figure)")
    attention: AttentionWiring | None = Field(
        None, description="plain: A(x) as the code; rezero: x + g*A(LN(x)) with per-channel gains g starting at 0")
    normalize: bool | None = Field(None, description="L2-normalise queries and keys after the attention")
    mask_memory: bool | None = Field(
        None, description="leave out of each query's negatives the queue slots never written (random initial "
        "vectors) and those holding the query's own earlier key (the code keeps both)")
    single_teacher_pass: bool | None = Field(
        None, description="take the KL logits from the key pass (after the EMA update): one teacher pass per step "
        "instead of the code's two")
    teacher_buffers: Literal["keep", "copy", "ema"] = Field(
        "keep", description="teacher BatchNorm running stats: keep (own, as the code), copy or EMA the student's")
    shuffle_bn: Literal["split", "none"] = Field(
        "split", description="single-process stand-in for shuffle BN in the key pass: split = permuted sub-batches")
    bn_splits: int = Field(2, ge=1, description="sub-batches of the split key pass (the paper ran 2 GPUs)")
    kl_teacher_bn: Literal["train", "eval"] = Field(
        "train", description="teacher BatchNorm mode of the KL logits pass (the code: train from the 2nd step of an epoch)")

    @model_validator(mode="after")
    def _resolve_preset(self) -> "MoMAParams":
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.feat_dim % self.num_heads:
            raise ValueError(f"feat_dim={self.feat_dim} must be divisible by num_heads={self.num_heads}")
        if self.momentum_schedule == "cosine" and self.momentum_steps is None:
            raise ValueError("momentum_schedule=cosine needs momentum_steps (the number of optimiser steps)")
        return self

    def overridden(self) -> dict[str, object]:
        """Parameters set explicitly that differ from the preset."""
        return {k: getattr(self, k) for k, v in PRESETS[self.preset].items()
                if k in self.model_fields_set and getattr(self, k) != v}


def resolve_momentum(requested: float | str, total_steps: int | None) -> float:
    """``auto``: :math:`1 - 5/S` for a run of S optimiser steps (0.999 at the paper's ~5,000)."""
    if requested != "auto":
        return float(requested)
    if not total_steps:
        log.warning("moma: momentum=auto needs the run's number of optimiser steps; using %g", FALLBACK_MOMENTUM)
        return FALLBACK_MOMENTUM
    return max(0.0, 1.0 - AUTO_MOMENTUM_RATIO / total_steps)


def resolve_queue_size(requested: int | str, num_train: int, batch_size: int | None, momentum: float | None = None) -> int:
    """``auto``: the paper's 16384, clamped to the largest multiple of the batch that does not exceed
    the training-set size (the queue then never holds more keys than there are training tiles).
    With ``momentum`` (keys from an EMA key head) also to at most half its horizon 1 / (1 - momentum)
    in batches, so no slot holds a key of a head that no longer exists."""
    if requested != "auto":
        return int(requested)
    size = min(PAPER_QUEUE_SIZE, max(num_train, 1))
    if momentum is not None and batch_size:
        horizon_steps = 1.0 / max(1.0 - momentum, 1e-12)
        size = min(size, batch_size * max(1, int(horizon_steps // 2)))
    if batch_size and size >= batch_size:
        size -= size % batch_size
    return size


def resolve_key_source(requested: str, student_from_teacher: bool) -> str:
    """``auto``: a momentum teacher where it works, i.e. when the student starts as a copy of the
    teacher (the EMA then averages two related networks); keys from the frozen teacher otherwise
    (from random weights the momentum teacher averages the teacher with an unrelated network)."""
    if requested != "auto":
        return requested
    return "momentum" if student_from_teacher else "teacher"

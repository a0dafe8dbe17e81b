"""The contract every distillation method follows.

A method is a ``torch.nn.Module``. It is built once from a :class:`MethodContext` (the shapes of
the student's and teacher's outputs on a dummy batch, the class counts, the training-set size),
declares which intermediate feature stages it needs from each network, and on every step turns
the student's and teacher's :class:`~moma.models.taps.TapOutputs` into *named, unweighted* loss
terms. Their weights live in ``loss_weights``; the training loop multiplies, sums and logs each
term, and knows nothing else about the method.

The shape follows timm's ``timm.task`` (a module whose forward returns named loss components)
and mdistiller's ``Distiller`` (the method owns its wiring). The cross-entropy term and the
optional KL term to the teacher's softened logits are the same for every method, so
:class:`~moma.distill.task.DistillationTask` adds them; a method only sets their default weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from moma.errors import ConfigError
from moma.models.taps import FeatureTap, TapOutputs
from moma.utils.validation import validation_message


class MethodParams(BaseModel):
    """Hyper-parameters of a method; subclasses add fields with the literature's defaults."""

    model_config = ConfigDict(extra="forbid")


UNLABELLED = -1  # the target of a tile from the unlabelled pool


@dataclass
class Batch:
    """One training step's tiles: ``num_labelled`` labelled rows first, then (with an unlabelled
    pool) tiles whose ``target`` is :data:`UNLABELLED`. Cross-entropy sees the labelled rows only;
    every distillation term sees all rows."""

    input: torch.Tensor  # images normalised for the student (its strong view with data.strong_augment)
    target: torch.Tensor  # class indices; UNLABELLED (-1) for pool tiles
    index: torch.Tensor  # row of each sample: 0..N-1 the labelled training set, N.. the pool (N + pool row)
    teacher_input: torch.Tensor | None = None  # the weak view of the same tiles, when it differs from input
    num_labelled: int | None = None  # None: every row is labelled
    view: torch.Tensor | None = None  # flip/rotation view of each row (moma.data.views), when the transform drew one
    # The frozen teacher's outputs for these rows and views, read from a teacher cache: the task then
    # does not run the teacher (logits in the teacher's class order, as the teacher gives them).
    teacher_outputs: TapOutputs | None = None

    @property
    def weak_input(self) -> torch.Tensor:
        """The weak view the teacher sees (the student's own view when there is only one)."""
        return self.input if self.teacher_input is None else self.teacher_input

    @property
    def labelled(self) -> slice:
        return slice(None, self.num_labelled)

    @property
    def has_unlabelled(self) -> bool:
        return self.num_labelled is not None and self.num_labelled < len(self.target)


@dataclass
class MethodContext:
    """What a method may look at when it is built."""

    student: FeatureTap
    teacher: FeatureTap | None
    student_probe: TapOutputs  # outputs of a dummy batch with every stage tapped
    teacher_probe: TapOutputs | None
    num_classes: int
    teacher_num_classes: int | None
    num_train_samples: int  # rows the batch index can take: labelled training tiles + unlabelled pool
    same_label_space: bool
    kl_weight: float = 0.0  # weight of the task's shared KL term, decided once by the builder (engine.builder)
    batch_size: int | None = None  # samples per step in one process, pool tiles included (SemCKD embeds batch similarities)
    train_targets: torch.Tensor | None = None  # class of each row, UNLABELLED for pool rows (CRD draws negatives of other classes)
    num_unlabelled: int = 0  # tiles in the unlabelled pool (rows num_train_samples - num_unlabelled ..)
    teacher_class_order: list[int] | None = None  # teacher class index of each student class, when they differ
    total_steps: int | None = None  # optimiser steps of the whole run (schedules tied to the run's length)
    student_from_teacher: bool = False  # the student starts from the teacher's weights


class DistillMethod(nn.Module):
    """Base class. Subclasses set the class attributes, define ``Params`` and ``forward``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    requires_teacher: ClassVar[bool] = True
    # Uses the teacher's class outputs (logits or classifier): needs a teacher trained on the data's classes.
    needs_teacher_classes: ClassVar[bool] = False
    # Some student parameters get no gradient (SimKD's own classifier): DDP must look for unused ones.
    student_has_unused_parameters: ClassVar[bool] = False
    # Its terms can use tiles without labels (the unlabelled pool): False for a method that needs
    # every tile's class; asked to use a pool, such a method is refused with a one-line reason.
    uses_unlabelled: ClassVar[bool] = True
    # Compares a weak and a strong view of each tile (FixMatch): needs data.strong_augment.
    needs_strong_view: ClassVar[bool] = False
    # Reads the teacher's final feature map (TapOutputs.feature_map, SimKD), which no teacher cache holds.
    needs_teacher_feature_map: ClassVar[bool] = False
    default_ce_weight: ClassVar[float] = 1.0
    default_kl_weight: ClassVar[float] = 0.0

    def __init__(self, params: MethodParams, ctx: MethodContext):
        super().__init__()
        self.params = params
        self.loss_weights: dict[str, float] = {}
        self.student_stages: tuple[int, ...] = ()
        self.teacher_stages: tuple[int, ...] = ()
        self.updates_teacher = False  # True: the method changes the teacher's weights (MoMA's momentum teacher)

    @classmethod
    def requires_same_architecture(cls, params: MethodParams) -> bool:
        """Whether, with these parameters, the teacher must have the student's layers (MoMA with a
        momentum teacher: it becomes an average of the student's weights)."""
        return False

    @classmethod
    def parse_params(cls, raw: dict | None) -> MethodParams:
        try:
            return cls.Params.model_validate(raw or {})
        except ValidationError as exc:
            known = ", ".join(cls.Params.model_fields) or "none"
            hint = f"method '{cls.name}' takes: {known}"
            raise ConfigError(validation_message(exc, hint, key_prefix="distill.params.")) from None

    def forward(self, student: TapOutputs, teacher: TapOutputs | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Named, unweighted loss terms of this step."""
        raise NotImplementedError

    def teacher_forward(self, teacher: FeatureTap, images: torch.Tensor) -> TapOutputs:
        """The teacher's outputs for this batch; frozen teachers run without gradients.

        The only place a method may change the teacher's weights (``updates_teacher``): MoMA's
        momentum teacher is updated here, in view, because the published code updates it between
        two teacher passes of the same step (KL logits before, keys after), which no hook before or
        after the teacher pass can reproduce. Nothing else in a step touches the teacher."""
        with torch.no_grad():
            return self.from_teacher_outputs(teacher(images))

    def from_teacher_outputs(self, outputs: TapOutputs) -> TapOutputs:
        """What the method takes from the frozen teacher's plain outputs (logits, embedding) for this
        step: the outputs themselves here; MoMA with keys from the frozen teacher adds its keys. The
        task calls it with outputs read from a teacher cache instead of :meth:`teacher_forward`."""
        return outputs

    def teacher_pass_is_plain(self) -> bool:
        """Whether :meth:`teacher_forward` is the frozen teacher's plain forward pass followed by
        :meth:`from_teacher_outputs`: the base class's, or an override that delegates to it."""
        return type(self).teacher_forward is DistillMethod.teacher_forward

    @property
    def uses_cached_teacher_outputs(self) -> bool:
        """Whether a teacher cache (``moma embed``, ``distill.teacher_cache``) can stand in for the
        teacher: the one place that decides it. It holds the frozen teacher's logits and pooled
        embedding per tile and view, so the method must need a teacher, read no intermediate maps
        (``teacher_stages``) and no final feature map, leave the teacher's weights alone (not
        ``updates_teacher``) and run the plain teacher pass (:meth:`teacher_pass_is_plain`)."""
        return (self.requires_teacher and not self.teacher_stages and not self.needs_teacher_feature_map
                and not self.updates_teacher and self.teacher_pass_is_plain())

    def student_logits(self, student: TapOutputs) -> torch.Tensor:
        """Logits used for the loss and the metrics (SimKD replaces them)."""
        return student.logits

    def deploy_head(self) -> nn.Module | None:
        """A module that replaces the student's classifier at inference, if the method has one.
        It is fed the student's ``forward_features`` output and returns logits."""
        return None

    def deploy_head_spec(self) -> dict | None:
        """JSON-able description from which :meth:`build_deploy_head` rebuilds the head (before its
        weights are loaded from the checkpoint)."""
        return None

    @classmethod
    def build_deploy_head(cls, spec: dict) -> nn.Module:
        raise NotImplementedError(f"method '{cls.name}' has no deploy head")

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (0-based; also after a resume), for schedules that
        depend on the epoch (DKD's warm-up)."""

    def after_step(self) -> None:
        """Called after each optimiser step (momentum updates, bookkeeping)."""

    def on_epoch_end(self, epoch: int, train_means: dict[str, float]) -> None:
        """Called after each training epoch with the epoch's mean of every term the method returned
        (losses and diagnostics), e.g. to warn about a term that stopped carrying information."""

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Trainable parameters of the method to leave out of weight decay."""
        return []

    def extra_parameters(self) -> int:
        """Trainable parameters the method adds beyond the student (connectors, heads)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

"""One training step of any method: student forward, teacher forward, loss terms, weighted sum.

Shaped like timm's ``TrainingTask``: ``forward(batch)`` returns a dict with ``loss`` (to back-
propagate), ``output`` (the logits the metrics use) and every named term for logging. The
method-specific part is entirely in ``self.method``.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from moma.distill.base import Batch, DistillMethod
from moma.distill.kd import kd_loss
from moma.models.deployed import DeployedClassifier
from moma.models.taps import FeatureTap, TapOutputs
from moma.utils.collectives import unwrap_parallel

log = logging.getLogger(__name__)


class InputAdapter(nn.Module):
    """Re-normalises images prepared for the student into the teacher's normalisation
    (as timm's ``DistillationTeacher.normalize_input``): x_t = (x * std_s + mean_s - mean_t) / std_t."""

    def __init__(self, student_mean, student_std, teacher_mean, teacher_std):
        super().__init__()
        self.identity = tuple(student_mean) == tuple(teacher_mean) and tuple(student_std) == tuple(teacher_std)
        for name, values in (("mean_s", student_mean), ("std_s", student_std), ("mean_t", teacher_mean), ("std_t", teacher_std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return images
        return (images * self.std_s + self.mean_s - self.mean_t) / self.std_t


class DistillationTask(nn.Module):
    """Student + (optional) teacher + method. Only the student and the method's own modules train."""

    def __init__(
        self,
        student: FeatureTap,
        teacher: FeatureTap | None,
        method: DistillMethod,
        ce_weight: float,
        kl_weight: float,
        kl_temperature: float = 4.0,
        label_smoothing: float = 0.0,
        teacher_input: InputAdapter | None = None,
        teacher_class_order: list[int] | None = None,
    ):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.method = method
        self.ce_weight = ce_weight
        self.kl_weight = kl_weight
        self.kl_temperature = kl_temperature
        self.label_smoothing = label_smoothing
        self.teacher_input = teacher_input or nn.Identity()
        # Teacher logit columns reordered to the student's class order (same classes, other order).
        order = torch.as_tensor(teacher_class_order if teacher_class_order is not None else [], dtype=torch.long)
        self.register_buffer("teacher_class_order", order, persistent=False)
        if teacher is not None:
            teacher.requires_grad_(False)
        self.extras_seconds = 0.0  # time spent in teacher + method per step (for reports)

    def train(self, mode: bool = True) -> "DistillationTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a method that wants another teacher mode sets it itself
        return self

    def loss_weights(self) -> dict[str, float]:
        return {"ce": self.ce_weight, "kl": self.kl_weight, **self.method.loss_weights}

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.method.parameters() if p.requires_grad]
        return params

    def parameter_groups(self) -> list[dict]:
        """The trainable parameters as optimiser groups: the parameters the method keeps out of weight
        decay (a gain that must be free to stay at zero) get weight_decay 0."""
        exempt = {id(p) for p in self.method.no_weight_decay()}
        params = self.trainable_parameters()
        groups = [{"params": [p for p in params if id(p) not in exempt]}]
        if exempt:
            groups.append({"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0})
        return groups

    def _teacher_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.teacher_class_order] if self.teacher_class_order.numel() else logits

    def _teacher_outputs(self, batch: Batch) -> TapOutputs | None:
        """The teacher side of the step: the outputs a teacher cache holds for the batch's tiles and
        views when the batch carries them (the teacher does not run), else the method's teacher pass.
        Either way the logits come in the student's class order."""
        if self.teacher is None:
            return None
        if batch.teacher_outputs is not None:
            cached = batch.teacher_outputs
            out = self.method.from_teacher_outputs(TapOutputs(logits=cached.logits, embedding=cached.embedding))
        else:
            out = self.method.teacher_forward(self.teacher, self.teacher_input(batch.weak_input))
        out.logits = self._teacher_logits(out.logits)  # methods see the student's class order
        return out

    def forward(self, batch: Batch) -> dict:
        student_out = self.student(batch.input)
        start = time.perf_counter()
        teacher_out = self._teacher_outputs(batch)
        terms = dict(self.method(student_out, teacher_out, batch))  # on every row, pool tiles included
        self.extras_seconds = time.perf_counter() - start
        logits = self.method.student_logits(student_out)
        if self.ce_weight:
            labelled = batch.labelled  # cross-entropy never sees a pool tile
            terms["ce"] = F.cross_entropy(logits[labelled].float(), batch.target[labelled],
                                          label_smoothing=self.label_smoothing)
        if self.kl_weight and teacher_out is not None:
            terms["kl"] = kd_loss(student_out.logits, teacher_out.logits, self.kl_temperature)
        weights = self.loss_weights()
        loss = sum(weights[name] * value for name, value in terms.items() if weights.get(name, 0.0))
        if not isinstance(loss, torch.Tensor):  # every weight is zero: still a graph to back-propagate
            loss = logits.sum() * 0.0
        return {"loss": loss, "output": logits, "terms": {k: v.detach() for k, v in terms.items()}}

    @property
    def student_tap(self) -> FeatureTap:
        """The student tap, unwrapped from DistributedDataParallel if it is wrapped."""
        return unwrap_parallel(self.student)

    def inference_model(self) -> nn.Module:
        """The deliverable: the student network, with the method's replacement head if it has one."""
        return DeployedClassifier(self.student_tap.model, self.method.deploy_head())

"""Every registered distillation method, built through the real builder, trains for a few steps.

resnet18 teacher -> efficientnet_b0 student at 32 px (different channel counts at every stage),
so connectors and stage pairing are exercised across architectures. Methods that compare logits
get a teacher on the student's classes; all others get a teacher trained on *another* label set,
as in cross-dataset distillation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moma.config import IMAGENET_MEAN, IMAGENET_STD, build_config
from moma.distill import Batch, get_method, method_names
from moma.engine.builder import build_task
from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
from moma.models.backbone import create_backbone

CLASSES = ["tumour", "stroma", "immune"]
OTHER_CLASSES = ["benign", "malignant"]
TEACHER, STUDENT = "resnet18", "efficientnet_b0"
IMAGE, BATCH, STEPS, NUM_TRAIN = 32, 8, 3, 64
METHODS = [name for name in method_names() if name != "none"]
# Untrained teachers (and students) are never 95 % confident: the confidence-masked terms would be
# zero, so the zoo runs them with every row above the threshold.
ZOO_PARAMS = {"pseudo": {"threshold": 0.0}, "fixmatch": {"threshold": 0.0}}


@pytest.fixture(scope="module")
def teacher_checkpoints(tmp_path_factory):
    """Fresh (untrained) teachers written as real checkpoints, keyed by (arch, class list)."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    torch.manual_seed(0)
    for arch in (TEACHER, STUDENT):
        for classes in (CLASSES, OTHER_CLASSES):
            model = create_backbone(arch, len(classes))
            meta = ModelMetadata(arch=arch, class_names=list(classes), image_size=IMAGE,
                                 mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
            path = folder / f"{arch}_{len(classes)}.safetensors"
            save_model_checkpoint(path, model.state_dict(), meta)
            paths[arch, tuple(classes)] = path
    return paths


def build(method: str, teacher_checkpoints, params: dict | None = None):
    cls = get_method(method)
    student_arch = TEACHER if cls.requires_same_architecture(cls.Params()) else STUDENT
    teacher_classes = CLASSES if cls.needs_teacher_classes else OTHER_CLASSES
    cfg = build_config({
        "data": {"image_size": IMAGE, "strong_augment": cls.needs_strong_view},
        "model": {"arch": student_arch},
        "optim": {"batch_size": BATCH},
        "distill": {"method": method, "teacher": str(teacher_checkpoints[TEACHER, tuple(teacher_classes)]),
                    "params": params if params is not None else ZOO_PARAMS.get(method, {})},
    })
    targets = torch.arange(NUM_TRAIN) % len(CLASSES)
    return build_task(cfg, CLASSES, NUM_TRAIN, torch.device("cpu"), train_targets=targets)


def random_batch(step: int) -> Batch:
    generator = torch.Generator().manual_seed(step)
    index = torch.arange(BATCH) + step * BATCH
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
    # the teacher's weak view of the same tiles (a flip stands in for the student's stronger view)
    return Batch(input=images, target=index % len(CLASSES), index=index, teacher_input=images.flip(-1))


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_through_the_builder(method, teacher_checkpoints):
    torch.manual_seed(0)
    task, info = build(method, teacher_checkpoints)
    cls = type(task.method)
    teacher = task.teacher if task.teacher is not None else nn.Identity()  # fixmatch: no teacher
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.01, momentum=0.9)
    task.train()
    if hasattr(task.method, "on_epoch_start"):  # DKD's warm-up schedule
        task.method.on_epoch_start(0)

    for step in range(STEPS):
        out = task(random_batch(step))
        assert torch.isfinite(out["loss"]), f"step {step}: loss {out['loss']}"
        assert out["output"].shape == (BATCH, len(CLASSES))
        assert all(torch.isfinite(v).all() for v in out["terms"].values()), out["terms"]
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        task.method.after_step()

    # The distillation terms alone (CE switched off) reach the student's first layer and every
    # trainable parameter the method adds.
    task.ce_weight = 0.0
    optimizer.zero_grad(set_to_none=True)
    task(random_batch(STEPS))["loss"].backward()
    grad = first_conv(task.student_tap.model).weight.grad
    assert grad is not None and grad.abs().sum() > 0
    for name, param in task.method.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{method}: no gradient for {name}"

    if not task.method.updates_teacher:
        teacher_after = teacher.state_dict()
        assert teacher_after.keys() == teacher_before.keys()
        assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)

    trainable = sum(p.numel() for p in task.method.parameters() if p.requires_grad)
    assert task.method.extra_parameters() == trainable == info["extra_parameters"]


def stage_pair(channels_s, channels_t, vid=False):
    if vid:  # three bias-free 1x1 convs s->t->t->t and t variances
        return channels_s * channels_t + 2 * channels_t**2 + channels_t
    return channels_s * channels_t + channels_t + 2 * channels_t  # 1x1 conv with bias, BatchNorm


# Channels per timm stage: resnet18 (64, 64, 128, 256, 512), efficientnet_b0 (16, 24, 40, 112, 320);
# pooled embeddings 512 and 1280.
EXPECTED = {
    "fitnet": dict(stages=(2,), params=stage_pair(40, 128)),
    "at": dict(stages=(1, 2, 3, 4), params=0),
    "sp": dict(stages=(4,), params=0),
    "cc": dict(stages=(), params=(1280 + 1) * 128 + (512 + 1) * 128),
    "rkd": dict(stages=(), params=0),
    "pkt": dict(stages=(), params=0),
    "vid": dict(stages=(1, 2, 3, 4), params=sum(stage_pair(s, t, vid=True) for s, t in
                                                 [(24, 64), (40, 128), (112, 256), (320, 512)])),
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_stages_connectors_and_weights_follow_repdistiller(method, teacher_checkpoints):
    task, info = build(method, teacher_checkpoints)
    expected = EXPECTED[method]
    assert task.method.student_stages == expected["stages"] == task.method.teacher_stages
    assert task.student_tap.stages == expected["stages"]
    assert task.method.extra_parameters() == expected["params"]
    betas = {"fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "pkt": 30000, "vid": 1}
    weights = {"rkd_distance": 25, "rkd_angle": 50} if method == "rkd" else {method: betas[method]}
    assert task.method.loss_weights == weights
    assert info["loss_weights"] == {"ce": 1.0, "kl": 0.0, **weights}
    assert not type(task.method).needs_teacher_classes


def test_fitnet_stage_parameter_and_regressed_shape(teacher_checkpoints):
    task, _ = build("fitnet", teacher_checkpoints, {"stage": -2, "beta": 10})
    assert task.method.student_stages == (3,) and task.method.loss_weights == {"fitnet": 10}
    student_out = task.student(random_batch(0).input)
    teacher_map = task.teacher(random_batch(0).input).features[3]
    assert task.method.regressor(student_out.features[3]).shape == teacher_map.shape == (BATCH, 256, 2, 2)


def test_at_and_vid_accept_explicit_stages(teacher_checkpoints):
    at_task, _ = build("at", teacher_checkpoints, {"stages": [-1, 2]})
    assert at_task.method.student_stages == (4, 2)
    vid_task, _ = build("vid", teacher_checkpoints, {"stages": [3]})
    assert len(vid_task.method.regressors) == 1
    assert vid_task.method.extra_parameters() == stage_pair(112, 256, vid=True)


def test_cc_gaussian_kernel_and_rkd_weights_are_configurable(teacher_checkpoints):
    task, _ = build("cc", teacher_checkpoints, {"kernel": "gaussian", "embed_dim": 16})
    out = task(random_batch(0))
    assert torch.isfinite(out["terms"]["cc"]) and out["terms"]["cc"] >= 0
    assert task.method.extra_parameters() == (1280 + 1) * 16 + (512 + 1) * 16
    rkd, _ = build("rkd", teacher_checkpoints, {"beta": 2, "angle_weight": 0})
    assert rkd.method.loss_weights == {"rkd_distance": 50, "rkd_angle": 0}

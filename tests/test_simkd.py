from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moma.distill.base import Batch
from moma.distill.simkd import simkd_loss
from moma.engine.builder import build_task
from moma.engine.checkpoint import read_metadata
from moma.engine.inference import load_classifier
from moma.engine.trainer import Trainer
from moma.errors import ConfigError
from conftest import write_teacher

CLASSES = ["immune", "stroma", "tumour"]  # the tile folder's classes, sorted



def simkd_config(make_config, tile_folder, teacher: Path, distill: dict | None = None, **sections):
    distill = {"method": "simkd", "teacher": str(teacher), **(distill or {})}
    return make_config(tile_folder, model={"arch": "test_efficientnet"}, distill=distill, **sections)


def test_loss_is_the_mean_squared_error_of_the_maps():
    projected = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # 1 x 2 x 1 x 2
    teacher = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
    assert float(simkd_loss(projected, teacher)) == pytest.approx((1 + 0 + 1 + 4) / 4)


def test_logits_come_from_the_teachers_classifier_in_the_students_class_order(tile_folder, make_config, tmp_path):
    teacher_classes = ["tumour", "immune", "stroma"]
    teacher = write_teacher(tmp_path / "teacher.safetensors", teacher_classes)
    task, info = build_task(simkd_config(make_config, tile_folder, teacher), CLASSES, 36, torch.device("cpu"))
    assert info["loss_weights"] == {"ce": 0.0, "kl": 0.0, "simkd": 1.0}
    method = task.method
    assert method.student_has_unused_parameters
    fc = task.teacher.model.get_classifier()
    order = [teacher_classes.index(c) for c in CLASSES]
    task.eval()
    with torch.no_grad():
        student_out = task.student(torch.randn(3, 3, 32, 32))
        projected = method.head.projector(student_out.feature_map)
        expected = F.linear(projected.mean(dim=(2, 3)), fc.weight[order], fc.bias[order])
        torch.testing.assert_close(method.student_logits(student_out), expected)
    assert not any(p.requires_grad for p in method.head.classifier.parameters())
    assert method.extra_parameters() == sum(p.numel() for p in method.head.projector.parameters())


def test_training_moves_the_projector_but_neither_classifier(tile_folder, make_config, tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", CLASSES)
    task, _ = build_task(simkd_config(make_config, tile_folder, teacher, distill={"ce_weight": 1.0}), CLASSES, 36,
                         torch.device("cpu"))
    method = task.method
    copied = {k: v.clone() for k, v in method.head.classifier.state_dict().items()}
    teacher_fc = {k: v.clone() for k, v in task.teacher.model.get_classifier().state_dict().items()}
    projector = method.head.projector[0].weight.clone()
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.1)
    task.train()
    for _ in range(2):
        out = task(Batch(torch.randn(8, 3, 32, 32), torch.arange(8) % 3, torch.arange(8)))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert set(out["terms"]) == {"simkd", "ce"}
    assert not torch.equal(method.head.projector[0].weight, projector)
    for name, value in method.head.classifier.state_dict().items():
        assert torch.equal(value, copied[name])
    for name, value in task.teacher.model.get_classifier().state_dict().items():
        assert torch.equal(value, teacher_fc[name])
    assert task.student.model.get_classifier().weight.grad is None  # the student's own classifier is unused


def test_a_teacher_with_other_classes_is_refused_with_the_usable_methods(tile_folder, make_config, tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", ["benign", "malignant"])
    with pytest.raises(ConfigError) as error:
        build_task(simkd_config(make_config, tile_folder, teacher), CLASSES, 36, torch.device("cpu"))
    message = str(error.value)
    assert "'simkd'" in message and "same classes" in message
    usable = message.split("Methods that work across label sets:")[1]
    assert "crd" in usable and "semckd" in usable and "simkd" not in usable and "dkd" not in usable


def test_saved_student_reloads_with_the_same_logits(tile_folder, make_config, tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", CLASSES)
    cfg = simkd_config(make_config, tile_folder, teacher, optim={"epochs": 1, "batch_size": 8},
                       train={"max_steps_per_epoch": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    assert trainer.state.times.steps == 2
    meta = read_metadata(run_dir / "last.safetensors")
    assert meta.head["method"] == "simkd" and meta.head["spec"]["teacher_channels"] == 96
    reloaded, _ = load_classifier(run_dir / "last.safetensors", torch.device("cpu"))
    deployed = trainer.task.inference_model().eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = deployed(images)
        torch.testing.assert_close(reloaded(images), expected)
        # and the deploy model is what the method uses for its logits during training
        torch.testing.assert_close(trainer.task.method.student_logits(trainer.task.student(images)), expected)

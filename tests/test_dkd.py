import json
import math
from pathlib import Path

import pytest
import torch

from moma.distill.base import Batch
from moma.distill.dkd import DKD, dkd_loss, warmup_factor
from moma.distill.kd import kd_loss
from moma.engine.builder import build_task
from moma.engine.trainer import Trainer
from conftest import write_teacher

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "dkd.json"
CLASSES = ["immune", "stroma", "tumour"]



@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text())["cases"], ids=lambda c: c["name"])
def test_dkd_matches_the_numpy_golden_values(case):
    loss = dkd_loss(torch.tensor(case["student"]), torch.tensor(case["teacher"]), torch.tensor(case["target"]),
                    case["alpha"], case["beta"], case["temperature"])
    assert float(loss) == pytest.approx(case["expected"], rel=1e-5)


def test_kd_is_tckd_plus_teacher_weighted_nckd():
    # Zhao et al.: KD = TCKD + (1 - p^T_target) NCKD, per sample; so DKD with alpha = 1 and
    # beta = 1 - p^T_target is exactly Hinton's KD.
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 6), torch.randn(5, 6) * 2
    target = torch.tensor([0, 3, 5, 2, 2])
    temperature = 3.0
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    for i in range(5):
        beta = float(1 - p_teacher[i, target[i]])
        dkd = dkd_loss(student[i:i + 1], teacher[i:i + 1], target[i:i + 1], 1.0, beta, temperature)
        kd = kd_loss(student[i:i + 1], teacher[i:i + 1], temperature)
        assert float(dkd) == pytest.approx(float(kd), rel=1e-5)


def test_two_classes_leave_no_non_target_part():
    student, teacher, target = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.2, 0.9]]), torch.tensor([1])
    assert float(dkd_loss(student, teacher, target, 0.0, 8.0, 4.0)) == pytest.approx(0.0, abs=1e-7)


def test_a_certain_network_gives_a_finite_loss_and_gradient():
    student = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-150.0, 150.0, 0.0]])
    loss = dkd_loss(student, teacher, torch.tensor([0]), 1.0, 8.0, 1.0)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(student.grad).all()


def test_warmup_follows_mdistiller_from_one_based_epochs():
    assert [warmup_factor(e, 20) for e in (0, 9, 19, 20, 49)] == [1 / 20, 10 / 20, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_method_term_is_warmed_up_by_the_epoch_hook(tile_folder, make_config, tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors", CLASSES)
    cfg = make_config(tile_folder, distill={"method": "dkd", "teacher": str(teacher)})
    task, info = build_task(cfg, CLASSES, 36, torch.device("cpu"))
    assert info["loss_weights"] == {"ce": 1.0, "kl": 0.0, "dkd": 1.0}
    method = task.method
    torch.manual_seed(0)
    with torch.no_grad():
        student_out = task.student(torch.randn(4, 3, 32, 32))
        teacher_out = task.teacher(torch.randn(4, 3, 32, 32))
    batch = Batch(torch.zeros(4, 3, 32, 32), torch.tensor([0, 1, 2, 1]), torch.arange(4))
    full = dkd_loss(student_out.logits, teacher_out.logits, batch.target, 1.0, 8.0, 4.0)
    with torch.no_grad():
        method.on_epoch_start(0)
        assert float(method(student_out, teacher_out, batch)["dkd"]) == pytest.approx(float(full) / 20, rel=1e-6)
        method.on_epoch_start(4)
        assert float(method(student_out, teacher_out, batch)["dkd"]) == pytest.approx(float(full) * 5 / 20, rel=1e-6)


def test_teacher_logits_reach_the_method_in_the_student_class_order(tile_folder, make_config, tmp_path):
    teacher_classes = ["tumour", "immune", "stroma"]  # same classes, another order
    teacher = write_teacher(tmp_path / "teacher.safetensors", teacher_classes)
    cfg = make_config(tile_folder, distill={"method": "dkd", "teacher": str(teacher)})
    task, _ = build_task(cfg, CLASSES, 36, torch.device("cpu"))
    seen = {}
    original = task.method.forward

    def spy(student, teacher_out, batch):
        seen["logits"] = teacher_out.logits
        return original(student, teacher_out, batch)

    task.method.forward = spy
    images = torch.randn(2, 3, 32, 32)
    task.eval()
    task(Batch(images, torch.tensor([0, 1]), torch.arange(2)))
    with torch.no_grad():
        raw = task.teacher.model(images)
    order = [teacher_classes.index(c) for c in CLASSES]
    torch.testing.assert_close(seen["logits"], raw[:, order])


def test_the_training_loop_announces_the_epoch_it_runs(tile_folder, make_config, tmp_path):
    # train_epoch(e) is what fit() runs for e = state.epoch .. epochs-1, also after a resume
    teacher = write_teacher(tmp_path / "teacher.safetensors", CLASSES)
    cfg = make_config(tile_folder, optim={"epochs": 5, "batch_size": 8}, train={"max_steps_per_epoch": 1},
                      distill={"method": "dkd", "teacher": str(teacher)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(cfg, run_dir)
    assert isinstance(trainer.task.method, DKD)
    epochs = []
    trainer.task.method.on_epoch_start = epochs.append
    trainer.train_epoch(0)
    trainer.train_epoch(3)
    assert epochs == [0, 3]

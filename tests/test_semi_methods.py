import json
import math
from pathlib import Path

import pytest
import torch

from moma.distill import get_method
from moma.distill.base import UNLABELLED, Batch, MethodContext
from moma.distill.fixmatch import FixMatch, fixmatch_loss
from moma.distill.pseudo import PseudoLabel, pseudo_label_loss
from moma.distill.task import DistillationTask
from moma.errors import ConfigError
from moma.models.backbone import create_backbone
from moma.models.taps import FeatureTap, TapOutputs

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "semi.json"
LOSSES = {"pseudo": pseudo_label_loss, "fixmatch": fixmatch_loss}


def context(student: FeatureTap | None = None, probe: TapOutputs | None = None) -> MethodContext:
    return MethodContext(student=student, teacher=None, student_probe=probe, teacher_probe=probe, num_classes=3,
                         teacher_num_classes=3, num_train_samples=10, same_label_space=True)


def pseudo(**params) -> PseudoLabel:
    return PseudoLabel(PseudoLabel.parse_params(params), context())


def batch_of(rows: int, num_labelled: int, **views) -> Batch:
    target = torch.tensor([i % 3 if i < num_labelled else UNLABELLED for i in range(rows)])
    return Batch(views.pop("input", torch.zeros(rows, 3, 32, 32)), target, torch.arange(rows),
                 num_labelled=num_labelled, **views)


@pytest.fixture
def student_tap() -> FeatureTap:
    torch.manual_seed(0)
    return FeatureTap(create_backbone("resnet10t", 3)).eval()


def fixmatch_for(tap: FeatureTap, **params) -> FixMatch:
    with torch.no_grad():
        probe = tap(torch.zeros(2, 3, 32, 32))
    return FixMatch(FixMatch.parse_params(params), context(tap, probe))


@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text())["cases"], ids=lambda c: c["name"])
def test_losses_match_the_numpy_golden_values(case):
    student = torch.tensor(case["student"], dtype=torch.float64)
    guide = torch.tensor(case["guide"], dtype=torch.float64)
    loss, mask_rate = LOSSES[case["kind"]](student, guide, case["threshold"])
    assert float(loss) == pytest.approx(case["expected_loss"], abs=1e-6)
    assert float(mask_rate) == pytest.approx(case["expected_mask_rate"], abs=1e-6)


def test_float32_logits_give_the_golden_values_too():
    case = json.loads(GOLDEN.read_text())["cases"][0]
    loss, _ = pseudo_label_loss(torch.tensor(case["student"]), torch.tensor(case["guide"]), case["threshold"])
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(case["expected_loss"], abs=1e-6)


def test_pseudo_mask_rate_is_the_share_of_confident_teacher_rows():
    teacher = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 10.0, 0.0], [0.2, 0.0, 0.1], [0.0, 0.0, 10.0]])
    student = TapOutputs(logits=torch.randn(5, 3), embedding=torch.zeros(5, 1))
    terms = pseudo()(student, TapOutputs(logits=teacher, embedding=torch.zeros(5, 1)), batch_of(5, 2))
    assert float(terms["pseudo_mask"]) == pytest.approx(3 / 5)
    assert float(terms["pseudo"]) > 0


def test_pseudo_ignores_the_true_labels_of_labelled_rows():
    torch.manual_seed(3)
    student = TapOutputs(logits=torch.randn(4, 3), embedding=torch.zeros(4, 1))
    teacher = TapOutputs(logits=torch.randn(4, 3) * 8, embedding=torch.zeros(4, 1))
    method = pseudo(threshold=0.5)
    all_labelled = method(student, teacher, Batch(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.arange(4)))
    relabelled = method(student, teacher, Batch(torch.zeros(4, 3, 8, 8), torch.tensor([2, 2, 1, 1]), torch.arange(4)))
    pool = method(student, teacher, batch_of(4, 0))
    assert float(all_labelled["pseudo"]) > 0
    assert float(all_labelled["pseudo"]) == float(relabelled["pseudo"]) == float(pool["pseudo"])


def test_an_unreachable_threshold_gives_no_loss():
    teacher = torch.tensor([[10.0, 0.0, 0.0], [0.0, 9.0, -5.0], [1.0, 2.0, 3.0]])
    assert (torch.softmax(teacher, 1).max(1).values < 1.0).all()
    loss, mask_rate = pseudo_label_loss(torch.randn(3, 3), teacher, 1.0)
    assert float(loss) == 0.0 and float(mask_rate) == 0.0


@pytest.mark.parametrize("loss_fn", [pseudo_label_loss, fixmatch_loss])
def test_gradient_reaches_only_the_masked_rows_of_the_student(loss_fn):
    torch.manual_seed(1)
    student = torch.randn(6, 3, requires_grad=True)
    guide = torch.tensor([[9.0, 0.0, 0.0], [0.3, 0.0, 0.1], [0.0, 0.0, 7.0],
                          [0.0, 0.5, 0.4], [0.0, 8.0, 1.0], [1.0, 1.0, 1.0]], requires_grad=True)
    loss, _ = loss_fn(student, guide, 0.95)
    loss.backward()
    confident = torch.tensor([True, False, True, False, True, False])
    assert (student.grad[~confident] == 0).all()
    assert (student.grad[confident].abs().sum(1) > 0).all()
    assert guide.grad is None


@pytest.mark.parametrize("loss_fn", [pseudo_label_loss, fixmatch_loss])
def test_the_target_is_the_guide_argmax_and_the_mean_runs_over_every_row(loss_fn):
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    guide = torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 0.0]])
    loss, _ = loss_fn(student, guide, 0.95)
    wrong_class = -torch.log_softmax(student[0], 0)[1]
    assert float(loss) == pytest.approx(float(wrong_class) / 2, rel=1e-6)


def test_fixmatch_uses_the_students_weak_view_as_the_target(student_tap):
    method = fixmatch_for(student_tap, threshold=0.0, weight=2.0)
    torch.manual_seed(2)
    strong, weak = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 3
    batch = batch_of(4, 2, input=strong, teacher_input=weak)
    student_out = student_tap(strong)
    with torch.no_grad():
        weak_logits, strong_logits = student_tap(weak).logits, student_out.logits.detach()
    assert not torch.allclose(weak_logits, strong_logits)
    torch.testing.assert_close(method.weak_logits(batch), weak_logits)
    terms = method(student_out, None, batch)
    expected, _ = fixmatch_loss(strong_logits, weak_logits, 0.0)
    assert math.isfinite(float(terms["fixmatch"].detach()))
    assert float(terms["fixmatch"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["fixmatch_mask"]) == 1.0
    assert method.loss_weights == {"fixmatch": 2.0}
    terms["fixmatch"].backward()
    assert student_tap.model.get_classifier().weight.grad.abs().sum() > 0


def test_fixmatch_does_not_own_the_student(student_tap):
    method = fixmatch_for(student_tap)
    assert method.state_dict() == {}
    assert list(method.parameters()) == [] and list(method.modules()) == [method]
    assert method.extra_parameters() == 0
    assert method.student_tap is student_tap


def test_fixmatch_without_a_weak_view_asks_for_strong_augment(student_tap):
    method = fixmatch_for(student_tap)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="data.strong_augment=true") as info:
        method(student_tap(images), None, batch_of(2, 1, input=images))
    assert "\n" not in str(info.value)


def test_the_task_adds_the_weighted_term_and_only_logs_the_mask_rate(student_tap):
    method = fixmatch_for(student_tap, threshold=0.0, weight=2.0)
    task = DistillationTask(student_tap, None, method, ce_weight=1.0, kl_weight=0.0).eval()
    torch.manual_seed(4)
    out = task(batch_of(4, 2, input=torch.randn(4, 3, 32, 32), teacher_input=torch.randn(4, 3, 32, 32)))
    terms = out["terms"]
    assert set(terms) == {"ce", "fixmatch", "fixmatch_mask"}
    assert float(out["loss"].detach()) == pytest.approx(float(terms["ce"] + 2.0 * terms["fixmatch"]), rel=1e-6)


@pytest.mark.parametrize("name", ["pseudo", "fixmatch"])
def test_thresholds_outside_zero_one_are_refused(name):
    with pytest.raises(ConfigError, match="threshold"):
        get_method(name).parse_params({"threshold": 1.5})
    with pytest.raises(ConfigError, match="weight"):
        get_method(name).parse_params({"weight": -1.0})


def test_registry_flags():
    assert get_method("pseudo") is PseudoLabel and get_method("fixmatch") is FixMatch
    assert get_method("pseudo").needs_teacher_classes is True and get_method("pseudo").requires_teacher is True
    assert get_method("fixmatch").requires_teacher is False and get_method("fixmatch").needs_strong_view is True
    assert get_method("pseudo").Params().threshold == 0.95 and get_method("fixmatch").Params().threshold == 0.95
    assert pseudo(weight=0.5).loss_weights == {"pseudo": 0.5}

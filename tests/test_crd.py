import logging
import math

import pytest
import torch

from moma.distill.base import Batch, MethodContext
from moma.distill.crd import CRD, contrast_scores, draw_other_class_rows, draw_other_rows, momentum_update, nce_loss
from moma.engine.trainer import Trainer
from moma.models.taps import TapOutputs
from conftest import write_teacher

IMAGENET_TRAIN_IMAGES = 1_281_167  # what the official MoMA code sizes the bank to on every data set



def taps(batch: int, dim: int) -> TapOutputs:
    return TapOutputs(logits=torch.zeros(batch, 3), embedding=torch.randn(batch, dim))


def small_crd(num_train: int = 40, targets=None, **params) -> CRD:
    ctx = MethodContext(student=None, teacher=None, student_probe=taps(2, 6), teacher_probe=taps(2, 10),
                        num_classes=3, teacher_num_classes=3, num_train_samples=num_train, same_label_space=True,
                        batch_size=4, train_targets=targets)
    return CRD(CRD.parse_params({"nce_k": 8, "feat_dim": 5, **params}), ctx)


def test_nce_loss_matches_the_formula_by_hand():
    scores = torch.tensor([[2.0, 0.5, 0.1], [0.3, 1.0, 0.02]])
    n = 10
    noise = 2 / n  # K / N
    expected = 0.0
    for row in scores.tolist():
        expected -= math.log(row[0] / (row[0] + noise + 1e-7))
        expected -= sum(math.log(noise / (s + noise + 1e-7)) for s in row[1:])
    assert float(nce_loss(scores, n)) == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("k", [1, 5])  # (K+1)*D < N gathers rows; otherwise one matrix product
def test_contrast_scores_are_exp_of_dot_products_over_temperature(k):
    torch.manual_seed(0)
    memory, anchor = torch.randn(10, 2), torch.randn(3, 2)
    idx = torch.randint(0, 10, (3, k + 1))
    expected = torch.tensor([[math.exp(float(memory[j] @ anchor[i]) / 0.5) for j in idx[i]] for i in range(3)])
    torch.testing.assert_close(contrast_scores(anchor, memory, idx, 0.5), expected)


def test_memory_update_is_momentum_then_renormalisation():
    crd = small_crd()
    crd.train()
    before_s, before_t = crd.memory_s.clone(), crd.memory_t.clone()
    index = torch.tensor([3, 17, 0, 39])
    student, teacher = taps(4, 6), taps(4, 10)
    crd(student, teacher, Batch(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), index))
    torch.testing.assert_close(crd.memory_s, before_s)  # the forward pass leaves the banks alone
    crd.after_step()
    with torch.no_grad():
        v_s = crd.embed_s(student.embedding)
        v_t = crd.embed_t(teacher.embedding)
    for bank, before, v in ((crd.memory_s, before_s, v_s), (crd.memory_t, before_t, v_t)):
        mixed = 0.5 * before[index] + 0.5 * v
        torch.testing.assert_close(bank[index], mixed / mixed.norm(dim=1, keepdim=True))
        assert torch.allclose(bank[index].norm(dim=1), torch.ones(4))
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(bank[untouched], before[untouched])
    torch.testing.assert_close(momentum_update(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5),
                               torch.tensor([[0.9486833, 0.3162278]]))


def test_loss_trains_both_embeddings_and_z_is_estimated_once_and_kept():
    crd = small_crd()
    crd.train()
    batch = Batch(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 4]))
    loss = crd(taps(4, 6), taps(4, 10), batch)["crd"]
    loss.backward()
    assert crd.embed_s.linear.weight.grad.abs().sum() > 0 and crd.embed_t.linear.weight.grad.abs().sum() > 0
    z = crd.normaliser.clone()
    assert (z > 0).all()
    crd.after_step()
    crd(taps(4, 6), taps(4, 10), batch)
    assert torch.equal(crd.normaliser, z)
    # banks and Z are saved with the training state and restored on resume
    resumed = small_crd()
    resumed.load_state_dict(crd.state_dict())
    assert {"memory_s", "memory_t", "normaliser"} <= set(crd.state_dict())
    assert torch.equal(resumed.normaliser, z) and torch.equal(resumed.memory_t, crd.memory_t)


def test_z_is_mean_score_times_training_set_size():
    crd = small_crd()
    student, teacher = taps(4, 6), taps(4, 10)
    batch = Batch(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.tensor([5, 6, 7, 8]))
    torch.manual_seed(3)
    crd(student, teacher, batch)
    torch.manual_seed(3)  # the same negatives again
    idx = crd.contrast_indices(batch.index, batch.target)
    with torch.no_grad():
        scores_s = contrast_scores(crd.embed_s(student.embedding), crd.memory_t, idx, 0.07)
    assert float(crd.normaliser[0]) == pytest.approx(float(scores_s.mean()) * 40, rel=1e-5)


def test_negatives_of_other_classes_skip_the_whole_class_and_nothing_else():
    targets = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 1, 2])
    count = torch.bincount(targets)
    rows = draw_other_class_rows(torch.tensor([0, 2]), 4000, torch.argsort(targets, stable=True),
                                 torch.cumsum(count, 0) - count, count)
    for target, drawn in zip((0, 2), rows):
        assert set(drawn.tolist()) == {i for i, t in enumerate(targets.tolist()) if t != target}


def test_negatives_of_other_samples_skip_only_the_sample_itself():
    rows = draw_other_rows(torch.tensor([0, 4, 9]), 3000, 10)
    for index, drawn in zip((0, 4, 9), rows):
        assert set(drawn.tolist()) == set(range(10)) - {index}


def test_the_positive_comes_first_and_single_class_data_falls_back(caplog):
    crd = small_crd(num_train=6, targets=torch.tensor([0, 0, 1, 1, 2, 2]))
    idx = crd.contrast_indices(torch.tensor([2, 5]), torch.tensor([1, 2]))
    assert idx[:, 0].tolist() == [2, 5]
    assert set(idx[0, 1:].tolist()) <= {0, 1, 4, 5} and set(idx[1, 1:].tolist()) <= {0, 1, 2, 3}
    with caplog.at_level(logging.WARNING):
        single = small_crd(num_train=6, targets=torch.zeros(6, dtype=torch.long))
    assert not single.by_class and "single class" in caplog.text


def test_bank_has_one_row_per_training_image_and_nce_k_is_clamped(tile_folder, make_config, tmp_path, caplog):
    # Regression: the official MoMA code sizes the bank for ImageNet (1,281,167 rows) on every data set.
    teacher = write_teacher(tmp_path / "teacher.safetensors", ["immune", "stroma", "tumour"])
    cfg = make_config(tile_folder, distill={"method": "crd", "teacher": str(teacher)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, run_dir)
    crd = trainer.task.method
    n = len(trainer.data.train)
    assert crd.memory_s.shape == crd.memory_t.shape == (n, 128) and n != IMAGENET_TRAIN_IMAGES
    assert crd.nce_k == n - 1 and "nce_k=16384" in caplog.text
    assert crd.by_class  # the training labels reached the method
    targets = trainer.data.train.targets
    idx = crd.contrast_indices(torch.arange(4), targets[:4])
    assert all((targets[idx[i, 1:]] != targets[i]).all() for i in range(4))
    out = trainer.train_epoch(0)  # a full epoch through the real loop: finite loss, banks updated
    assert math.isfinite(out["crd"])
    assert torch.allclose(crd.memory_s.norm(dim=1), torch.ones(n))  # every row was updated (random rows are not unit)


def test_gather_hook_sees_the_step_before_the_bank_update():
    class Recording(CRD):
        seen = []

        def _gather(self, tensor):
            self.seen.append(tensor.shape[0])
            return torch.cat([tensor, tensor])  # as if a second process had the same rows

    crd = small_crd()
    recording = Recording(crd.params, MethodContext(
        student=None, teacher=None, student_probe=taps(2, 6), teacher_probe=taps(2, 10), num_classes=3,
        teacher_num_classes=3, num_train_samples=40, same_label_space=True))
    recording.train()
    recording(taps(4, 6), taps(4, 10), Batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4)))
    recording.after_step()
    assert Recording.seen == [1, 4, 4, 4]  # Z's two means once, then index, student and teacher embeddings
    assert torch.allclose(recording.memory_s[:4].norm(dim=1), torch.ones(4))

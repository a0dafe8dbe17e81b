
import numpy as np
import pytest
import torch

from moma.distill.base import Batch
from moma.distill.semckd import SemCKD, StageAttention, batch_similarity, semckd_loss
from moma.engine.builder import build_task
from moma.errors import ConfigError
from conftest import write_teacher

CLASSES = ["immune", "stroma", "tumour"]



@pytest.fixture
def task(tile_folder, make_config, tmp_path):
    # another teacher label set on purpose: SemCKD is a feature method
    teacher = write_teacher(tmp_path / "teacher.safetensors", ["a", "b"])
    cfg = make_config(tile_folder, model={"arch": "test_efficientnet"}, optim={"batch_size": 16},
                      distill={"method": "semckd", "teacher": str(teacher)})
    task, info = build_task(cfg, CLASSES, 36, torch.device("cpu"))
    assert info["loss_weights"] == {"ce": 1.0, "kl": 0.0, "semckd": 50.0}
    return task


def test_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    b, shapes = 2, [[(3, 2, 2), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)]]  # [student stage][teacher stage]
    projected = [[rng.normal(size=(b, *s)) for s in row] for row in shapes]
    targets = [[rng.normal(size=(b, *s)) for s in row] for row in shapes]
    attention = rng.dirichlet([1.0, 1.0], size=(b, 2))  # [B, S, T], rows sum to one
    expected = 0.0
    for n in range(b):
        for s in range(2):
            for t in range(2):
                expected += attention[n, s, t] * np.mean((projected[s][t][n] - targets[s][t][n]) ** 2)
    expected /= b * 2
    as_t = lambda rows: [[torch.tensor(x) for x in row] for row in rows]  # noqa: E731
    loss = semckd_loss(as_t(projected), as_t(targets), torch.tensor(attention))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_attention_is_a_distribution_over_teacher_stages_per_sample():
    torch.manual_seed(0)
    attention = StageAttention(batch_size=8, num_student=3, num_teacher=4)
    student = [torch.randn(8, c, h, h) for c, h in ((4, 8), (6, 4), (8, 2))]
    teacher = [torch.randn(8, c, h, h) for c, h in ((5, 8), (7, 4), (9, 2), (11, 1))]
    weights = attention(student, teacher)
    assert weights.shape == (8, 3, 4) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(8, 3))
    assert not torch.allclose(weights[0], weights[1])  # per sample, not shared across the batch


def test_batch_similarity_is_the_gram_matrix_of_flattened_maps():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # two samples, one channel, 1x2 map
    torch.testing.assert_close(batch_similarity(x), torch.tensor([[5.0, -2.0], [-2.0, 1.0]]))


def test_every_student_stage_is_connected_to_every_teacher_stage(task):
    method = task.method
    assert method.student_stages == (1, 2, 3, 4) and method.teacher_stages == (1, 2, 3, 4)  # feat[1:-1]
    assert len(method.connectors) == 4 and all(len(row) == 4 for row in method.connectors)
    # student stage 2 (32 channels, 4x4) -> teacher stage 3 (192 channels, 2x2): 2 x 192 inside
    first, last = method.connectors[1][2][0], method.connectors[1][2][-1]
    assert (first.in_channels, first.out_channels, last.out_channels) == (32, 384, 192)
    assert method.attention.queries[0].net[0].in_features == 16  # rows of the 16 x 16 batch similarity
    assert method.attention.queries[0].net[2].out_features == 4  # batch size // factor 4


def test_a_step_trains_connectors_and_attention_and_a_short_batch_is_skipped(task):
    torch.manual_seed(0)
    task.train()
    out = task(Batch(torch.randn(16, 3, 32, 32), torch.arange(16) % 3, torch.arange(16)))
    assert torch.isfinite(out["terms"]["semckd"]) and out["terms"]["semckd"] > 0
    out["loss"].backward()
    method = task.method
    grads = [method.connectors[0][3][0].weight.grad, method.attention.queries[2].net[0].weight.grad,
             method.attention.keys[1].net[0].weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in task.teacher.parameters())
    short = task(Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.arange(4)))
    assert float(short["terms"]["semckd"]) == 0.0 and torch.isfinite(short["loss"])


def test_an_unknown_batch_size_is_a_config_error(task):
    from dataclasses import replace

    from moma.distill.base import MethodContext

    ctx = MethodContext(student=task.student, teacher=task.teacher, student_probe=None, teacher_probe=None,
                        num_classes=3, teacher_num_classes=2, num_train_samples=36, same_label_space=False)
    with pytest.raises(ConfigError, match="batch size"):
        SemCKD(SemCKD.parse_params({}), replace(ctx, batch_size=None))

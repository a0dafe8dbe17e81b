"""The pure loss functions against values computed independently (numpy, from the papers' formulas)
by ``fixtures/golden/make_golden.py``, plus a few properties each loss must have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moma.distill.at import at_loss
from moma.distill.cc import cc_gaussian_loss, cc_loss
from moma.distill.fitnet import HintRegressor, hint_loss
from moma.distill.kd import kd_loss
from moma.distill.pkt import pkt_loss
from moma.distill.rkd import rkd_angle_loss, rkd_distance_loss
from moma.distill.sp import sp_loss
from moma.distill.vid import VariationalRegressor, vid_loss

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden" / "losses.json").read_text())
PARAMS = GOLDEN["params"]


def tensor(name: str) -> torch.Tensor:
    return torch.tensor(GOLDEN["inputs"][name], dtype=torch.float64)


COMPUTE = {
    "kd": lambda: kd_loss(tensor("student_logits"), tensor("teacher_logits"), PARAMS["temperature"]),
    "at": lambda: at_loss(tensor("student_map"), tensor("teacher_map"), PARAMS["at_p"]),
    "at_resized": lambda: at_loss(tensor("student_map_large"), tensor("teacher_map"), PARAMS["at_p"]),
    "sp": lambda: sp_loss(tensor("student_map"), tensor("teacher_map")),
    "cc": lambda: cc_loss(tensor("student_embedding"), tensor("teacher_embedding")),
    "cc_gaussian": lambda: cc_gaussian_loss(tensor("student_embedding"), tensor("teacher_embedding"),
                                            PARAMS["cc_gamma"], PARAMS["cc_order"]),
    "rkd_distance": lambda: rkd_distance_loss(tensor("student_embedding"), tensor("teacher_embedding")),
    "rkd_angle": lambda: rkd_angle_loss(tensor("student_embedding"), tensor("teacher_embedding")),
    "pkt": lambda: pkt_loss(tensor("student_embedding"), tensor("teacher_embedding")),
    "vid": lambda: vid_loss(tensor("student_map"), tensor("teacher_map"), tensor("vid_log_scale"), PARAMS["vid_eps"]),
}


def test_every_golden_value_is_checked():
    assert set(COMPUTE) == set(GOLDEN["expected"])


@pytest.mark.parametrize("name", sorted(COMPUTE))
def test_loss_matches_golden_value(name):
    value = COMPUTE[name]()
    assert value.shape == ()
    assert value.item() == pytest.approx(GOLDEN["expected"][name], rel=1e-5)


@pytest.mark.parametrize("name", ["at", "sp", "pkt", "rkd_distance"])
def test_float32_inputs_give_the_same_value(name):
    original = GOLDEN["inputs"]
    as_float32 = {k: torch.tensor(v, dtype=torch.float32) for k, v in original.items()}
    functions = {
        "at": lambda t: at_loss(t["student_map"], t["teacher_map"]),
        "sp": lambda t: sp_loss(t["student_map"], t["teacher_map"]),
        "pkt": lambda t: pkt_loss(t["student_embedding"], t["teacher_embedding"]),
        "rkd_distance": lambda t: rkd_distance_loss(t["student_embedding"], t["teacher_embedding"]),
    }
    value = functions[name](as_float32)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(GOLDEN["expected"][name], rel=1e-4)


# --- properties ---------------------------------------------------------------------------------


def test_at_is_zero_for_identical_maps_and_ignores_channel_count_and_scale():
    maps = tensor("student_map")
    assert at_loss(maps, maps).item() == 0.0
    # Attention = normalised channel mean of squares: repeating channels or scaling leaves it unchanged.
    assert at_loss(torch.cat([maps, maps], dim=1) * 3.0, maps).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss(maps, tensor("teacher_map")).item() > 0


def test_at_pools_the_larger_map_whichever_side_it_is_on():
    large, small = tensor("student_map_large"), tensor("teacher_map")
    assert at_loss(large, small).item() == pytest.approx(at_loss(small, large).item(), rel=1e-12)
    pooled = torch.nn.functional.avg_pool2d(large, 2)
    assert at_loss(large, small).item() == pytest.approx(at_loss(pooled, small).item(), rel=1e-12)


def test_sp_is_invariant_to_the_scale_of_each_network_and_to_feature_size():
    s, t = tensor("student_map"), tensor("teacher_map")
    assert sp_loss(s * 7.0, t * 0.1).item() == pytest.approx(sp_loss(s, t).item(), rel=1e-10)
    assert sp_loss(t, t).item() == 0.0
    # Only batch relations count: the student's map may have other channels and size.
    assert sp_loss(tensor("student_map_large"), t).item() > 0


def test_sp_value_for_a_hand_computed_case():
    # Two samples: orthonormal for the student (G = I), identical for the teacher (G = all 2s,
    # rows (1, 1)/sqrt2). ||G_T - G_S||_F^2 = 2 * ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2, over b^2 = 4.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    expected = (4 - 2 * 2**0.5) / 4
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_rkd_is_invariant_to_scale_and_translation_of_the_embeddings():
    s, t = tensor("student_embedding"), tensor("teacher_embedding")
    moved = 5.0 * s + torch.linspace(-1, 1, s.shape[1], dtype=s.dtype)
    assert rkd_distance_loss(moved, t).item() == pytest.approx(rkd_distance_loss(s, t).item(), rel=1e-9)
    assert rkd_angle_loss(moved, t).item() == pytest.approx(rkd_angle_loss(s, t).item(), rel=1e-9)
    assert rkd_distance_loss(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_gradient_is_finite_with_duplicate_samples():
    s = tensor("student_embedding").clone()
    s[1] = s[0]
    s.requires_grad_(True)
    (rkd_distance_loss(s, tensor("teacher_embedding")) + rkd_angle_loss(s, tensor("teacher_embedding"))).backward()
    assert torch.isfinite(s.grad).all()
    # The smallest batch the trainer produces (2): one pair, no proper triplet.
    pair_s, pair_t = tensor("student_embedding")[:2], tensor("teacher_embedding")[:2]
    assert rkd_distance_loss(pair_s, pair_t).item() == pytest.approx(0.0, abs=1e-12)  # both normalise to 1
    assert rkd_angle_loss(pair_s, pair_t).item() == pytest.approx(0.0, abs=1e-12)  # cos = 1 or 0 on both sides


def test_pkt_is_zero_for_the_same_embedding_and_positive_otherwise():
    s, t = tensor("student_embedding"), tensor("teacher_embedding")
    assert pkt_loss(s, 4.0 * s).item() == pytest.approx(0.0, abs=1e-9)
    assert pkt_loss(s, t).item() > 0


def test_cc_is_zero_when_embeddings_agree_and_hand_computed_otherwise():
    s = tensor("student_embedding")
    assert cc_loss(s, s).item() == 0.0
    assert cc_gaussian_loss(s, 2.0 * s).item() == pytest.approx(0.0, abs=1e-15)
    # Three samples, residuals |s - t| = (1, 2), (3, 0), (1, 1): mean(1*3 + 2*0, 3*1 + 0*1) = 3.
    student = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    assert cc_loss(student, torch.zeros_like(student)).item() == pytest.approx(3.0)


def test_vid_loss_at_its_minimum_is_half_log_variance():
    target = tensor("teacher_map")
    log_scale = torch.zeros(2, dtype=torch.float64)  # softplus(0) = log 2
    variance = torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1e-5
    assert vid_loss(target, target, log_scale).item() == pytest.approx(0.5 * torch.log(variance).item(), rel=1e-12)


def test_vid_regressor_starts_at_the_configured_variance_and_pools_maps():
    regressor = VariationalRegressor(student_channels=3, teacher_channels=4, init_variance=5.0, eps=1e-5)
    variance = torch.nn.functional.softplus(regressor.log_scale) + 1e-5
    assert torch.allclose(variance, torch.full((4,), 5.0))
    loss = regressor(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4))
    assert loss.shape == () and torch.isfinite(loss)
    # 3 bias-free 1x1 convs (3->4, 4->4, 4->4) and 4 variances.
    assert sum(p.numel() for p in regressor.parameters()) == 3 * 4 + 4 * 4 + 4 * 4 + 4


@pytest.mark.parametrize("student_size", [(8, 8), (4, 4), (2, 2), (3, 5)])
def test_fitnet_regressor_output_has_the_teacher_shape(student_size):
    regressor = HintRegressor(student_channels=5, teacher_channels=7, teacher_size=(4, 4))
    out = regressor(torch.randn(2, 5, *student_size))
    assert out.shape == (2, 7, 4, 4)
    assert (out >= 0).all()  # ReLU, as RepDistiller's ConvReg
    assert hint_loss(out, out).item() == 0.0
    assert hint_loss(torch.zeros(1, 2), torch.full((1, 2), 3.0)).item() == 9.0

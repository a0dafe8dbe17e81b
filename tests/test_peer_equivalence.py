"""Every baseline held against a trusted peer: torchdistill 1.1.5 (and timm's ``LogitDistillationTask``).

Both implementations get the same fixed float32 tensors; learned parts (VID's regressors, FitNet's
connector, CC's and CRD's embeddings, CRD's memory banks) get identical weights and state, copied
from our module into theirs. Values agree with ``rtol=1e-5`` and ``atol=1e-7`` (relative agreement
to 1e-5; the tiny absolute floor only covers values near zero). Where gradients are compared too,
they agree with ``rtol=1e-4``, ``atol=1e-6`` (each sums many more float32 products).

Methods with a torchdistill counterpart, and the class used (``torchdistill.losses.mid_level``
unless named otherwise):

- kd: ``KDLoss`` (alpha=0.1, beta=0.9, T=4); also timm's ``timm.task.LogitDistillationTask``
  against our ``DistillationTask`` with the KD method, on the same tiny networks
- at: ``ATLoss`` (``mode='code'`` equal; ``mode='paper'`` pinned: un-squared per-sample norms)
- sp: ``SPKDLoss`` (``reduction='batchmean'``); pinned: it L1-normalises the Gram rows
  (``normalize(G, 1)`` sets p=1), the paper and we use L2
- cc: ``CCKDLoss`` with the gaussian kernel (+ ``nn.Linear`` as ``Linear4CCKD``); pinned: ours
  squares the Frobenius norm and L2-normalises the embeddings, so ours = n^2 * theirs^2 on unit
  embeddings. Our default ``kernel='repdistiller'`` has no torchdistill counterpart.
- rkd: ``RKDLoss`` (dist_factor 25, angle_factor 50, ``reduction='mean'``)
- pkt: ``PKTLoss``
- vid: ``VIDLoss`` with ``torchdistill.models.wrapper.Regressor4VID``
- fitnet: ``torchdistill.models.adaptation.ConvReg`` + ``nn.MSELoss`` in ``SimpleLossWrapper``
- crd: ``CRDLoss`` (its banks, Z and momentum update) with ``Normalizer4CRD`` embeddings, given
  our negatives; the sampling itself differs on purpose (pinned against ``CRDDatasetWrapper``)

Every other registered method has no torchdistill counterpart; ``methods_without_counterpart``
lists them from the registry, so a new method needs no edit here until it gets a peer test.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import LogitDistillationTask
from torch import nn
from torchdistill.datasets.wrapper import CRDDatasetWrapper
from torchdistill.losses.mid_level import (
    ATLoss,
    CCKDLoss,
    CRDLoss,
    KDLoss,
    PKTLoss,
    RKDLoss,
    SimpleLossWrapper,
    SPKDLoss,
    VIDLoss,
)
from torchdistill.models.adaptation import ConvReg
from torchdistill.models.wrapper import Normalizer4CRD, Regressor4VID

from moma.distill import method_names
from moma.distill.at import at_loss
from moma.distill.base import Batch, MethodContext
from moma.distill.cc import CorrelationCongruence
from moma.distill.crd import CRD, draw_other_class_rows
from moma.distill.fitnet import HintRegressor, hint_loss
from moma.distill.kd import KD, kd_loss
from moma.distill.pkt import pkt_loss
from moma.distill.rkd import rkd_angle_loss, rkd_distance_loss
from moma.distill.sp import sp_loss
from moma.distill.task import DistillationTask
from moma.distill.vid import VariationalRegressor
from moma.models.taps import FeatureTap, TapOutputs

RTOL, ATOL = 1e-5, 1e-7
close = partial(torch.testing.assert_close, rtol=RTOL, atol=ATOL)
close_grad = partial(torch.testing.assert_close, rtol=1e-4, atol=1e-6)  # gradients sum many more float32 terms

TORCHDISTILL_COUNTERPART = {
    "kd": "KDLoss", "at": "ATLoss", "sp": "SPKDLoss", "cc": "CCKDLoss", "rkd": "RKDLoss", "pkt": "PKTLoss",
    "vid": "VIDLoss", "fitnet": "ConvReg + MSELoss", "crd": "CRDLoss",
}


def methods_without_counterpart() -> list[str]:
    """The registered methods that no test below holds against a peer (the only such list)."""
    return sorted(set(method_names()) - set(TORCHDISTILL_COUNTERPART))


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def io(**paths) -> dict:
    """torchdistill's I/O dict: module path -> {'output': value} (or {'input': ...} for 'key__input')."""
    out = {}
    for name, value in paths.items():
        path, _, kind = name.partition("__")
        out.setdefault(path, {})[kind or "output"] = value
    return out


def embedding_context(student_dim: int, teacher_dim: int, num_train: int = 64, targets=None) -> MethodContext:
    """A context for methods that only look at the pooled embeddings' widths."""
    def probe(dim):
        return TapOutputs(logits=torch.zeros(2, 3), embedding=torch.zeros(2, dim))

    return MethodContext(student=None, teacher=None, student_probe=probe(student_dim), teacher_probe=probe(teacher_dim),
                         num_classes=3, teacher_num_classes=3, num_train_samples=num_train, same_label_space=True,
                         train_targets=targets)


def test_every_counterpart_is_a_registered_method():
    assert set(TORCHDISTILL_COUNTERPART) <= set(method_names())


# ----------------------------------------------------------------------------------------- kd
def test_kd_matches_torchdistill_kdloss():
    student, teacher, target = randn(16, 7, seed=1) * 3, randn(16, 7, seed=2) * 3, torch.arange(16) % 7
    theirs = KDLoss(".", "output", ".", "output", temperature=4.0, alpha=0.1, beta=0.9)
    ours = 0.1 * F.cross_entropy(student, target) + 0.9 * kd_loss(student, teacher, 4.0)
    close(ours, theirs(io(**{".": student}), io(**{".": teacher}), target))
    # Without a CE term KDLoss returns the bare KL; our term carries the T^2 gradient scale (Hinton et al.)
    soft_only = KDLoss(".", "output", ".", "output", temperature=4.0, alpha=0.0)
    close(kd_loss(student, teacher, 4.0), 4.0**2 * soft_only(io(**{".": student}), io(**{".": teacher}), target))


def test_kd_task_matches_timm_logit_distillation_task():
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=5)
    teacher = timm.create_model("test_resnet", num_classes=5)
    images, target = randn(6, 3, 32, 32, seed=3), torch.tensor([0, 1, 2, 3, 4, 0])

    theirs = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), task_loss_weight=0.1,
                                   distill_loss_weight=0.9, temperature=4.0, verbose=False).train()
    method = KD(KD.parse_params({}), embedding_context(8, 8))
    ours = DistillationTask(FeatureTap(student), FeatureTap(teacher), method, ce_weight=KD.default_ce_weight,
                            kl_weight=KD.default_kl_weight, kl_temperature=4.0).train()
    assert ours.loss_weights() == {"ce": 0.1, "kl": 0.9}

    out_ours = ours(Batch(images, target, torch.arange(6)))
    out_theirs = theirs(images, target)
    close(out_ours["output"], out_theirs["output"])
    close(out_ours["terms"]["kl"], out_theirs["kd_loss"].detach())
    close(out_ours["terms"]["ce"], out_theirs["task_loss"].detach())
    close(out_ours["loss"], out_theirs["loss"])

    grads = []
    for loss in (out_ours["loss"], out_theirs["loss"]):
        student.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for g_ours, g_theirs in zip(*grads):
        close_grad(g_ours, g_theirs)


# ----------------------------------------------------------------------------------------- at
AT_PAIRS = {f"pair{i}": {"student": {"io": "output", "path": f"s{i}"}, "teacher": {"io": "output", "path": f"t{i}"},
                         "weight": 1} for i in (1, 2)}


def at_maps():
    s1, t1 = randn(4, 8, 8, 8, seed=10), randn(4, 16, 8, 8, seed=11)
    s2, t2 = randn(4, 16, 4, 4, seed=12), randn(4, 32, 4, 4, seed=13)
    return io(s1=s1, s2=s2), io(t1=t1, t2=t2), [(s1, t1), (s2, t2)]


def test_at_matches_torchdistill_code_mode():
    student_io, teacher_io, pairs = at_maps()
    ours = sum(at_loss(s, t) for s, t in pairs)
    close(ours, ATLoss(AT_PAIRS, mode="code")(student_io, teacher_io))


def test_at_paper_mode_is_the_unsquared_per_sample_norm():
    """torchdistill's mode='paper' (eq. 2 as printed) takes the un-squared L2 norm per sample and
    averages over samples; ours (the authors' code) averages the squared differences over samples
    and positions: paper = mean_i sqrt(HW * ours(sample i))."""
    student_io, teacher_io, pairs = at_maps()
    paper = ATLoss(AT_PAIRS, mode="paper")(student_io, teacher_io)
    expected = sum(
        torch.stack([torch.sqrt(s.shape[-1] * s.shape[-2] * at_loss(s[i:i + 1], t[i:i + 1])) for i in range(len(s))]).mean()
        for s, t in pairs
    )
    close(expected, paper)
    ours = sum(at_loss(s, t) for s, t in pairs)
    assert float(paper) > 10 * float(ours)  # the scales differ by far more than tolerance: beta=1000 is for ours


def test_at_pools_a_larger_map_where_torchdistill_needs_equal_sizes():
    student, teacher = randn(4, 8, 8, 8, seed=14), randn(4, 16, 4, 4, seed=15)
    pooled = F.adaptive_avg_pool2d(student, 4)
    theirs = ATLoss({"p": AT_PAIRS["pair1"]}, mode="code")(io(s1=pooled), io(t1=teacher))
    close(at_loss(student, teacher), theirs)


# ----------------------------------------------------------------------------------- sp, pkt
def sp_reference(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """||G~_T - G~_S||_F^2 / b^2 with the batch Gram matrices' rows normalised in the L_p norm."""
    def rows(x):
        gram = x.flatten(1) @ x.flatten(1).t()
        return gram / gram.norm(p=p, dim=1, keepdim=True)

    return (rows(teacher) - rows(student)).pow(2).sum() / len(student) ** 2


def test_sp_matches_torchdistill_except_its_l1_row_normalisation():
    """torchdistill 1.1.5's SPKDLoss calls ``normalize(G, 1)``, whose second argument is p, so its
    rows are L1-normalised; Tung & Mori (and RepDistiller) L2-normalise them, as we do. With that
    one difference accounted for, the two agree."""
    student, teacher = randn(8, 16, 4, 4, seed=20), randn(8, 32, 2, 2, seed=21)
    theirs = SPKDLoss(student_output_path="s", teacher_output_path="t", reduction="batchmean")(io(s=student), io(t=teacher))
    close(sp_loss(student, teacher), sp_reference(student, teacher, p=2))
    close(theirs, sp_reference(student, teacher, p=1))
    assert not math.isclose(float(sp_loss(student, teacher)), float(theirs), rel_tol=1e-2)


def test_pkt_matches_torchdistill_pktloss():
    student, teacher = randn(12, 24, seed=30), randn(12, 40, seed=31)
    theirs = PKTLoss("s", "output", "t", "output", eps=1e-7)
    close(pkt_loss(student, teacher), theirs(io(s=student), io(t=teacher)))


# ---------------------------------------------------------------------------------------- rkd
@pytest.mark.parametrize("dist_factor, angle_factor", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_rkd_matches_torchdistill_rkdloss(dist_factor, angle_factor):
    student, teacher = randn(10, 24, seed=40), randn(10, 40, seed=41) * 3
    theirs = RKDLoss("s", "t", dist_factor=dist_factor, angle_factor=angle_factor, reduction="mean")
    ours = dist_factor * rkd_distance_loss(student, teacher) + angle_factor * rkd_angle_loss(student, teacher)
    close(ours, theirs(io(s=student), io(t=teacher)))


# ----------------------------------------------------------------------------------------- cc
def cc_pair(student_dim: int = 20, teacher_dim: int = 36, embed_dim: int = 16):
    torch.manual_seed(50)
    ours = CorrelationCongruence(CorrelationCongruence.Params(kernel="gaussian", embed_dim=embed_dim),
                                 embedding_context(student_dim, teacher_dim))
    linear_s, linear_t = copy.deepcopy(ours.embed_student), copy.deepcopy(ours.embed_teacher)
    return ours, linear_s, linear_t


def test_cc_gaussian_is_n_squared_times_torchdistill_squared():
    """Ours: squared Frobenius norm / n^2 of kernels of L2-normalised embeddings (the paper's loss;
    the Taylor kernel approximates exp(-gamma ||x-y||^2) only for unit vectors). torchdistill's
    CCKDLoss: the un-squared norm / n^2 of kernels of the raw linear outputs. On unit embeddings
    the two are exactly related: ours = n^2 * theirs^2."""
    ours, linear_s, linear_t = cc_pair()
    features_s, features_t = randn(8, 20, seed=51), randn(8, 36, seed=52)
    mine = ours(TapOutputs(None, features_s), TapOutputs(None, features_t), None)["cc"]
    theirs_loss = CCKDLoss("s", "t", kernel_config={"type": "gaussian", "gamma": 0.4, "max_p": 2}, reduction="batchmean")
    unit_s, unit_t = F.normalize(linear_s(features_s), dim=1), F.normalize(linear_t(features_t), dim=1)
    theirs = theirs_loss(io(s=unit_s), io(t=unit_t))
    close(mine, 8**2 * theirs**2)
    raw = theirs_loss(io(s=linear_s(features_s)), io(t=linear_t(features_t)))
    assert not math.isclose(float(mine.detach()), 8**2 * float(raw.detach()) ** 2, rel_tol=1e-2)  # raw outputs: another quantity


# ------------------------------------------------------------------------------------ fitnet
def test_fitnet_matches_torchdistill_convreg_and_mse():
    torch.manual_seed(60)
    ours = HintRegressor(8, 16, (4, 4), relu=True).train()
    theirs = ConvReg(8, 16, kernel_size=1, stride=1, padding=0, uses_relu=True).train()
    theirs.conv.load_state_dict(ours.conv.state_dict())
    theirs.bn.load_state_dict(ours.bn.state_dict())
    student, teacher = randn(6, 8, 4, 4, seed=61), randn(6, 16, 4, 4, seed=62).relu()
    wrapper = SimpleLossWrapper(nn.MSELoss(), input={"is_from_teacher": False, "module_path": "regressor", "io": "output"},
                                target={"is_from_teacher": True, "module_path": "hint", "io": "output"})
    close(hint_loss(ours(student), teacher), wrapper(io(regressor=theirs(student)), io(hint=teacher), None))


# ---------------------------------------------------------------------------------------- vid
def test_vid_matches_torchdistill_regressor_and_loss():
    torch.manual_seed(70)
    shapes = [(8, 16, 4), (16, 24, 2)]  # (student channels, teacher channels, size) per stage
    ours = [VariationalRegressor(sc, tc, init_variance=5.0, eps=1e-5) for sc, tc, _ in shapes]
    theirs = [Regressor4VID(sc, tc, tc, eps=1e-5, init_pred_var=5.0) for sc, tc, _ in shapes]
    for mine, peer in zip(ours, theirs):
        close(mine.log_scale.detach(), peer.soft_plus_param.detach())  # the same initial variance
        peer.regressor.load_state_dict(mine.mean.state_dict())
    maps = [(randn(4, sc, n, n, seed=71 + i), randn(4, tc, n, n, seed=81 + i)) for i, (sc, tc, n) in enumerate(shapes)]
    mine = sum(r(s, t) for r, (s, t) in zip(ours, maps))
    pairs = {f"p{i}": {"student": {"io": "output", "path": f"r{i}"}, "teacher": {"io": "output", "path": f"t{i}"}}
             for i in range(len(shapes))}
    student_io = io(**{f"r{i}": r(s) for i, (r, (s, _)) in enumerate(zip(theirs, maps))})
    teacher_io = io(**{f"t{i}": t for i, (_, t) in enumerate(maps)})
    peer = VIDLoss(pairs)(student_io, teacher_io)
    close(mine, peer)
    mine.backward()
    peer.backward()
    for m, p in zip(ours, theirs):
        close_grad(m.log_scale.grad, p.soft_plus_param.grad)
        for wm, wp in zip(m.mean.parameters(), p.regressor.parameters()):
            close_grad(wm.grad, wp.grad)


# ---------------------------------------------------------------------------------------- crd
def crd_pair(num_data=40, k=12, student_dim=20, teacher_dim=36, feat_dim=16):
    torch.manual_seed(90)
    targets = torch.arange(num_data) % 4
    params = CRD.Params(feat_dim=feat_dim, nce_k=k)
    ours = CRD(params, embedding_context(student_dim, teacher_dim, num_data, targets)).train()
    theirs = CRDLoss("s_norm", "s_empty", "t_norm", input_size=feat_dim, output_size=num_data,
                     num_negative_samples=k, num_samples=num_data, temperature=params.nce_t, momentum=params.nce_m,
                     eps=1e-7)
    theirs.memory_v1.copy_(ours.memory_s)  # memory_v1: the bank of student embeddings
    theirs.memory_v2.copy_(ours.memory_t)
    norm_s = Normalizer4CRD(copy.deepcopy(ours.embed_s.linear))
    norm_t = Normalizer4CRD(copy.deepcopy(ours.embed_t.linear))
    return ours, theirs, norm_s, norm_t, targets


def test_crd_matches_torchdistill_crdloss_over_two_steps():
    ours, theirs, norm_s, norm_t, targets = crd_pair()
    for step, index in enumerate((torch.tensor([0, 5, 9, 14, 22, 31]), torch.tensor([5, 7, 8, 22, 30, 39]))):
        features_s, features_t = randn(6, 20, seed=91 + step), randn(6, 36, seed=93 + step)
        batch = Batch(None, targets[index], index)
        torch.manual_seed(step)
        contrast_idx = ours.contrast_indices(index, batch.target)
        torch.manual_seed(step)  # our forward draws the same negatives again
        mine = ours(TapOutputs(None, features_s), TapOutputs(None, features_t), batch)["crd"]
        supp = {"pos_idx": index, "contrast_idx": contrast_idx}
        peer = theirs(io(s_norm=norm_s(features_s), s_empty__input=supp), io(t_norm=norm_t(features_t)))
        close(mine, peer.reshape(()))  # CRDLoss returns shape [1]
        close(ours.normaliser, theirs.params[2:4])  # Z, set from the first batch, kept after
        if step == 0:
            mine.backward()
            peer.backward()
            close_grad(ours.embed_s.linear.weight.grad, norm_s.linear.weight.grad)
            close_grad(ours.embed_t.linear.weight.grad, norm_t.linear.weight.grad)
        ours.after_step()  # torchdistill updates its banks inside forward; we do it after the optimiser step
        close(ours.memory_s, theirs.memory_v1)
        close(ours.memory_t, theirs.memory_v2)


class _LabelledSet(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets, self.classes = list(targets), sorted(set(targets))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return torch.zeros(1), self.targets[index]


def test_crd_negative_sampling_differs_on_purpose():
    """Both draw negatives from the other classes. torchdistill (as RepDistiller) draws them in the
    data set without replacement when the pool allows; we draw with replacement in the training
    process, so a row may repeat. With a pool of 20 rows and K = 19 that shows in every batch."""
    targets = torch.arange(40) % 2
    peer = CRDDatasetWrapper(_LabelledSet(targets.tolist()), num_negative_samples=19, mode="exact", ratio=1.0)
    np.random.seed(0)
    for index in range(8):
        contrast = peer[index][2]["contrast_idx"]
        assert contrast[0] == index and len(set(contrast[1:])) == 19
        assert (targets[contrast[1:]] != targets[index]).all()

    torch.manual_seed(0)
    count = torch.bincount(targets)
    index = torch.arange(8)
    rows = draw_other_class_rows(targets[index], 19, torch.argsort(targets, stable=True), torch.cumsum(count, 0) - count, count)
    assert (targets[rows] != targets[index].unsqueeze(1)).all()
    assert all(len(set(r.tolist())) < 19 for r in rows)

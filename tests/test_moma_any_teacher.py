"""MoMA with keys from a frozen teacher of another architecture, the student from random weights
(docs/moma.md, "Which MoMA you get"): on the shipped LC25000 lung tiles at 32 px the contrastive
term carries per-sample information, and a teacher that learnt something gives keys the student
follows more closely than a teacher of random weights. Diagnostics are read from history.csv."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from moma.distill.base import Batch
from moma.engine.builder import build_task
from moma.engine.runs import run_training
from conftest import write_teacher

CLASSES = ["lung_aca", "lung_n", "lung_scc"]
BATCH = 24


def lung_config(make_config, manifest, out: Path, arch: str, epochs: int, **distill):
    return make_config(manifest, run={"name": "r", "output_dir": str(out), "seed": 0}, model={"arch": arch},
                       data={"val_fraction": 0.2, "test_fraction": 0.2},
                       optim={"epochs": epochs, "batch_size": BATCH, "lr": 0.05}, distill=distill or {})


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, lung_subset) -> Path:
    """A test_efficientnet trained on the same tiles: a teacher of another architecture than the
    test_resnet student, that knows the classes."""
    from conftest import tiny_config

    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(out, lung_subset, run={"name": "teacher", "output_dir": str(out), "seed": 0},
                      model={"arch": "test_efficientnet"}, data={"val_fraction": 0.2, "test_fraction": 0.2},
                      optim={"epochs": 6, "batch_size": 32, "lr": 0.05})
    result = run_training(cfg)
    assert result.test_metrics()["macro_f1"] > 0.5, "the teacher learnt too little for this test to mean anything"
    return Path(result.run_dir) / "best.safetensors"


def distil(make_config, manifest, out: Path, teacher: Path, student_arch="test_resnet") -> pd.DataFrame:
    cfg = lung_config(make_config, manifest, out, student_arch, 3, method="moma", teacher=str(teacher),
                      student_init="scratch")
    return pd.read_csv(Path(run_training(cfg).run_dir) / "history.csv")


def test_keys_from_a_frozen_teacher_of_another_architecture_carry_per_sample_signal(
        tmp_path, make_config, lung_subset, trained_teacher, caplog):
    summary = distil(make_config, lung_subset, tmp_path / "trained", trained_teacher)
    assert "no per-sample signal" not in caplog.text
    share = summary["train_nce"] / summary["train_nce_chance"]
    assert ((share > 0.05) & (share < 0.90)).all(), share.tolist()
    # The student starts random: retrieval climbs from chance (1 / batch) and must end well above it.
    assert summary["train_nce_retrieval"].iloc[-1] >= 3 / BATCH, summary["train_nce_retrieval"].tolist()

    random_teacher = write_teacher(tmp_path / "random.safetensors", CLASSES, arch="test_efficientnet", seed=3)
    control = distil(make_config, lung_subset, tmp_path / "random", random_teacher)
    trained, random = summary["train_nce_agreement"].iloc[-1], control["train_nce_agreement"].iloc[-1]
    assert trained > random, (trained, random)
    assert "teacher seems to carry no per-sample signal" in caplog.text  # the warning names the control


def test_a_vit_teacher_distils_into_a_resnet_student_and_logs_its_diagnostics(tmp_path, make_config, lung_subset):
    teacher = write_teacher(tmp_path / "vit.safetensors", CLASSES, arch="test_vit")
    summary = distil(make_config, lung_subset, tmp_path / "vit", teacher)
    for column in ("train_nce", "train_nce_chance", "train_nce_retrieval", "train_nce_agreement",
                   "train_nce_retrieval_pre_attention", "train_attention_gain", "train_kl"):
        assert column in summary and summary[column].notna().all(), column


def test_no_query_meets_its_own_key_among_its_negatives(tmp_path, make_config, lung_subset):
    teacher = write_teacher(tmp_path / "t.safetensors", CLASSES, arch="test_efficientnet")
    cfg = lung_config(make_config, lung_subset, tmp_path, "test_resnet", 1, method="moma", teacher=str(teacher),
                      student_init="scratch", params={"queue_size": 16})
    task, _ = build_task(cfg, CLASSES, 40, torch.device("cpu"))
    task.train()
    method = task.method
    generator = torch.Generator().manual_seed(0)
    own_key_in_memory = False
    for step in range(6):  # 8 rows a step out of 12: rows come back while their earlier keys are in the queue
        index = (torch.arange(8) + 8 * step) % 12
        _, mask = method._negatives(torch.zeros(8, method.params.feat_dim), index)
        owners = torch.cat([index, method.queue.owners])  # in-batch keys first, then the memory's slots
        own = owners.view(1, -1) == index.view(-1, 1)
        assert not (mask & own).any(), f"step {step}: a query meets its own key among its negatives"
        own_key_in_memory |= bool(own[:, len(index):].any())
        task(Batch(torch.randn(8, 3, 32, 32, generator=generator), index % 3, index))
        method.after_step()
    assert own_key_in_memory  # the check above had something to catch
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    task(Batch(torch.randn(8, 3, 32, 32, generator=generator), torch.zeros(8, dtype=torch.long), torch.arange(8)))
    assert all(torch.equal(before[k], v) for k, v in task.teacher.state_dict().items())  # the teacher stays frozen


def test_the_memory_s_key_head_is_an_ema_of_the_learnt_one(tmp_path, make_config, lung_subset):
    teacher = write_teacher(tmp_path / "t.safetensors", CLASSES, arch="test_efficientnet")
    cfg = lung_config(make_config, lung_subset, tmp_path, "test_resnet", 1, method="moma", teacher=str(teacher),
                      student_init="scratch", params={"queue_size": 16, "momentum": 0.9})
    task, _ = build_task(cfg, CLASSES, 40, torch.device("cpu"))
    task.train()
    method = task.method
    with torch.no_grad():
        for p in method.key_head.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in method.key_head.parameters()]
    copy = [p.detach().clone() for p in method.key_head_m.parameters()]
    method.momentum_update()
    for new, old, source in zip(method.key_head_m.parameters(), copy, online):
        assert torch.allclose(new, 0.9 * old + 0.1 * source, atol=1e-6)


def test_a_features_only_teacher_gives_keys_and_no_kl_term_said_once(tmp_path, make_config, lung_subset, caplog):
    caplog.set_level(logging.INFO, logger="moma")
    teacher = write_teacher(tmp_path / "features.safetensors", [], arch="test_efficientnet")  # no classifier
    cfg = lung_config(make_config, lung_subset, tmp_path, "test_resnet", 1, method="moma", teacher=str(teacher),
                      params={"queue_size": 16})
    task, info = build_task(cfg, CLASSES, 40, torch.device("cpu"))
    assert task.method.key_source == "teacher" and not info["loss_weights"].get("kl")
    assert caplog.text.count("no classifier (features only)") == 1
    task.train()
    index = torch.arange(8)
    out = task(Batch(torch.randn(8, 3, 32, 32), index % 3, index))
    assert set(out["terms"]) >= {"ce", "nce"} and "kl" not in out["terms"]
    out["loss"].backward()
    assert task.method.key_head.mlp[0].weight.grad is not None  # the key head learns from the in-batch keys

"""MoMA's contrastive term on real H&E tiles: informative with the defaults, collapsed with the
published code's wiring (docs/moma.md, "Which MoMA you get"). Short runs on the shipped LC25000
lung tiles at 32 px with timm's test_resnet; the diagnostics are read back from history.csv."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from moma.engine.runs import run_training
from conftest import write_teacher



def train_moma(tmp_path, make_config, manifest, **params):
    teacher = write_teacher(tmp_path / "teacher.safetensors", ["lung_aca", "lung_n", "lung_scc"])
    cfg = make_config(manifest, run={"name": "moma", "output_dir": str(tmp_path / "runs"), "seed": 0},
                      data={"val_fraction": 0.2, "test_fraction": 0.2},
                      optim={"epochs": 3, "batch_size": 24, "lr": 0.05},
                      distill={"method": "moma", "teacher": str(teacher), "params": params})
    run_dir = Path(run_training(cfg).run_dir)
    return pd.read_csv(run_dir / "history.csv"), json.loads((run_dir / "metrics.json").read_text())


def test_default_contrastive_term_stays_informative(tmp_path, make_config, lung_subset, caplog):
    summary, metrics = train_moma(tmp_path, make_config, lung_subset)
    share = summary["train_nce"] / summary["train_nce_chance"]
    assert ((share > 0.01) & (share < 0.90)).all(), share.tolist()
    chance = 1 / 24  # one positive among the batch's 24 keys
    assert (summary["train_nce_retrieval"] >= 3 * chance).all(), summary["train_nce_retrieval"].tolist()
    assert (summary["train_nce_query_cos"] < 0.99).all()
    assert [row["train_nce"] for row in metrics["history"]] == summary["train_nce"].tolist()  # metrics.json too
    assert "shortcut" not in caplog.text


def test_official_code_preset_reproduces_the_collapse(tmp_path, make_config, lung_subset, caplog):
    summary, _ = train_moma(tmp_path, make_config, lung_subset, preset="official-code", queue_size=4096)
    assert summary["train_nce_chance"].iloc[0] == pytest.approx(math.log(4097))
    assert (summary["train_nce"].iloc[1:] < 1e-3).all(), summary["train_nce"].tolist()
    assert (summary["train_nce_key_cos"] > 0.99).all()  # every positive key of a batch is one vector
    assert (summary["train_nce_retrieval"].iloc[1:] < 3 / 24).all()  # at chance
    assert "shortcut" in caplog.text

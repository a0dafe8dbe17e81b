"""Adding something touches one place. A toy method, one file's worth of code registered at run
time, is listed by ``moma methods``, trains through the builder and the generic zoo checks, and
the suite's registry-driven checks (the methods doc, the peer-equivalence listing) pass without
any edit. A plugin module outside the package adds a toy metric, which a run selects by and
reports and a grid tabulates, and a toy slide reader, which ``moma tile`` and ``moma predict`` use."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field

import test_docs
import test_peer_equivalence
import test_slide_readers
import test_zoo
from conftest import make_tile_folder
from moma import cli, metrics
from moma.compare import run_compare
from moma.data.slide_readers import registry as slide_registry
from moma.distill import registry
from moma.distill.base import Batch, DistillMethod, MethodContext, MethodParams
from moma.engine.layout import HISTORY_NAME
from moma.engine.result import RunResult
from moma.models.taps import TapOutputs
from slide_helpers import cells, slide_pixels


# ---------------------------------------------------------------- the whole method: one file's worth
class ToyParams(MethodParams):
    beta: float = Field(2.0, ge=0.0, description="weight of the toy term")


class ToyCosine(DistillMethod):
    """Pull the student's pooled embedding, through a learned projection, towards the teacher's."""

    name = "toy"
    summary = "toy: cosine distance between projected student and teacher embeddings"
    reference = "a test of the extension points"
    Params = ToyParams

    def __init__(self, params: ToyParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.project = torch.nn.Linear(ctx.student_probe.embedding.shape[1], ctx.teacher_probe.embedding.shape[1])
        self.loss_weights = {"toy": params.beta}

    def forward(self, student: TapOutputs, teacher: TapOutputs | None, batch: Batch) -> dict[str, torch.Tensor]:
        projected = self.project(student.embedding.flatten(1))
        return {"toy": 1.0 - F.cosine_similarity(projected, teacher.embedding.flatten(1).float()).mean()}
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_registered(monkeypatch):
    """The toy registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method(ToyCosine)
    return ToyCosine


def run_cli(*argv: str) -> int:
    """A CLI command in this process (so it sees the toy), without the CLI's logging setup."""
    args = cli.build_parser().parse_args(list(argv))
    return args.func(args)


def test_the_cli_lists_a_new_method_with_its_defaults(toy_registered, capsys):
    assert run_cli("methods", "--defaults") == 0
    listed = capsys.readouterr().out
    assert re.search(r"^toy +toy: cosine distance between projected student and teacher embeddings$", listed, re.M)
    assert "ref: a test of the extension points" in listed
    assert "defaults: ce=1, kl=0; beta=2.0; needs: any teacher" in listed
    assert run_cli("methods", "--markdown") == 0
    rows = capsys.readouterr().out.splitlines()
    assert ("| `toy` | toy: cosine distance between projected student and teacher embeddings | a test of the "
            "extension points | ce=1, kl=0; beta=2.0; needs: any teacher |") in rows


def test_the_registry_driven_checks_pass_without_an_edit(toy_registered):
    assert "toy" in test_peer_equivalence.methods_without_counterpart()
    test_peer_equivalence.test_every_counterpart_is_a_registered_method()
    test_docs.test_methods_doc_table_is_what_the_registry_prints()  # the shipped table is unaffected


def test_a_new_method_trains_through_the_builder_and_passes_the_zoo_checks(toy_registered, tmp_path):
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    teacher = test_zoo.TEACHER, tuple(test_zoo.OTHER_CLASSES)
    model = create_backbone(teacher[0], len(teacher[1]))
    path = tmp_path / "teacher.safetensors"
    save_model_checkpoint(path, model.state_dict(), ModelMetadata(teacher[0], list(teacher[1]), test_zoo.IMAGE,
                                                                  [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    test_zoo.test_method_trains_through_the_builder("toy", {teacher: path})
    task, info = test_zoo.build("toy", {teacher: path})
    assert info["loss_weights"] == {"ce": 1.0, "kl": 0.0, "toy": 2.0}
    assert info["extra_parameters"] == 1280 * 512 + 512  # efficientnet_b0 -> resnet18 embeddings


# ------------------------------------------- a plugin's metric and slide reader: one module, outside the package
METRIC_PLUGIN = '''
"""A toy metric: the share of tiles predicted as the first class."""
from moma.metrics import register_metric


def first_class_share(targets, probs, class_names):
    return float((probs.argmax(axis=1) == 0).mean())


register_metric("first_share", "first-class share", first_class_share)
'''
PLUGIN = textwrap.dedent(METRIC_PLUGIN) + textwrap.dedent(test_slide_readers.PLUGIN)
TINY = ["--arch", "test_resnet", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "augment.randaugment=false"]


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """The plugin written to a folder outside the package and imported; both registries are
    restored afterwards."""
    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))
    monkeypatch.setattr(slide_registry, "_READERS", dict(slide_registry._READERS))
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "moma_toy_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    monkeypatch.delitem(sys.modules, "moma_toy_plugin", raising=False)
    return importlib.import_module("moma_toy_plugin")


def tiny_grid(tmp_path, tiles) -> dict:
    return {"name": "grid", "output_dir": str(tmp_path / "compare"), "methods": ["none"], "folds": 2, "seeds": [0],
            "base": {"data": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
                     "augment": {"randaugment": False}, "model": {"arch": "test_resnet"},
                     "optim": {"epochs": 1, "batch_size": 16, "lr": 0.05},
                     "train": {"tensorboard": False, "max_steps_per_epoch": 2, "select_metric": "first_share"}},
            "settings": {"plain": {"data": {"source": str(tiles)}}}}


@pytest.mark.usefixtures("restore_logging")
def test_a_plugin_adds_a_metric_and_a_slide_reader_without_editing_the_package(toy_plugin, tmp_path, capsys):
    tiles = make_tile_folder(tmp_path / "tiles", classes=("tumour", "stroma"), per_class=12)
    # the metric: a run selects by it, reports it and logs it per epoch
    assert cli.main(["train", "--data", str(tiles), "--out", str(tmp_path / "runs"), "--name", "toy", *TINY,
                     "--set", "train.select_metric=first_share", "--set", "data.mpp=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "best epoch (by val first_share)" in printed
    assert re.search(r"^test \(best model\): .*  first-class share \d\.\d{4}$", printed, re.M)
    run = tmp_path / "runs" / "toy"
    result = RunResult.read(run)
    assert result.select_metric == "first_share" and 0 <= result.best.test["first_share"] <= 1
    assert "val_first_share" in pd.read_csv(run / HISTORY_NAME).columns
    # ... and the comparison grid gets its columns
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_grid(tmp_path, tiles)))
    out = run_compare(config)
    results = pd.read_csv(out / "results.csv")
    assert {"best_first_share", "last_first_share", "val_first_share"} <= set(results.columns)
    assert results["best_first_share"].between(0, 1).all()
    assert "first_share_mean" in pd.read_csv(out / "summary.csv").columns

    # the reader: a .toyslide only it opens is tiled and predicted
    pixels = slide_pixels()
    (tmp_path / "slides").mkdir()
    with open(tmp_path / "slides" / "toy1.toyslide", "wb") as file:  # np.save on a path would add .npy
        np.save(file, pixels)
    assert cli.main(["tile", str(tmp_path / "slides"), "--out", str(tmp_path / "slide_tiles"), "--tile-size", "32",
                     "--tile-mpp", "0.5", "--workers", "1"]) == 0
    assert len(pd.read_csv(tmp_path / "slide_tiles" / "manifest.csv")) == len(cells())
    assert cli.main(["predict", str(run), str(tmp_path / "slides"), "--out", str(tmp_path / "pred"), "--workers", "1"]) == 0
    assert len(pd.read_csv(tmp_path / "pred" / "toy1.csv")) == len(cells())

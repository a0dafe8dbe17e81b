"""Adding a method touches one place: a toy method, one file's worth of code registered at run
time, is listed by ``moma methods``, trains through the builder and the generic zoo checks, and
the suite's registry-driven checks (the methods doc, the peer-equivalence listing) pass without
any edit."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

import test_docs
import test_peer_equivalence
import test_zoo
from moma import cli
from moma.distill import registry
from moma.distill.base import Batch, DistillMethod, MethodContext, MethodParams
from moma.models.taps import TapOutputs


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

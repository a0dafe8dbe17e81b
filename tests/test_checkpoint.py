import os

import pytest
import timm
import torch
from safetensors.torch import load_file

from moma.engine.checkpoint import ModelMetadata, load_model_checkpoint, read_metadata, save_model_checkpoint
from moma.engine.inference import load_classifier
from moma.errors import CheckpointError


def _meta(**kw):
    base = dict(arch="test_resnet", class_names=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.25] * 3, mpp=0.5)
    base.update(kw)
    return ModelMetadata(**base)


def test_model_checkpoint_round_trips(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3, pretrained=False).eval()
    path = tmp_path / "best.safetensors"
    save_model_checkpoint(path, model.state_dict(), _meta(epoch=4, val_metrics={"accuracy": 0.75}))
    state, meta = load_model_checkpoint(path)
    assert meta.class_names == ["a", "b", "c"] and meta.mpp == 0.5 and meta.epoch == 4 and meta.val_metrics["accuracy"] == 0.75
    assert meta.versions["torch"] == torch.__version__
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    # a plain timm model loads the weights directly
    fresh = timm.create_model("test_resnet", num_classes=3, pretrained=False)
    fresh.load_state_dict(load_file(str(path)))
    reloaded, _ = load_classifier(tmp_path, torch.device("cpu"))  # a run folder works too
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded(x), model(x), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]  # no temporary files left


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = timm.create_model("test_resnet", num_classes=3, pretrained=False)
    path = tmp_path / "best.safetensors"
    save_model_checkpoint(path, model.state_dict(), _meta(epoch=1))
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moma.engine.checkpoint.save_file", explode)
    with pytest.raises(OSError):
        save_model_checkpoint(path, model.state_dict(), _meta(epoch=2))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["best.safetensors"]


def test_foreign_or_corrupt_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_metadata(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "missing.safetensors")


def test_resolution_mismatch_is_more_than_ten_percent_of_the_models_mpp():
    meta = _meta(mpp=0.5)
    assert not meta.mpp_differs(0.5) and not meta.mpp_differs(0.54) and not meta.mpp_differs(None)
    assert meta.mpp_differs(0.56) and meta.mpp_differs(0.25)
    assert not _meta(mpp=None).mpp_differs(0.25)  # unknown: nothing to compare

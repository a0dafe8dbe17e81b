"""`moma import-teacher`: external weights in, a teacher checkpoint out, nothing unpickled.

Every import is checked by value: the imported teacher must give the same outputs as the network
whose weights were saved.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from conftest import make_tile_folder
from moma.cli import main
from moma.config import build_config
from moma.distill import Batch, all_methods
from moma.engine.builder import build_task, load_teacher
from moma.engine.checkpoint import read_metadata
from moma.errors import ConfigError

CLASSES = ["immune", "stroma", "tumour"]
TINY = ["--arch", "test_resnet", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "augment.randaugment=false"]


def timm_model(arch: str = "test_resnet", num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes).eval()
    _randomise_batchnorm(model)
    return model


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so a misplaced BN tensor changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("moma: error")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err


def assert_same_outputs(checkpoint: Path, reference: torch.nn.Module, size: int = 32) -> None:
    teacher = load_teacher(checkpoint)
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(teacher.tap.model(images), reference(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_state_dict_imports_with_its_outputs(tmp_path, capsys, suffix):
    model = timm_model()
    weights = tmp_path / f"teacher{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), weights)
    else:
        save_file(model.state_dict(), str(weights))
    out = tmp_path / "imported.safetensors"
    code, err = run_cli(capsys, "import-teacher", weights, "--arch", "test_resnet", "--classes", ",".join(CLASSES),
                        "--image-size", "32", "--model-mpp", "0.5", "--mean", "0.7,0.6,0.7", "--std", "0.2,0.2,0.2", "--out", out)
    assert code == 0, err
    meta = read_metadata(out)
    assert (meta.arch, meta.class_names, meta.image_size, meta.mpp) == ("test_resnet", CLASSES, 32, 0.5)
    assert meta.mean == pytest.approx([0.7, 0.6, 0.7]) and meta.std == pytest.approx([0.2, 0.2, 0.2])
    assert_same_outputs(out, model)


@pytest.mark.parametrize("wrap", ["ddp", "state_dict", "model+epoch", "state_dict+ddp"])
def test_wrapped_and_ddp_prefixed_checkpoints(tmp_path, capsys, wrap):
    model = timm_model()
    state = model.state_dict()
    ddp = {f"module.{k}": v for k, v in state.items()}
    data = {"ddp": ddp, "state_dict": {"state_dict": state}, "model+epoch": {"model": state, "epoch": 7, "acc": 0.9},
            "state_dict+ddp": {"state_dict": ddp, "optimizer": {"lr": 0.1}}}[wrap]
    torch.save(data, tmp_path / "w.pt")
    code, err = run_cli(capsys, "import-teacher", tmp_path / "w.pt", "--arch", "test_resnet", "--classes",
                        ",".join(CLASSES), "--out", tmp_path / "t.safetensors")
    assert code == 0, err
    assert_same_outputs(tmp_path / "t.safetensors", model)


@pytest.mark.parametrize("safe", [True, False])
def test_a_save_pretrained_folder_gives_arch_classes_and_input_from_config(tmp_path, capsys, safe):
    from timm.models import save_for_hf

    model = timm_model()
    folder = tmp_path / "hub_model"
    save_for_hf(model, str(folder), model_config={"label_names": ["benign", "in_situ", "invasive"]},
                safe_serialization=safe, data_config={"input_size": (3, 48, 48), "mean": (0.6, 0.5, 0.7),
                                                       "std": (0.25, 0.25, 0.25)})
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    code, err = run_cli(capsys, "import-teacher", folder, "--out", tmp_path / "t.safetensors")
    assert code == 0, err
    meta = read_metadata(tmp_path / "t.safetensors")
    assert meta.arch == "test_resnet" and meta.class_names == ["benign", "in_situ", "invasive"]
    assert meta.image_size == 48 and meta.mean == pytest.approx([0.6, 0.5, 0.7]) and meta.std == pytest.approx([0.25] * 3)
    assert_same_outputs(tmp_path / "t.safetensors", model)


def test_a_folder_refuses_a_different_arch(tmp_path, capsys):
    from timm.models import save_for_hf

    save_for_hf(timm_model(), str(tmp_path / "m"), model_config={"label_names": CLASSES})
    code, err = run_cli(capsys, "import-teacher", tmp_path / "m", "--arch", "resnet18", "--out", tmp_path / "t.safetensors")
    assert_one_line_error(code, err, "names 'test_resnet'", "--arch")


def _torchvision(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=3).eval()
    _randomise_batchnorm(model)
    return model


@pytest.mark.parametrize("tv_name, arch", [("resnet18", "resnet18"), ("efficientnet_b0", "efficientnet_b0")])
def test_torchvision_state_dicts_map_to_timm(tmp_path, capsys, tv_name, arch):
    model = _torchvision(tv_name)
    torch.save(model.state_dict(), tmp_path / f"{tv_name}.pth")
    out = tmp_path / "t.safetensors"
    code, err = run_cli(capsys, "import-teacher", tmp_path / f"{tv_name}.pth", "--arch", arch, "--classes",
                        ",".join(CLASSES), "--out", out)
    assert code == 0, err
    assert read_metadata(out).config["layout"] == ("timm" if tv_name == "resnet18" else "torchvision-efficientnet")
    assert_same_outputs(out, model, size=64)


@pytest.mark.parametrize("arch, fragments", [
    ("efficientnet_b1", ("torchvision EfficientNet weights with 16 blocks", "'efficientnet_b1' has 23", "B0 has 16")),
    ("resnet18", ("torchvision EfficientNet", "choose a timm EfficientNet for --arch")),
])
def test_efficientnet_weights_for_another_variant_or_family_are_refused(tmp_path, capsys, arch, fragments):
    torch.save(_torchvision("efficientnet_b0").state_dict(), tmp_path / "b0.pth")
    code, err = run_cli(capsys, "import-teacher", tmp_path / "b0.pth", "--arch", arch, "--classes", ",".join(CLASSES),
                        "--out", tmp_path / "t.safetensors")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "t.safetensors").exists()


def test_a_torchvision_model_that_is_not_mapped_is_refused_naming_the_keys(tmp_path, capsys):
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), tmp_path / "mnv2.pth")
    code, err = run_cli(capsys, "import-teacher", tmp_path / "mnv2.pth", "--arch", "mobilenetv2_100", "--features-only",
                        "--out", tmp_path / "t.safetensors")
    assert_one_line_error(code, err, "mnv2.pth", "missing (conv_stem.weight", "unexpected (features.0.0.weight", "--arch")


def test_the_official_moma_codes_efficientnet_checkpoint_maps_to_tf_efficientnet(tmp_path, capsys):
    """The official code trains EfficientNet-PyTorch's EfficientNet-B0 and saves ``{'model': state}``
    from DDP; TF 'same' padding and BN eps 1e-3 make timm's tf_efficientnet_b0 the exact match."""
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-b0", num_classes=3).eval()
    model.set_swish(memory_efficient=False)
    _randomise_batchnorm(model)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 50}, tmp_path / "net_best_acc.pth")
    out = tmp_path / "t.safetensors"
    code, err = run_cli(capsys, "import-teacher", tmp_path / "net_best_acc.pth", "--arch", "tf_efficientnet_b0",
                        "--classes", ",".join(CLASSES), "--out", out)
    assert code == 0, err
    assert read_metadata(out).config["layout"] == "efficientnet-pytorch"
    assert_same_outputs(out, model, size=64)


class RunsCode:
    """Unpickling this runs ``exec``: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path, capsys, writer):
    marker = tmp_path / "side_effect.txt"
    payload = {"state_dict": {"hook": RunsCode(marker)}}
    weights = tmp_path / "innocent.pth"
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload, protocol=2))
    code, err = run_cli(capsys, "import-teacher", weights, "--arch", "test_resnet", "--features-only",
                        "--out", tmp_path / "t.safetensors")
    assert_one_line_error(code, err, "innocent.pth", "refused", "exec")
    assert not marker.exists() and not (tmp_path / "t.safetensors").exists()
    # the file really is hostile: an unrestricted load runs its code
    torch.load(weights, weights_only=False) if writer == "torch.save" else pickle.loads(weights.read_bytes())
    assert marker.read_text() == "ran"


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    model = timm_model()
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    out = tmp_path / "t.safetensors"

    code, err = run_cli(capsys, "import-teacher", tmp_path / "ok.pth", "--arch", "resnet_nonexistent", "--out", out)
    assert_one_line_error(code, err, "--arch 'resnet_nonexistent' is not a timm model")

    code, err = run_cli(capsys, "import-teacher", tmp_path / "ok.pth", "--arch", "resnet18", "--classes",
                        ",".join(CLASSES), "--out", out)  # wrong architecture: a test_resnet file
    assert_one_line_error(code, err, "ok.pth", "do not fit timm 'resnet18'", "missing (", "check --arch")

    state = dict(model.state_dict())
    state["layer1.0.conv1.weight"] = torch.zeros(8, 32, 3, 3)
    torch.save(state, tmp_path / "misshaped.pth")
    code, err = run_cli(capsys, "import-teacher", tmp_path / "misshaped.pth", "--arch", "test_resnet", "--classes",
                        ",".join(CLASSES), "--out", out)
    assert_one_line_error(code, err, "1 mis-shaped (layer1.0.conv1.weight (8, 32, 3, 3) vs")

    make_tile_folder(tmp_path / "tiles", per_class=1, manifest=False)
    tile = next((tmp_path / "tiles").rglob("*.png"))
    (tmp_path / "tile.pth").write_bytes(tile.read_bytes())
    code, err = run_cli(capsys, "import-teacher", tmp_path / "tile.pth", "--arch", "test_resnet", "--out", out)
    assert_one_line_error(code, err, "tile.pth: unknown weights format")

    code, err = run_cli(capsys, "import-teacher", tmp_path / "ok.pth", "--arch", "test_resnet", "--out", out)
    assert_one_line_error(code, err, "3-class classifier", "--classes", "--features-only")

    code, err = run_cli(capsys, "import-teacher", tmp_path / "ok.pth", "--arch", "test_resnet", "--classes", "a,b",
                        "--out", out)
    assert_one_line_error(code, err, "2 class names given", "3 outputs")
    assert not out.exists()


def test_features_only_teacher_serves_moma_and_crd_but_not_logit_methods(tmp_path, capsys, make_config):
    model = timm_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ssl_backbone.pth")
    teacher = tmp_path / "teacher.safetensors"
    code, err = run_cli(capsys, "import-teacher", tmp_path / "ssl_backbone.pth", "--arch", "test_resnet",
                        "--features-only", "--image-size", "32", "--out", teacher)
    assert code == 0, err
    meta = read_metadata(teacher)
    assert meta.class_names == [] and meta.config["features_only"]
    assert not any(k.startswith("fc.") for k in load_teacher(teacher).state)
    with torch.no_grad():  # the body is the saved network's: same pooled features
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(load_teacher(teacher).tap.model(images), model.forward_head(
            model.forward_features(images), pre_logits=True), rtol=0, atol=1e-6)

    data = make_tile_folder(tmp_path / "tiles", per_class=12)
    for method, params in (("moma", ["--set", "distill.params.queue_size=32"]), ("crd", ["--set", "distill.params.nce_k=16"])):
        out = tmp_path / "runs"
        code, err = run_cli(capsys, "distill", "--data", data, "--method", method, "--teacher", teacher,
                            "--out", out, "--name", method, *TINY, *params)
        assert code == 0, err
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert 0.0 <= metrics["best"]["test"]["accuracy"] <= 1.0
        assert (out / method / "best.safetensors").is_file()

    for method in ("kd", "dkd", "simkd"):
        cfg = make_config(data, distill={"method": method, "teacher": str(teacher)})
        with pytest.raises(ConfigError, match=f"'{method}' needs the teacher's class outputs.*features-only.*moma"):
            build_task(cfg, CLASSES, 36, torch.device("cpu"))


def test_a_features_only_checkpoint_cannot_predict(tmp_path, capsys):
    torch.save(timm_model().state_dict(), tmp_path / "w.pth")
    code, err = run_cli(capsys, "import-teacher", tmp_path / "w.pth", "--arch", "test_resnet", "--features-only",
                        "--out", tmp_path / "t.safetensors")
    assert code == 0, err
    make_tile_folder(tmp_path / "tiles", per_class=1, manifest=False)
    code, err = run_cli(capsys, "predict", tmp_path / "t.safetensors", tmp_path / "tiles", "--out", tmp_path / "p.csv")
    assert_one_line_error(code, err, "features-only teacher")


FEATURE_METHODS = sorted(name for name, cls in all_methods().items() if cls.requires_teacher and not cls.needs_teacher_classes)


def test_the_feature_methods_are_the_ones_the_docs_list():
    assert FEATURE_METHODS == sorted(["moma", "fitnet", "at", "sp", "cc", "rkd", "pkt", "vid", "crd", "semckd"])


@pytest.fixture(scope="module")
def features_only_teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fo")
    torch.save(timm_model().state_dict(), folder / "w.pth")
    assert main(["import-teacher", str(folder / "w.pth"), "--arch", "test_resnet", "--features-only",
                 "--image-size", "32", "--out", str(folder / "t.safetensors")]) == 0
    return folder / "t.safetensors"


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_feature_method_takes_a_step_with_a_features_only_teacher(method, features_only_teacher):
    params = {"moma": {"queue_size": 16}, "crd": {"nce_k": 8}}.get(method, {})
    cfg = build_config({"data": {"image_size": 32}, "model": {"arch": "test_resnet"}, "optim": {"batch_size": 8},
                        "distill": {"method": method, "teacher": str(features_only_teacher), "params": params}})
    torch.manual_seed(0)
    task, info = build_task(cfg, CLASSES, 32, torch.device("cpu"), train_targets=torch.arange(32) % 3)
    assert not info["same_label_space"] and task.kl_weight == 0.0
    task.train()
    index = torch.arange(8)
    out = task(Batch(input=torch.randn(8, 3, 32, 32), target=index % 3, index=index))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["output"].shape == (8, 3)
    student_grads = [p.grad for p in task.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)

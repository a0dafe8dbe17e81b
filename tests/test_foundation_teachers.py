"""Pathology foundation models import as their hub repositories lay them out, with their card's embedding.

Each layout is built with random weights, at two blocks and a reduced width where the real one is
1024+ channels, with the real options (register tokens, packed SwiGLU MLP, LayerScale, position
embeddings with or without the class token), saved as its hub folder (``config.json`` in the
repository's form + ``model.safetensors``), imported with ``moma import-teacher`` and loaded as a
teacher. The expected embedding is computed here by hand from the reference network's
``forward_features`` tokens, as each model card computes it. The transformers folders (Phikon,
Phikon-v2, Midnight) were written by transformers itself (``tests/fixtures/foundation``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import SwiGLUPacked

from moma.cli import main
from moma.engine.builder import load_teacher
from moma.engine.checkpoint import read_metadata

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
H_OPTIMUS = ([0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517])


def reference(arch: str, **kwargs) -> torch.nn.Module:
    """A timm network with random weights, LayerScale and norms away from identity."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "reg_token", "pos_embed")):
                param.normal_(0, 0.5)
            elif name.endswith("gamma") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if name.endswith("bias") else 1.0))
    return model


def hub_folder(folder: Path, model: torch.nn.Module, config: dict) -> Path:
    """config.json + model.safetensors, as a timm hub repository holds them."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def import_cli(capsys, source: Path, out: Path, *extra: str) -> str:
    code = main(["import-teacher", str(source), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def embeddings(checkpoint: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a distillation sees (the tap's embedding) and the network's own forward."""
    teacher = load_teacher(checkpoint)
    with torch.no_grad():
        return teacher.tap(images).embedding, teacher.tap.model(images)


def assert_embedding(checkpoint: Path, images: torch.Tensor, expected: torch.Tensor) -> None:
    tapped, forward = embeddings(checkpoint, images)
    assert tapped.shape == expected.shape
    torch.testing.assert_close(tapped, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(forward, expected, rtol=0, atol=2e-5)


def class_token(model, images):
    return model.forward_features(images)[:, 0]


def virchow_recipe(model, images):
    """The Virchow2 card: class token, and the mean of the tokens after the class and 4 register tokens."""
    tokens = model.forward_features(images)
    return torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)


# ------------------------------------------------------------------ timm hub layouts

def uni(tmp_path):
    """MahmoodLab/UNI: timm's older config form (arguments beside 'architecture'), ViT-L/16 + LayerScale."""
    model = reference("vit_large_patch16_224", embed_dim=64, depth=2, num_heads=1, init_values=1e-5,
                      dynamic_img_size=True)
    config = {"architecture": "vit_large_patch16_224", "patch_size": 16, "img_size": 224, "init_values": 1.0,
              "num_classes": 0, "num_features": 1024, "global_pool": "token", "dynamic_img_size": True,
              "pretrained_cfg": {"tag": "uni_mass100k", "custom_load": True, "crop_pct": 1, "input_size": [3, 224, 224],
                                 "fixed_input_size": False, "interpolation": "bilinear", "mean": IMAGENET[0],
                                 "std": IMAGENET[1], "num_classes": 0, "pool_size": None,
                                 "first_conv": "patch_embed.proj", "classifier": "head", "license": "CC BY-NC-ND 4.0"}}
    return model, config, class_token, 64, IMAGENET


def uni2_h(tmp_path):
    """MahmoodLab/UNI2-h: the card's ViT-H/14 arguments on timm's vit_giant_patch14_224 name (8
    register tokens, packed SwiGLU, LayerScale, no class position); its config.json as timm's
    push_to_hub writes it for a model built from a name (the card passes every argument by hand)."""
    model = reference("vit_giant_patch14_224", img_size=224, patch_size=14, depth=2, num_heads=2, init_values=1e-5,
                      embed_dim=128, mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer=SwiGLUPacked,
                      act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True)
    config = {"architecture": "vit_giant_patch14_224", "num_classes": 0, "num_features": 1536, "global_pool": "token",
              "pretrained_cfg": {"input_size": [3, 224, 224], "mean": IMAGENET[0], "std": IMAGENET[1], "num_classes": 0}}
    return model, config, class_token, 128, IMAGENET


def virchow2(tmp_path):
    """paige-ai/Virchow2: model_args without the MLP (the card passes SwiGLUPacked and SiLU), global_pool ''."""
    model = reference("vit_huge_patch14_224", embed_dim=160, depth=2, num_heads=2, img_size=224, init_values=1e-5,
                      reg_tokens=4, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                      mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    config = {"architecture": "vit_huge_patch14_224",
              "model_args": {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
                             "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True},
              "pretrained_cfg": {"tag": "virchow_v2", "custom_load": False, "input_size": [3, 224, 224],
                                 "fixed_input_size": False, "interpolation": "bicubic", "crop_pct": 1.0,
                                 "crop_mode": "center", "mean": IMAGENET[0], "std": IMAGENET[1], "num_classes": 0,
                                 "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
                                 "license": "CC-BY-NC-ND-4.0"}}
    return model, config, virchow_recipe, 320, IMAGENET


def h_optimus_0(tmp_path):
    """bioptimus/H-optimus-0: vit_giant_patch14_reg4_dinov2 at 224 px, its own mean/std in config.json."""
    model = reference("vit_giant_patch14_reg4_dinov2", img_size=224, embed_dim=128, depth=2, num_heads=2)
    config = {"architecture": "vit_giant_patch14_reg4_dinov2", "num_classes": 0, "num_features": 1536,
              "global_pool": "token",
              "pretrained_cfg": {"custom_load": True, "input_size": [3, 224, 224], "fixed_input_size": True,
                                 "mean": H_OPTIMUS[0], "std": H_OPTIMUS[1], "num_classes": 0, "license": "Apache 2.0"}}
    return model, config, class_token, 128, H_OPTIMUS


def kaiko_vits16(tmp_path):
    """kaiko.ai's ViT-S/16 (timm vit_small_patch16_224, dynamic size), mean and std 0.5, full width."""
    model = reference("vit_small_patch16_224", depth=2, dynamic_img_size=True)
    config = {"architecture": "vit_small_patch16_224", "num_classes": 0, "num_features": 384, "global_pool": "token",
              "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 0}}
    return model, config, class_token, 384, ([0.5] * 3, [0.5] * 3)


def dinov2_vits14_reg(tmp_path):
    """timm's DINOv2 ViT-S/14 with registers (LayerScale, 4 registers, no class position) at 224 px."""
    model = reference("vit_small_patch14_reg4_dinov2", img_size=224, depth=2)
    config = {"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0, "num_features": 384,
              "global_pool": "token", "pretrained_cfg": {"input_size": [3, 224, 224], "mean": IMAGENET[0],
                                                         "std": IMAGENET[1], "num_classes": 0}}
    return model, config, class_token, 384, IMAGENET


TIMM_LAYOUTS = {"uni": uni, "uni2-h": uni2_h, "virchow2": virchow2, "h-optimus-0": h_optimus_0,
                "kaiko-vits16": kaiko_vits16, "dinov2-vits14-reg4": dinov2_vits14_reg}
PUBLISHED = {"uni": "MahmoodLab/UNI", "uni2-h": "MahmoodLab/UNI2-h", "virchow2": "paige-ai/Virchow2",
             "h-optimus-0": "bioptimus/H-optimus-0"}


@pytest.mark.parametrize("name", TIMM_LAYOUTS)
def test_a_timm_hub_folder_imports_with_its_cards_embedding(tmp_path, capsys, name):
    model, config, recipe, width, (mean, std) = TIMM_LAYOUTS[name](tmp_path)
    folder = hub_folder(tmp_path / name, model, config)
    out = tmp_path / "teacher.safetensors"
    printed = import_cli(capsys, folder, out)
    meta = read_metadata(out)
    assert meta.class_names == [] and meta.image_size == 224 and meta.config["embedding_dim"] == width
    assert meta.mean == pytest.approx(mean) and meta.std == pytest.approx(std)
    assert meta.config.get("source") == PUBLISHED.get(name) and f"({width} wide)" in printed
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_embedding(out, images, recipe(model, images))
    if name == "h-optimus-0":
        assert meta.mpp == 0.5  # the card: tiles of 224 px at 0.5 um/px


def test_uni2_h_weights_alone_import_with_the_cards_arguments(tmp_path, capsys):
    """The card's manual route downloads the weights without config.json: --layout supplies what it passes."""
    model, *_ = uni2_h(tmp_path)
    weights = tmp_path / "uni2-h.safetensors"
    save_file(model.state_dict(), str(weights))
    out = tmp_path / "teacher.safetensors"
    import_cli(capsys, weights, out, "--layout", "uni2-h")
    meta = read_metadata(out)
    assert meta.arch == "vit_giant_patch14_224" and meta.config["foundation"] == "uni2-h"
    args = meta.config["model_args"]
    assert (args["reg_tokens"], args["num_heads"], args["mlp_layer"], args["act_layer"]) == (8, 2, "SwiGLUPacked", "silu")
    assert args["no_embed_class"] and args["init_values"]
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_embedding(out, images, class_token(model, images))


# ------------------------------------------------------------------ transformers folders

@pytest.mark.parametrize("name, layout, recipe, mean", [
    ("phikon", "hf-vit", "class", IMAGENET[0]),
    ("phikon-v2", "hf-dinov2", "class", IMAGENET[0]),
    ("midnight", "hf-dinov2", "class+mean-patch", [0.5] * 3),
])
def test_a_transformers_folder_imports_as_a_timm_vit(tmp_path, capsys, name, layout, recipe, mean):
    """Phikon's ViTModel and Phikon-v2's Dinov2Model (Midnight: Dinov2 with SwiGLU, whose card
    concatenates the class token and the mean patch token) give transformers' last_hidden_state."""
    out = tmp_path / "teacher.safetensors"
    extra = ["--embedding", recipe] if recipe != "class" else []
    import_cli(capsys, FIXTURES / name, out, *extra)
    meta = read_metadata(out)
    assert meta.config["layout"] == layout and meta.config["embedding"] == recipe
    assert meta.image_size == 32 and meta.mean == pytest.approx(mean)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    tokens = expected["last_hidden_state"]
    want = tokens[:, 0] if recipe == "class" else torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    assert meta.config["embedding_dim"] == want.shape[1]
    assert_embedding(out, expected["images"], want)


# ------------------------------------------------------------------ refusals and use


def test_an_unrecognised_token_output_asks_for_the_embedding(tmp_path, capsys):
    model, config, *_ = virchow2(tmp_path)
    config["pretrained_cfg"]["tag"] = "my_own_vit"  # global_pool '' and no card known: which embedding?
    folder = hub_folder(tmp_path / "vit", model, config)
    code = main(["import-teacher", str(folder), "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("moma: error") == 1 and "--embedding" in err and "global_pool ''" in err
    import_cli(capsys, folder, tmp_path / "t.safetensors", "--embedding", "mean-patch")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_embedding(tmp_path / "t.safetensors", images, model.forward_features(images)[:, 5:].mean(1))


@pytest.mark.parametrize("args, fragment", [
    (["--layout", "uni3"], "--layout uni3: choose one of"),
    (["--embedding", "max"], "--embedding max: choose one of"),
    (["--layout", "virchow2"], "--layout virchow2 is timm 'vit_huge_patch14_224'"),
])
def test_bad_layout_or_embedding_are_one_line_errors(tmp_path, capsys, args, fragment):
    model, config, *_ = uni(tmp_path)
    folder = hub_folder(tmp_path / "uni", model, config)
    code = main(["import-teacher", str(folder), "--out", str(tmp_path / "t.safetensors"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("moma: error") == 1 and fragment in err, err


def test_a_foundation_teacher_distils_into_a_small_student(tmp_path, capsys):
    """The Virchow2 layout (its 2x-wide embedding) as the frozen teacher of a ResNet student (CRD)."""
    from conftest import make_tile_folder

    model, config, *_ = virchow2(tmp_path)
    teacher = tmp_path / "virchow2.safetensors"
    import_cli(capsys, hub_folder(tmp_path / "virchow2", model, config), teacher, "--image-size", "28")
    data = make_tile_folder(tmp_path / "tiles", per_class=8)
    code = main(["distill", "--data", str(data), "--method", "crd", "--teacher", str(teacher), "--arch", "test_resnet",
                 "--image-size", "28", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "runs"),
                 "--name", "student", "--set", "distill.params.nce_k=8", "--set", "data.num_workers=0",
                 "--set", "train.progress=false",
                 "--set", "train.tensorboard=false", "--set", "augment.randaugment=false"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "runs" / "student" / "best.safetensors").is_file()

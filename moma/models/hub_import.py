"""An external model, from a weights file or a hub folder, fitted to a timm architecture.

Folders are read in the layout their hub repository has: timm's ``save_for_hf``/``push_to_hub``
form (``config.json`` naming the architecture, with ``model_args`` or the older top-level keys, and
``model.safetensors`` or ``pytorch_model.bin``), or a Hugging Face ``transformers`` ViT/DINOv2
folder (:mod:`moma.models.hf_folders`). Vision transformers get the arguments and embedding recipe
of :mod:`moma.models.vit_layouts`, recognised published models (UNI, UNI2-h, Virchow2,
H-optimus-0) their model card's too; ``--layout`` names one for a bare weights file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moma.errors import CheckpointError, ConfigError
from moma.models import hf_folders
from moma.models import vit_layouts as vit
from moma.models.external import (check_arch, classifier_keys, create, fit_to_arch, read_weights_file,
                                  rename_to_timm)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# timm config.json model_args of non-ViT families that do not change the weights' layout; the
# others are refused (only ViT arguments are recorded in a teacher checkpoint).
HARMLESS_MODEL_ARGS = {"num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate"}


@dataclass
class ExternalModel:
    """An external model fitted to a timm architecture."""

    arch: str
    state: dict[str, torch.Tensor]  # timm keys, loads strictly into create(arch, num_classes, model_args)
    num_classes: int  # 0: features only (no classifier)
    class_names: list[str] | None  # from a timm folder's config.json, when it names them
    image_size: int | None  # from config.json or timm's default for the architecture
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    layout: str  # which naming the weights came in: timm, hf-vit, hf-dinov2, torchvision-efficientnet, ...
    model_args: dict | None = None  # JSON timm arguments beyond the architecture's defaults (ViTs)
    embedding: str | None = None  # the embedding recipe (ViTs), see moma.models.vit_layouts.EMBEDDINGS
    foundation: vit.Layout | None = None  # the published model recognised
    mpp: float | None = None  # microns per pixel its card asks for


@dataclass
class Found:
    """What a source holds before fitting."""

    state: dict[str, torch.Tensor]
    arch: str
    raw: dict = field(default_factory=dict)  # config.json
    layout: str = "timm"
    model_args: dict | None = None
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None


def read_folder(folder: Path) -> Found:
    """Weights and configuration of a timm or transformers hub folder."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: not a hub model folder (no {CONFIG_FILE}); give a weights file and --arch instead")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    weights = next((folder / name for name in FOLDER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: has {CONFIG_FILE} but neither {' nor '.join(FOLDER_WEIGHTS)}")
    state = read_weights_file(weights)
    if hf_folders.hf_layout(raw):
        hf = hf_folders.convert(folder, raw, state)
        return Found(hf.state, hf.arch, raw, hf.layout, hf.model_args, hf.image_size, hf.mean, hf.std)
    return parse_timm_config(raw, config_path, state)


def parse_timm_config(raw: dict, origin: Path, state: dict[str, torch.Tensor]) -> Found:
    pretrained = raw.get("pretrained_cfg", raw)  # older exports keep everything at the top level
    arch = raw.get("architecture") or pretrained.get("architecture")
    if not arch:
        raise CheckpointError(f"{origin}: no 'architecture' key; give the weights file with --arch instead "
                              "(a transformers folder names its model_type: vit, dinov2)")
    names = raw.get("label_names", pretrained.get("label_names", raw.get("labels")))
    if isinstance(names, dict):  # {index: name}
        names = [names[k] for k in sorted(names, key=int)]
    input_size = pretrained.get("input_size")
    return Found(state, arch, raw, image_size=int(input_size[-1]) if input_size else None,
                 mean=tuple(pretrained["mean"]) if "mean" in pretrained else None,
                 std=tuple(pretrained["std"]) if "std" in pretrained else None,
                 class_names=[str(n) for n in names] if names else None)


def _read_source(source: Path, arch: str | None, card: vit.Layout | None) -> Found:
    if source.is_dir():
        found = read_folder(source)
        if arch and arch != found.arch:
            raise ConfigError(f"--arch {arch}: {source / CONFIG_FILE} names '{found.arch}'; leave --arch out for a folder")
        if card and (card.arch != found.arch or found.layout != "timm"):
            raise ConfigError(f"--layout {card.name} is timm '{card.arch}'; {source / CONFIG_FILE} names '{found.arch}'")
        return found
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    if card and arch and arch != card.arch:
        raise ConfigError(f"--layout {card.name} is timm '{card.arch}', not --arch {arch}; leave --arch out")
    arch = arch or (card.arch if card else None)
    if not arch:
        raise ConfigError(f"{source}: a weights file does not say its architecture; give --arch (a timm model name) "
                          f"or --layout ({', '.join(vit.LAYOUTS)})")
    return Found(read_weights_file(source), arch)


def _vit_args(found: Found, card: vit.Layout | None, origin: str) -> tuple[dict | None, vit.Layout | None]:
    """The recorded arguments of a timm ViT folder (or a file named by --layout), and its published model."""
    if found.layout != "timm" or not vit.is_vit_state(found.state) or not (found.raw or card):
        return found.model_args, None
    layout = card or vit.recognise(found.arch, found.raw, vit.vit_geometry(found.state))
    return vit.vit_args(found.arch, found.state, vit.config_args(found.raw, origin), layout, origin), layout


def _check_plain_args(found: Found, origin: str) -> None:
    extra = sorted(set(found.raw.get("model_args", {})) - HARMLESS_MODEL_ARGS)
    if extra:
        raise CheckpointError(f"{origin}: model_args {', '.join(extra)} change the architecture '{found.arch}', which "
                              "is recorded for vision transformers only; export the model with default arguments")
    if found.raw.get("model_args", {}).get("in_chans", 3) != 3:
        raise CheckpointError(f"{origin}: the model takes {found.raw['model_args']['in_chans']} input channels; "
                              "tiles are RGB (3)")


def import_external(source: str | Path, arch: str | None = None, class_names: list[str] | None = None,
                    features_only: bool = False, embedding: str | None = None, layout: str | None = None) -> ExternalModel:
    """Read ``source`` (a weights file or a hub folder) and fit it to its timm architecture."""
    source, origin = Path(source), str(source)
    card = vit.LAYOUTS[layout] if layout else None
    found = _read_source(source, arch, card)
    check_arch(found.arch)
    model_args, foundation = _vit_args(found, card, origin)
    if model_args is None and found.raw:
        _check_plain_args(found, origin)
    state, naming = ((found.state, "timm") if vit.is_vit_state(found.state)  # ViTs need no renaming
                     else rename_to_timm(found.state, create(found.arch, 0, model_args)))
    head_keys = classifier_keys(found.arch, model_args)
    num_classes, names = _choose_classes(origin, _classifier_outputs(state, head_keys), class_names,
                                         found.class_names, features_only)
    if num_classes == 0:
        state = {k: v for k, v in state.items() if k not in head_keys}
    model = fit_to_arch(state, found.arch, num_classes, origin, model_args)
    recipe = embedding or vit.default_embedding(model, foundation, vit.stated_pool(found.raw), origin)
    if recipe == "class+mean-patch" and num_classes:
        raise ConfigError(f"{origin}: the class+mean-patch embedding is twice the width the classifier takes; "
                          "import it with --features-only")
    vit.set_embedding(model, recipe)  # refuses a recipe the model cannot give
    defaults = model.pretrained_cfg
    return ExternalModel(
        arch=found.arch, state=dict(model.state_dict()), num_classes=num_classes, class_names=names,
        image_size=found.image_size or (model_args or {}).get("img_size") or int(defaults["input_size"][-1]),
        mean=found.mean or (foundation.mean if foundation else None) or tuple(defaults["mean"]),
        std=found.std or (foundation.std if foundation else None) or tuple(defaults["std"]),
        layout=naming if found.layout == "timm" else found.layout, model_args=model_args, embedding=recipe,
        foundation=foundation, mpp=foundation.mpp if foundation else None,
    )


def _classifier_outputs(state: dict[str, torch.Tensor], head_keys: set[str]) -> int:
    weights = [state[k] for k in sorted(head_keys) if k in state and k.endswith("weight") and state[k].ndim >= 2]
    return int(weights[-1].shape[0]) if weights else 0


def _choose_classes(origin: str, outputs: int, class_names: list[str] | None, folder_names: list[str] | None,
                    features_only: bool) -> tuple[int, list[str] | None]:
    if features_only:
        return 0, None
    names = class_names or folder_names
    if outputs == 0:
        if class_names:
            raise CheckpointError(f"{origin}: the weights have no classifier, so --classes cannot be used; "
                                  "import it with --features-only")
        log.info("%s: no classifier in the weights: imported as a features-only teacher", origin)
        return 0, None
    if names is None:
        raise CheckpointError(f"{origin}: the weights have a {outputs}-class classifier: name its classes in output "
                              "order with --classes a,b,... or drop it with --features-only")
    if len(names) != outputs:
        raise CheckpointError(f"{origin}: {len(names)} class names given ({', '.join(names)}) but the classifier has "
                              f"{outputs} outputs; give {outputs} names in output order or use --features-only")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{origin}: class names repeat ({', '.join(names)}); each class needs its own name")
    return outputs, list(names)

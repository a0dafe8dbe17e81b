"""Weights trained elsewhere, read safely and fitted to a timm architecture.

Reads a timm state dict (``.safetensors``, or a torch file ``.pth``/``.pt``/``.bin``, bare or
wrapped in ``state_dict``/``model``, with ``module.`` prefixes; hub folders are
:mod:`moma.models.hub_import`'s), and renames two foreign layouts to timm's: torchvision EfficientNet
(``features.*``) and EfficientNet-PyTorch (``_conv_stem``/``_blocks.N``), the latter being what
the official MoMA code trains. torchvision ResNets already use timm's names.

Torch files are opened with ``torch.load(weights_only=True)``: a pickle that needs anything but
tensors and plain containers is refused, never executed. The format is told from the file's
first bytes, not its suffix.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import timm
import torch
from torch import nn

from moma.errors import CheckpointError, ConfigError
from moma.models.vit_layouts import timm_kwargs

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network", "state_dict_ema")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


# ---------------------------------------------------------------- reading files


def weights_file_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'pickle' from the first bytes; raises for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    if len(head) >= 9:
        size = int.from_bytes(head[:8], "little")
        if 0 < size < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    raise CheckpointError(
        f"{path}: unknown weights format (not safetensors, not a torch.save file); give a .safetensors, "
        ".pth/.pt/.bin state dict or a Hugging Face hub folder (config.json + weights)"
    )


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a weights file, unwrapped and without DDP prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if weights_file_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        data = _torch_load_safely(path)
    return strip_prefixes(unwrap_state_dict(data, path))


def _torch_load_safely(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"'{needed.group(1)}'" if needed else "objects other than tensors and plain containers"
        raise CheckpointError(
            f"{path}: refused: the pickle needs {what}, and loading it could run code; re-save the weights "
            "with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read by torch.load ({type(exc).__name__}: {exc})") from None


def unwrap_state_dict(data, origin: Path) -> dict[str, torch.Tensor]:
    """Descend through wrapper dicts (``{"state_dict": ...}``, ``{"model": ...}``) to the tensors."""
    for _ in range(4):
        if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return dict(data)
        if not isinstance(data, dict):
            break
        inner = next((data[k] for k in WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
            if tensors:  # a state dict with a few non-tensor extras (e.g. an epoch counter)
                return tensors
            break
        data = inner
    found = ", ".join(map(str, list(data)[:5])) if isinstance(data, dict) else type(data).__name__
    raise CheckpointError(
        f"{origin}: no state dict found (top-level: {found}); expected tensors, or a dict holding them under "
        f"one of: {', '.join(WRAPPER_KEYS)}"
    )


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):  # DDP around a compiled model gives 'module._orig_mod.'
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# ---------------------------------------------------------------- foreign layouts


def rename_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Rename torchvision EfficientNet or EfficientNet-PyTorch keys to timm's; others pass as they are."""
    if "features.0.0.weight" in state and any(k.startswith("features.1.0.block.") for k in state):
        return _from_torchvision_efficientnet(state, model), "torchvision-efficientnet"
    stem = next((k for k in state if k.endswith("_conv_stem.weight")), None)
    if stem is not None:
        prefix = stem.removesuffix("_conv_stem.weight")  # the official MoMA wrapper may nest the network
        return _from_efficientnet_pytorch(state, model, prefix), "efficientnet-pytorch"
    return state, "timm"


def _timm_blocks(model: nn.Module) -> list[str]:
    """Names of timm EfficientNet blocks in order ('blocks.0.0', ...); empty for other families."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "conv_stem"):
        return []
    return [f"blocks.{s}.{b}" for s, stage in enumerate(blocks) for b in range(len(stage))]


def _matching_timm_blocks(model: nn.Module, layout: str, source_blocks: int) -> list[str]:
    """The timm EfficientNet block names that ``source_blocks`` blocks of a ``layout`` checkpoint map
    onto, one to one; a clear error where the model is no timm EfficientNet or another variant."""
    blocks = _timm_blocks(model)
    if not blocks:
        raise CheckpointError(f"the weights are a {layout} EfficientNet; choose a timm EfficientNet for --arch "
                              "(e.g. efficientnet_b0 for B0)")
    if source_blocks != len(blocks):
        raise CheckpointError(f"{layout} EfficientNet weights with {source_blocks} blocks, timm '{_arch(model)}' has "
                              f"{len(blocks)}; pick the matching variant (B0 has 16)")
    return blocks


# torchvision MBConv sub-module index -> timm name (expand ratio 1 blocks have no expansion conv)
_TV_DEPTHWISE_SEPARABLE = {"block.0.0": "conv_dw", "block.0.1": "bn1", "block.1.fc1": "se.conv_reduce",
                           "block.1.fc2": "se.conv_expand", "block.2.0": "conv_pw", "block.2.1": "bn2"}
_TV_INVERTED_RESIDUAL = {"block.0.0": "conv_pw", "block.0.1": "bn1", "block.1.0": "conv_dw", "block.1.1": "bn2",
                         "block.2.fc1": "se.conv_reduce", "block.2.fc2": "se.conv_expand", "block.3.0": "conv_pwl",
                         "block.3.1": "bn3"}


def _from_torchvision_efficientnet(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    stages = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.")})
    head_stage = stages[-1]
    tv_blocks = sorted({tuple(map(int, k.split(".")[1:3])) for k in state
                        if k.startswith("features.") and ".block." in k})
    blocks = _matching_timm_blocks(model, "torchvision", len(tv_blocks))
    block_name = dict(zip(tv_blocks, blocks))
    fixed = {"features.0.0": "conv_stem", "features.0.1": "bn1", f"features.{head_stage}.0": "conv_head",
             f"features.{head_stage}.1": "bn2", "classifier.1": "classifier"}
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in fixed:
            out[f"{fixed[module]}.{leaf}"] = value
            continue
        parts = module.split(".")
        if parts[0] == "features" and len(parts) > 3 and parts[3] == "block":
            stage, index = int(parts[1]), int(parts[2])
            has_expansion = f"features.{stage}.{index}.block.3.0.weight" in state
            table = _TV_INVERTED_RESIDUAL if has_expansion else _TV_DEPTHWISE_SEPARABLE
            sub = ".".join(parts[3:])
            if sub in table:
                out[f"{block_name[(stage, index)]}.{table[sub]}.{leaf}"] = value
                continue
        out[key] = value  # left as it is: the fit check names it
    return out


# EfficientNet-PyTorch block member -> timm name, without and with an expansion conv
_EP_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                           "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EP_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                         "_bn2": "bn3"}
_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
           "classifier_.1": "classifier"}  # classifier_.1: the official MoMA code's head (Dropout, Linear)


def _from_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    indices = sorted({int(k[len(prefix):].split(".")[1]) for k in state if k[len(prefix):].startswith("_blocks.")})
    blocks = _matching_timm_blocks(model, "EfficientNet-PyTorch", len(indices))
    out = {}
    for key, value in state.items():
        module, _, leaf = key.removeprefix(prefix).rpartition(".")
        if module in _EP_TOP:
            out[f"{_EP_TOP[module]}.{leaf}"] = value
        elif module.startswith("_blocks."):
            _, index, member = module.split(".", 2)
            expands = f"{prefix}_blocks.{index}._expand_conv.weight" in state
            table = _EP_INVERTED_RESIDUAL if expands else _EP_DEPTHWISE_SEPARABLE
            out[f"{blocks[int(index)]}.{table.get(member, member)}.{leaf}"] = value
        else:
            out[key] = value
    return out


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


# ---------------------------------------------------------------- fitting


def check_arch(arch: str) -> None:
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"--arch '{arch}' is not a timm model{hint}")


def create(arch: str, num_classes: int, model_args: dict | None = None, meta: bool = True) -> nn.Module:
    """A timm model with the (JSON) arguments an import recorded; by default on the meta device: its
    structure without memory or initialisation, which for a ViT-g would take gigabytes and seconds."""
    try:
        with torch.device("meta" if meta else "cpu"):
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs(model_args))
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(f"timm '{arch}' cannot be built with {model_args}: {exc}") from None


def classifier_keys(arch: str, model_args: dict | None = None) -> set[str]:
    """State-dict keys of ``arch``'s classifier: those a 1-class model has and a headless one lacks."""
    shallow = {**model_args, "depth": 1} if model_args and "depth" in model_args else model_args  # same head, less work
    with_head = create(arch, 1, shallow).state_dict()
    headless = create(arch, 0, shallow).state_dict()
    return set(with_head) - set(headless)


def _few(keys: list[str], shapes: dict | None = None) -> str:
    shown = [f"{k} {shapes[k]}" if shapes else k for k in keys[:3]]
    return ", ".join(shown) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def fit_errors(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """A one-line description of what does not fit (missing, unexpected, mis-shaped keys), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        return None
    shapes = {k: f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched}
    parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
             f"{len(mismatched)} mis-shaped ({_few(mismatched, shapes)}; file vs model)" if mismatched else ""]
    return "; ".join(p for p in parts if p)


def fit_to_arch(state: dict[str, torch.Tensor], arch: str, num_classes: int, origin: str,
                model_args: dict | None = None) -> nn.Module:
    """A timm model with exactly ``state`` loaded; a one-line error naming the first bad keys otherwise."""
    model = create(arch, num_classes, model_args)
    problem = fit_errors(model, state)
    if problem:
        raise CheckpointError(f"{origin}: the weights do not fit timm '{arch}': {problem}; check --arch "
                              "(the architecture and variant the weights were trained with)")
    model.load_state_dict(state, strict=True, assign=True)  # the weights become the parameters: no copy
    return model.eval()

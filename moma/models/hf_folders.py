"""Hugging Face ``transformers`` ViT folders read as timm vision transformers, without ``transformers``.

Phikon is a ``ViTModel`` folder and Phikon-v2 a ``Dinov2Model`` folder (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``, ``preprocessor_config.json``). Their weights are
renamed to timm's ``VisionTransformer`` keys (query/key/value concatenated into ``qkv``, DINOv2's
LayerScale ``lambda1`` to ``gamma``, its SwiGLU ``weights_in``/``weights_out`` to a packed SwiGLU
MLP) and the config's sizes become timm arguments, LayerNorm's epsilon included. The card's
embedding, ``last_hidden_state[:, 0]``, is timm's class token after the final norm. The pooler and
DINOv2's mask token take no part in that embedding and are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from moma.errors import CheckpointError
from moma.models.vit_layouts import IMAGENET, vit_geometry

log = logging.getLogger(__name__)

HF_TYPES = {"vit": "hf-vit", "dinov2": "hf-dinov2", "dinov2_with_registers": "hf-dinov2"}
PREFIXES = ("vit.", "dinov2.")  # the backbone inside a *ForImageClassification checkpoint
DROPPED = ("pooler.", "embeddings.mask_token", "classifier.")
WIDTH_NAMES = {384: "small", 768: "base", 1024: "large", 1280: "huge"}
TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
       "embeddings.register_tokens": "reg_token", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
       "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias", "layernorm.weight": "norm.weight",
       "layernorm.bias": "norm.bias"}
LAYER = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
         "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "norm1": "norm1", "norm2": "norm2",
         "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma", "mlp.fc1": "mlp.fc1",
         "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2"}
ACTIVATIONS = {"gelu": None, "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


@dataclass
class HfVit:
    arch: str
    model_args: dict  # JSON timm arguments (moma.models.vit_layouts.timm_kwargs)
    state: dict[str, torch.Tensor]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str


def hf_layout(raw: dict) -> str | None:
    """'hf-vit'/'hf-dinov2' for a transformers config.json of a ViT family, else None."""
    return HF_TYPES.get(str(raw.get("model_type", "")))


def convert(folder: Path, raw: dict, state: dict[str, torch.Tensor]) -> HfVit:
    """The timm form of a transformers ViT/DINOv2 folder's weights, arguments and preprocessing."""
    layout = hf_layout(raw)
    timm_state = _rename(state, folder)
    if "embeddings.register_tokens" in state:
        _fold_class_position(timm_state)
    args = {**vit_geometry(timm_state), **_config_args(raw, timm_state, folder)}
    size, mean, std = _preprocessing(folder, int(raw.get("image_size", args["img_size"])))
    if layout == "hf-dinov2" and size != args["img_size"] and size % args["patch_size"] == 0:
        _resample_positions(timm_state, size // args["patch_size"], antialias=args["no_embed_class"])
        args["img_size"] = size
    return HfVit(_arch_name(args), args, timm_state, size, mean, std, layout or "hf-vit")


def _rename(state: dict[str, torch.Tensor], origin: Path) -> dict[str, torch.Tensor]:
    out, qkv, unknown = {}, {}, []
    for key, value in state.items():
        key = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        if key.startswith(DROPPED):
            continue
        if key in TOP:
            out[TOP[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
        if match is None:
            unknown.append(key)
            continue
        index, module, leaf = match.groups()
        if part := re.fullmatch(r"attention\.attention\.(query|key|value)", module):
            qkv.setdefault((index, leaf), {})[part.group(1)] = value
        elif f"{module}.{leaf}" in LAYER:  # lambda1 names its module and tensor at once
            out[f"blocks.{index}.{LAYER[f'{module}.{leaf}']}"] = value
        elif module in LAYER:
            out[f"blocks.{index}.{LAYER[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{origin}: {len(unknown)} weights of no known ViT/DINOv2 layer "
                              f"({', '.join(unknown[:3])}); only ViTModel and Dinov2Model folders are read")
    for (index, leaf), parts in qkv.items():
        out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _fold_class_position(state: dict[str, torch.Tensor]) -> None:
    """DINOv2 with registers adds the class token's position before inserting the registers; timm's
    no_embed_class form keeps positions for patches only (as timm's own DINOv2 conversion does)."""
    state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    state["pos_embed"] = state["pos_embed"][:, 1:]


def _resample_positions(state: dict[str, torch.Tensor], grid: int, antialias: bool) -> None:
    """DINOv2 resizes its position grid to every input; done once here for the tile size, the way
    transformers does it (bicubic; antialiased for DINOv2 with registers only), the tiles then need
    no resizing at all, and timm's own (antialiased) resize is left for other tile sizes."""
    pos = state["pos_embed"]
    prefix = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2  # the class token's position, unless folded
    patches = pos[:, prefix:]
    side = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    state["pos_embed"] = torch.cat([pos[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], 1)


def _config_args(raw: dict, state: dict[str, torch.Tensor], origin: Path) -> dict:
    args = {"num_heads": int(raw["num_attention_heads"]), "norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
            "qkv_bias": bool(raw.get("qkv_bias", True)), "dynamic_img_size": True,
            "no_embed_class": "reg_token" in state}
    if raw.get("use_swiglu_ffn"):
        return args  # the packed SwiGLU and its SiLU come from the weights' shapes
    act = str(raw.get("hidden_act", "gelu"))
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{origin}: hidden_act '{act}' has no timm counterpart here "
                              f"(known: {', '.join(ACTIVATIONS)})")
    return {**args, **({"act_layer": ACTIVATIONS[act]} if ACTIVATIONS[act] else {})}


def _preprocessing(folder: Path, image_size: int) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Tile size and normalisation from preprocessor_config.json (ImageNet's when it does not say)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        log.info("%s: no preprocessor_config.json: ImageNet normalisation, %d px", folder, image_size)
        return image_size, *IMAGENET
    try:
        pre = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    crop = pre.get("crop_size") if pre.get("do_center_crop", "crop_size" in pre) else None
    size = crop or pre.get("size") or {}
    size = size.get("height", size.get("shortest_edge", image_size)) if isinstance(size, dict) else size
    return int(size), tuple(pre.get("image_mean", IMAGENET[0])), tuple(pre.get("image_std", IMAGENET[1]))


def _arch_name(args: dict) -> str:
    """A timm name of the same family, for the record: every size is passed explicitly anyway."""
    name = f"vit_{WIDTH_NAMES.get(args['embed_dim'], 'base')}_patch{args['patch_size']}_224"
    return name if timm.is_model(name) else "vit_base_patch16_224"

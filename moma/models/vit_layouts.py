"""Vision transformers published as pathology foundation models: their timm arguments and embeddings.

A hub folder's ``config.json`` names a timm architecture but rarely all the arguments the weights
were trained with: the model cards pass the rest to ``timm.create_model`` by hand (UNI2-h:
``depth=24, num_heads=24, embed_dim=1536, mlp_layer=SwiGLUPacked, act_layer=SiLU, reg_tokens=8``;
Virchow2: ``mlp_layer=SwiGLUPacked, act_layer=SiLU``). Here the arguments come from, in order:
the weights' own shapes (width, depth, patch, register tokens, LayerScale, packed SwiGLU MLP), the
recognised model card (:data:`LAYOUTS`), and ``config.json`` (its ``model_args``, or the top-level
keys of the older export form). They are recorded, as JSON, in the imported teacher's metadata and
rebuilt by :func:`timm_kwargs` whenever the teacher is loaded.

The embedding is the card's recipe: the class token (UNI, UNI2-h, H-optimus-0, Phikon, kaiko), the
mean of the patch tokens, or both concatenated (Virchow2: class token and the mean of the patch
tokens, register tokens excluded). It is set on the model itself, so ``forward_head(pre_logits=True)``
and every feature tap give the card's embedding.
"""

from __future__ import annotations

import logging
import math
import re
import types
from dataclasses import dataclass, field
from functools import partial

import timm
import torch
from timm.layers import LayerNorm, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moma.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

EMBEDDINGS = ("class", "mean-patch", "class+mean-patch")
POOL_EMBEDDING = {"token": "class", "avg": "mean-patch"}  # timm global_pool -> recipe
MLP_LAYERS = {"SwiGLUPacked": SwiGLUPacked}
# VisionTransformer arguments a config.json may state and a checkpoint records; the others
# (num_classes, in_chans, dropout) are set by moma or do not change the network's outputs.
VIT_ARGS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm",
            "init_values", "class_token", "no_embed_class", "reg_tokens", "pre_norm", "fc_norm", "dynamic_img_size",
            "dynamic_img_pad", "proj_bias", "final_norm", "mlp_layer", "act_layer", "norm_eps", "global_pool"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Layout:
    """A published foundation model: how to tell its hub folder and what its card adds to config.json."""

    name: str
    source: str  # where the weights are published
    embedding: str
    card_args: dict = field(default_factory=dict)  # create_model arguments the card passes by hand
    head_width: int | None = None  # channels per attention head, when config.json does not give num_heads
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mpp: float | None = None  # microns per pixel the card asks for
    arch: str = ""  # the timm architecture the card builds


def _tag(raw: dict) -> str:
    return str(raw.get("pretrained_cfg", {}).get("tag", ""))


def _mean(raw: dict) -> tuple[float, ...]:
    return tuple(raw.get("pretrained_cfg", {}).get("mean", ()))


LAYOUTS = {layout.name: layout for layout in (
    Layout("uni", "MahmoodLab/UNI", "class", {"init_values": 1e-5, "dynamic_img_size": True}, 64,
           *IMAGENET, arch="vit_large_patch16_224"),
    Layout("uni2-h", "MahmoodLab/UNI2-h", "class",
           {"mlp_layer": "SwiGLUPacked", "act_layer": "silu", "no_embed_class": True, "dynamic_img_size": True,
            "init_values": 1e-5}, 64, *IMAGENET, arch="vit_giant_patch14_224"),
    Layout("virchow2", "paige-ai/Virchow2", "class+mean-patch",
           {"mlp_layer": "SwiGLUPacked", "act_layer": "silu", "dynamic_img_size": True}, 80, *IMAGENET,
           arch="vit_huge_patch14_224"),
    Layout("h-optimus-0", "bioptimus/H-optimus-0", "class", {"init_values": 1e-5, "dynamic_img_size": False}, 64,
           (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 0.5, arch="vit_giant_patch14_reg4_dinov2"),
)}


def recognise(arch: str, raw: dict, geometry: dict) -> Layout | None:
    """The published model a timm hub folder holds, from its config.json and the weights' shapes."""
    if _tag(raw) == "uni_mass100k":
        return LAYOUTS["uni"]
    if _tag(raw) == "virchow_v2":
        return LAYOUTS["virchow2"]
    # UNI2-h's card builds timm's ViT-g/14 name with 8 register tokens and a packed SwiGLU MLP, which
    # timm's own vit_giant_patch14_224 has neither of.
    if arch == "vit_giant_patch14_224" and geometry.get("reg_tokens") and geometry.get("mlp_layer"):
        return LAYOUTS["uni2-h"]
    if arch == "vit_giant_patch14_reg4_dinov2" and _mean(raw) and _close(_mean(raw), LAYOUTS["h-optimus-0"].mean):
        return LAYOUTS["h-optimus-0"]
    return None


def _close(a: tuple[float, ...], b: tuple[float, ...] | None) -> bool:
    return b is not None and len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


# ---------------------------------------------------------------- arguments from the weights


def is_vit_state(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and "blocks.0.attn.qkv.weight" in state


def vit_geometry(state: dict[str, torch.Tensor]) -> dict:
    """The VisionTransformer arguments a timm ViT state dict determines by its keys and shapes."""
    proj = state["patch_embed.proj.weight"]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out = {"embed_dim": width, "depth": depth, "patch_size": patch, "class_token": "cls_token" in state,
           "reg_tokens": int(state["reg_token"].shape[1]) if "reg_token" in state else 0,
           "qkv_bias": "blocks.0.attn.qkv.bias" in state, "fc_norm": "fc_norm.weight" in state}
    if "blocks.0.ls1.gamma" in state:
        out["init_values"] = 1e-5  # LayerScale: the value is overwritten by the weights
    out.update(_mlp_geometry(state, width))
    if "pos_embed" in state:
        out.update(_grid_geometry(int(state["pos_embed"].shape[1]), out["class_token"] + out["reg_tokens"], patch))
    return out


def _mlp_geometry(state: dict[str, torch.Tensor], width: int) -> dict:
    hidden, inner = int(state["blocks.0.mlp.fc1.weight"].shape[0]), int(state["blocks.0.mlp.fc2.weight"].shape[1])
    ratio = (hidden + 0.5) / width  # timm takes int(width * mlp_ratio) hidden channels
    if inner * 2 == hidden:  # a packed GLU halves fc1's output before fc2; every card here gates it with SiLU
        return {"mlp_ratio": ratio, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"}
    return {"mlp_ratio": ratio}


def _grid_geometry(positions: int, prefix: int, patch: int) -> dict:
    for no_embed_class, grid in ((False, positions - prefix), (True, positions)):
        side = math.isqrt(grid)
        if side * side == grid and (prefix or not no_embed_class):
            return {"no_embed_class": no_embed_class, "img_size": side * patch}
    raise CheckpointError(f"pos_embed has {positions} positions: neither a square grid nor one after "
                          f"{prefix} class/register tokens")


# ---------------------------------------------------------------- the arguments to build with


def config_args(raw: dict, origin: str) -> dict:
    """ViT arguments a timm config.json states: ``model_args``, or top-level keys of the older form."""
    # the older form (UNI's) keeps them beside 'architecture'; model_args win where both exist
    stated = {**{k: v for k, v in raw.items() if k in VIT_ARGS}, **(raw.get("model_args") or {})}
    if stated.get("in_chans", 3) != 3:
        raise CheckpointError(f"{origin}: the model takes {stated['in_chans']} input channels; tiles are RGB (3)")
    return {k: v for k, v in stated.items() if k in VIT_ARGS}


def stated_pool(raw: dict) -> str | None:
    """config.json's global_pool (None when it does not say)."""
    return (raw.get("model_args") or {}).get("global_pool", raw.get("global_pool"))


def vit_args(arch: str, state: dict[str, torch.Tensor], stated: dict, layout: Layout | None, origin: str) -> dict:
    """The JSON arguments that rebuild ``arch`` for ``state``: weights, then card, then config.json."""
    args = {**vit_geometry(state), **(layout.card_args if layout else {}), **stated}
    if "num_heads" not in args:
        args["num_heads"] = _num_heads(arch, args["embed_dim"], layout, origin)
    return {k: v for k, v in args.items() if k in VIT_ARGS}


def _num_heads(arch: str, width: int, layout: Layout | None, origin: str) -> int:
    """Heads are the one size the weights do not show; ViT families keep the head width as they scale."""
    with torch.device("meta"):  # sizes only
        default = timm.create_model(arch, pretrained=False, num_classes=0, depth=1)
    heads = int(default.blocks[0].attn.num_heads)
    head_width = layout.head_width if layout and layout.head_width else default.embed_dim // heads
    if layout is None and width == default.embed_dim:
        return heads
    if width % head_width:
        raise CheckpointError(f"{origin}: embedding width {width} is no multiple of the {head_width}-channel heads of "
                              f"'{arch}'; give num_heads in config.json's model_args")
    if width != default.embed_dim:
        log.info("%s: %d-wide weights for '%s' (%d wide): %d heads of %d channels", origin, width, arch,
                 default.embed_dim, width // head_width, head_width)
    return width // head_width


def timm_kwargs(model_args: dict | None) -> dict:
    """``timm.create_model`` keyword arguments from the JSON form recorded in a checkpoint."""
    kwargs = dict(model_args or {})
    if "mlp_layer" in kwargs:
        if kwargs["mlp_layer"] not in MLP_LAYERS:
            raise CheckpointError(f"unknown mlp_layer '{kwargs['mlp_layer']}' (known: {', '.join(MLP_LAYERS)})")
        kwargs["mlp_layer"] = MLP_LAYERS[kwargs["mlp_layer"]]
    if "norm_eps" in kwargs:  # Hugging Face ViTs keep LayerNorm's eps in their config (Phikon: 1e-12)
        kwargs["norm_layer"] = partial(LayerNorm, eps=float(kwargs.pop("norm_eps")))
    if kwargs.get("img_size") is not None and not isinstance(kwargs["img_size"], int):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    return kwargs


# ---------------------------------------------------------------- embedding recipes


def default_embedding(model: nn.Module, layout: Layout | None, stated_pool: str | None, origin: str) -> str | None:
    """The recipe: the card's, else what config.json's global_pool means; None for non-ViTs."""
    if not isinstance(model, VisionTransformer):
        return None
    if layout is not None:
        return layout.embedding
    pool = model.global_pool if stated_pool is None else stated_pool
    if pool == "":
        raise ConfigError(f"{origin}: config.json's global_pool '' leaves the embedding to the model card; "
                          f"give it with --embedding ({', '.join(EMBEDDINGS)})")
    return POOL_EMBEDDING.get(pool)  # None: the model's own pooling (attention, max) stays


def set_embedding(model: nn.Module, recipe: str | None) -> nn.Module:
    """Make ``model``'s pooled features the recipe's embedding (a no-op for None)."""
    if recipe is None:
        return model
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"embedding '{recipe}' is a recipe for vision transformers, not {type(model).__name__}")
    if recipe not in EMBEDDINGS:
        raise ConfigError(f"embedding '{recipe}': choose one of {', '.join(EMBEDDINGS)}")
    if recipe != "mean-patch" and not model.has_class_token:
        raise ConfigError(f"embedding '{recipe}' needs a class token, which this model has not")
    if model.attn_pool is not None:
        raise ConfigError(f"embedding '{recipe}': this model pools its tokens with attention "
                          f"(global_pool '{model.global_pool}'), which gives its embedding")
    if recipe == "class+mean-patch":
        # timm has no concatenating pool; this instance's pool is replaced, so forward_head and every
        # tap give the card's embedding
        model.pool = types.MethodType(_class_and_mean_patch, model)
        model.num_features = model.head_hidden_size = 2 * model.embed_dim
    else:
        model.global_pool = {"class": "token", "mean-patch": "avg"}[recipe]
    return model


def _class_and_mean_patch(self: VisionTransformer, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


def embedding_width(model_args: dict, recipe: str | None) -> int | None:
    width = model_args.get("embed_dim")
    return None if width is None else width * (2 if recipe == "class+mean-patch" else 1)


def imported_build(meta) -> dict:
    """``create_backbone`` arguments an imported teacher's metadata records (empty for other checkpoints)."""
    if meta.method != "imported":
        return {}
    return {"model_args": meta.config.get("model_args"), "embedding": meta.config.get("embedding")}

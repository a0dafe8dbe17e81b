"""``moma export``: the deployable student as an ONNX model, with its metadata inside.

The graph takes a float32 NCHW batch of RGB tiles, resized to the checkpoint's tile size, scaled
to [0, 1] and normalised with its mean/std (the same input ``moma predict`` builds), and returns
``logits`` and softmax ``probabilities``. A method's replacement head (SimKD) is part of the graph.
The checkpoint's metadata goes into the model's metadata properties: ``moma`` holds all of it as
JSON, and the keys a deployment tool needs (class names, normalisation, tile size, mpp, method,
stain normalisation) are also stored one by one.

Stain normalisation (Macenko's percentiles, eigenvectors and least squares) is not in the graph: it
runs before it, on the uint8 tile, as in training. ``stain_normalization`` holds the method and the
fitted reference parameters (empty when the model was trained without), which ``moma predict``
applies to an ``.onnx`` model just as to a checkpoint.

We use the TorchScript-based exporter (``dynamo=False``): it needs no extra package, works
offline and writes the same graph for the same weights.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moma.engine.checkpoint import ModelMetadata
from moma.engine.inference import load_classifier
from moma.utils.io import atomic_path
from moma.engine.onnx_runtime import INPUT_NAME, LOGITS_NAME, METADATA_KEY, PROBS_NAME, open_session
from moma.errors import CheckpointError, ConfigError

INPUT_DESCRIPTION = "float32 NCHW RGB tiles resized to image_size, scaled to [0,1], then (x - mean) / std"
STAIN_INPUT_NOTE = "; first stain-normalised as the metadata property stain_normalization says"


class WithProbabilities(nn.Module):
    """Logits and their softmax, so a deployment tool needs no post-processing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return logits, torch.softmax(logits, dim=1)


def metadata_properties(meta: ModelMetadata) -> dict[str, str]:
    """ONNX metadata properties (string -> string) describing the model and its expected input."""
    return {
        METADATA_KEY: json.dumps(meta.__dict__, default=str),
        "class_names": json.dumps(meta.class_names),
        "mean": json.dumps(meta.mean),
        "std": json.dumps(meta.std),
        "image_size": str(meta.image_size),
        "mpp": "" if meta.mpp is None else str(meta.mpp),
        "method": meta.method,
        "arch": meta.arch,
        "deploy_head": meta.head["method"] if meta.head else "",
        "stain_normalization": json.dumps(meta.stain_norm) if meta.stain_norm else "",
        "input": input_description(meta),
    }


def input_description(meta: ModelMetadata) -> str:
    return INPUT_DESCRIPTION + (STAIN_INPUT_NOTE if meta.stain_norm else "")


def _trace_to_onnx(model: nn.Module, image_size: int, opset: int, dynamic_batch: bool) -> bytes:
    dummy = torch.zeros(2 if dynamic_batch else 1, 3, image_size, image_size)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, LOGITS_NAME, PROBS_NAME)} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
        torch.onnx.export(model, (dummy,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[LOGITS_NAME, PROBS_NAME], dynamic_axes=axes, do_constant_folding=True)
    return buffer.getvalue()


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 17, dynamic_batch: bool = False,
                check_batch: int = 3) -> dict:
    """Write ``checkpoint``'s deployable model to ``out`` as ONNX; returns what was written and the
    largest probability difference between ONNX Runtime and PyTorch on a random batch."""
    import onnx

    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: give a file name ending in .onnx")
    if Path(checkpoint).suffix == ".onnx":
        raise ConfigError(f"{checkpoint} is already an ONNX model; give a .safetensors checkpoint or a run folder")
    model, meta = load_classifier(checkpoint, torch.device("cpu"))
    wrapped = WithProbabilities(model).eval()
    try:
        data = _trace_to_onnx(wrapped, meta.image_size, opset, dynamic_batch)
    except Exception as exc:  # unsupported opset or operator: the exporter's own message says which
        raise CheckpointError(f"{checkpoint}: ONNX export of {meta.arch} with opset {opset} failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]}); try another --opset") from None
    proto = onnx.load_from_string(data)
    proto.producer_name = "moma-distill"
    proto.doc_string = f"{meta.arch} tile classifier ({', '.join(meta.class_names)}); input: {input_description(meta)}"
    for key, value in metadata_properties(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    batch = check_batch if dynamic_batch else 1
    return {"arch": meta.arch, "classes": meta.num_classes, "opset": opset,
            "input_shape": ["batch" if dynamic_batch else 1, 3, meta.image_size, meta.image_size],
            "max_prob_diff": max_prob_difference(out, wrapped, meta.image_size, batch)}


def max_prob_difference(onnx_path: Path, model: nn.Module, image_size: int, batch: int, seed: int = 0) -> float:
    """Largest |probability(ONNX Runtime) - probability(PyTorch)| on a random normalised batch."""
    images = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, image_size, image_size),
                                                                          dtype=np.float32))
    session = open_session(onnx_path, torch.device("cpu"))
    onnx_probs = session.run([PROBS_NAME], {INPUT_NAME: images.numpy()})[0]
    with torch.no_grad():
        torch_probs = model(images)[1].numpy()
    return float(np.abs(onnx_probs - torch_probs).max())

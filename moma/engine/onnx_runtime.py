"""Running an exported ``.onnx`` student with ONNX Runtime, behind the same interface as a checkpoint.

:func:`load_onnx_classifier` returns a module whose ``forward`` gives logits as a torch tensor and
the :class:`~moma.engine.checkpoint.ModelMetadata` stored in the file, so ``moma predict`` and
``moma evaluate`` treat both the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moma.engine.checkpoint import ModelMetadata
from moma.errors import CheckpointError

INPUT_NAME, LOGITS_NAME, PROBS_NAME = "input", "logits", "probabilities"
METADATA_KEY = "moma"


def open_session(path: str | Path, device: torch.device):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model {path} not found")
    wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initialisers on stderr otherwise
    # One knob for both runtimes: torch's thread count (OMP_NUM_THREADS, torch.set_num_threads).
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for a bad file
        raise CheckpointError(f"ONNX model {path}: cannot be loaded by ONNX Runtime ({str(exc).splitlines()[0]})") from None


class OnnxClassifier(nn.Module):
    """Logits from an ONNX Runtime session; a model exported with a fixed batch is fed in chunks."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        batch = session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        step = self.fixed_batch or len(array)
        chunks = [self._run(array[i:i + step]) for i in range(0, len(array), step)] if len(array) else []
        return torch.from_numpy(np.concatenate(chunks)).to(images.device) if chunks else images.new_zeros(0)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        rows = len(chunk)
        if self.fixed_batch and rows < self.fixed_batch:  # pad the last chunk to the exported batch size
            chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - rows, *chunk.shape[1:]), chunk.dtype)])
        return self.session.run([LOGITS_NAME], {INPUT_NAME: chunk})[0][:rows]


def read_onnx_metadata(session, path: str | Path) -> ModelMetadata:
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise CheckpointError(f"ONNX model {path}: no moma metadata; export it with `moma export`")
    return ModelMetadata.from_dict(json.loads(props[METADATA_KEY]), str(path))


def load_onnx_classifier(path: str | Path, device: torch.device) -> tuple[OnnxClassifier, ModelMetadata]:
    session = open_session(path, device)
    return OnnxClassifier(session), read_onnx_metadata(session, path)

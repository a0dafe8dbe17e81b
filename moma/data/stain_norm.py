"""Stain normalisation: every tile's colours matched to one reference tile before augmentation.

Two methods, both fitted once on the reference tile:

* ``macenko`` (Macenko et al., "A method for normalizing histology slides for quantitative
  analysis", ISBI 2009): each tile's haematoxylin and eosin directions and concentrations are
  estimated in optical-density space, then the tile is rebuilt with the reference's stain matrix
  and 99th-percentile concentrations;
* ``reinhard`` (Reinhard et al., "Color transfer between images", 2001): each LAB channel of the
  tile is standardised and given the reference's mean and standard deviation.

The colour maths is torchstain's (MIT, needs only numpy; its numpy backend, so nothing here
depends on torch's version or threads) rather than our own copy: it is the maintained
implementation of both methods that pathology pipelines use. What we add is the record: the fitted
parameters (not the reference file's path) go into the checkpoint and the ONNX metadata, so a
deployed model applies the same normalisation without the reference tile; and a rule for tiles
the methods cannot handle: a tile with too little stained tissue for Macenko (glass, fat) or a
flat tile (zero spread in a LAB channel, for Reinhard) passes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from moma.data.tiles import load_rgb
from moma.errors import ConfigError, DataError

METHODS = ("macenko", "reinhard")
OPTION = "data.stain_normalize.reference"
# torchstain's defaults for Macenko, fixed here so a later default cannot change a trained model's input:
# transmitted light Io, optical-density threshold beta below which a pixel is glass, percentile alpha.
MACENKO_IO, MACENKO_BETA, MACENKO_ALPHA = 240, 0.15, 1
MIN_STAINED_FRACTION = 0.05  # Macenko's stain estimate needs this share of a tile's pixels stained
_PARAM_SHAPES = {"macenko": {"stain_matrix": (3, 2), "max_concentrations": (2,)},
                 "reinhard": {"means": (3,), "stds": (3,)}}


@dataclass(frozen=True)
class StainReference:
    """A fitted normalisation: the method and the reference's parameters (plain lists, JSON-ready)."""

    method: str
    params: dict[str, list] = field(default_factory=dict)
    reference: str = ""  # the reference tile's file name, for the record only

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reference": self.reference, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StainReference":
        """The record :meth:`to_dict` wrote; ValueError when it is not one."""
        method = data.get("method") if isinstance(data, dict) else None
        if method not in METHODS:
            raise ValueError(f"unknown stain normalisation {method!r} (known: {', '.join(METHODS)})")
        params = data.get("params") or {}
        for name, shape in _PARAM_SHAPES[method].items():
            if name not in params or np.shape(params[name]) != shape:
                raise ValueError(f"stain normalisation '{method}' lacks its parameter '{name}' of shape {shape}")
        return cls(method, {k: params[k] for k in _PARAM_SHAPES[method]}, str(data.get("reference", "")))


def fit_reference(method: str, path: str | Path) -> StainReference:
    """Fit ``method`` on the reference tile at ``path``; a bad file is a one-line ConfigError."""
    try:
        rgb = np.asarray(load_rgb(path), dtype=np.uint8)
    except DataError:  # its message suggests --skip-bad, which does not apply to the reference
        raise ConfigError(f"{OPTION}: {path} is not a readable image (PNG, JPEG or TIFF tile)") from None
    if method == "macenko":
        return StainReference(method, _fit_macenko(rgb, Path(path)), Path(path).name)
    if method == "reinhard":
        return StainReference(method, _fit_reinhard(rgb, Path(path)), Path(path).name)
    raise ConfigError(f"data.stain_normalize.method: unknown method {method!r} (known: {', '.join(METHODS)})")


def stained_fraction(rgb: np.ndarray) -> float:
    """Share of pixels Macenko counts as stained: optical density at least beta in every channel."""
    density = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / MACENKO_IO)
    return float(np.all(density >= MACENKO_BETA, axis=1).mean())


def _fit_macenko(rgb: np.ndarray, path: Path) -> dict[str, list]:
    share = stained_fraction(rgb)
    if share < MIN_STAINED_FRACTION:
        raise ConfigError(f"{OPTION}: {path} has too little stained tissue for Macenko ({share:.1%} of its pixels, "
                          f"at least {MIN_STAINED_FRACTION:.0%} needed); choose a tile full of tissue")
    normalizer = NumpyMacenkoNormalizer()
    with np.errstate(all="ignore"):
        normalizer.fit(rgb, Io=MACENKO_IO, alpha=MACENKO_ALPHA, beta=MACENKO_BETA)
    params = {"stain_matrix": normalizer.HERef.tolist(), "max_concentrations": normalizer.maxCRef.tolist()}
    if not np.isfinite(normalizer.HERef).all() or not np.isfinite(normalizer.maxCRef).all():
        raise ConfigError(f"{OPTION}: Macenko cannot estimate the stains of {path}; choose another tile")
    return params


def _fit_reinhard(rgb: np.ndarray, path: Path) -> dict[str, list]:
    normalizer = NumpyReinhardNormalizer()
    normalizer.fit(rgb)
    if (np.asarray(normalizer.target_stds) <= 0).any():
        raise ConfigError(f"{OPTION}: {path} is a single colour; Reinhard needs a tile with some variation")
    return {"means": np.asarray(normalizer.target_means, dtype=float).tolist(),
            "stds": np.asarray(normalizer.target_stds, dtype=float).tolist()}


class StainNormalizer(torch.nn.Module):
    """uint8 CHW tile -> the same tile in the reference's stain (uint8 CHW), a torchvision-v2-style step."""

    def __init__(self, reference: StainReference):
        super().__init__()
        self.reference = reference
        self.method = reference.method
        params = reference.params
        if self.method == "macenko":
            self.normalizer = NumpyMacenkoNormalizer()
            self.normalizer.HERef = np.asarray(params["stain_matrix"], dtype=np.float64)
            self.normalizer.maxCRef = np.asarray(params["max_concentrations"], dtype=np.float64)
        else:
            self.normalizer = NumpyReinhardNormalizer()
            self.normalizer.target_means = np.asarray(params["means"], dtype=np.float32)
            self.normalizer.target_stds = np.asarray(params["stds"], dtype=np.float32)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.permute(1, 2, 0).numpy()
        out = self.normalize_array(rgb)
        return image if out is rgb else torch.from_numpy(out).permute(2, 0, 1).contiguous()

    def normalize_array(self, rgb: np.ndarray) -> np.ndarray:
        """HWC uint8 -> HWC uint8; the input itself where the method cannot be applied."""
        rgb = np.ascontiguousarray(rgb)
        if not self._applicable(rgb):
            return rgb
        # a division by zero or a NaN (degenerate stain estimate) would turn into arbitrary uint8 values
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            try:
                if self.method == "macenko":
                    return self.normalizer.normalize(rgb, Io=MACENKO_IO, alpha=MACENKO_ALPHA, beta=MACENKO_BETA,
                                                     stains=False)[0]
                return self.normalizer.normalize(rgb)
            except (FloatingPointError, np.linalg.LinAlgError):
                return rgb

    def _applicable(self, rgb: np.ndarray) -> bool:
        if self.method == "macenko":
            return stained_fraction(rgb) >= MIN_STAINED_FRACTION
        return bool(np.ptp(rgb.reshape(-1, 3), axis=0).any())  # one colour: no spread to standardise

    def extra_repr(self) -> str:
        return f"method={self.method}, reference={self.reference.reference!r}"

"""Stain normalisation (data.stain_normalize): the two methods against hand computations, tiles they
cannot handle, the config's errors, and the transforms that apply it before augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import lab2rgb, rgb2lab

from moma.config import AugmentConfig, load_config
from moma.data.stain_norm import MACENKO_IO, StainNormalizer, StainReference, fit_reference
from moma.data.transforms import TwoViews, build_eval_transform, build_train_transform
from moma.errors import ConfigError

# Unit stain vectors (optical density per unit concentration) in R, G, B: the reference's and another lab's.
H_REF, E_REF = np.array([0.65, 0.70, 0.29]), np.array([0.30, 0.85, 0.43])
H_SRC, E_SRC = np.array([0.55, 0.80, 0.25]), np.array([0.20, 0.90, 0.40])
SIZE = 64


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def concentrations(seed: int, scale: float) -> np.ndarray:
    """(2, N) haematoxylin/eosin concentrations: 40 % pure H, 40 % pure E, 20 % both."""
    rng = np.random.default_rng(seed)
    n = SIZE * SIZE
    c = rng.uniform(0.5, 2.0, (2, n)) * scale
    kind = rng.permutation(np.repeat([0, 1, 2], [int(0.4 * n), int(0.4 * n), n - 2 * int(0.4 * n)]))
    c[1, kind == 0] = 0.0
    c[0, kind == 1] = 0.0
    return c


def beer_lambert(h: np.ndarray, e: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The RGB tile of stains ``h``, ``e`` at concentrations ``c``, as Macenko's model (and torchstain's
    optical density, -log((I + 1) / Io)) defines it, rounded to uint8."""
    od = np.stack([unit(h), unit(e)], axis=1) @ c
    pixels = MACENKO_IO * np.exp(-od) - 1
    return np.clip(np.round(pixels.T), 0, 255).astype(np.uint8).reshape(SIZE, SIZE, 3)


def save(path, rgb: np.ndarray):
    Image.fromarray(rgb).save(path)
    return path


def test_macenko_matches_the_hand_computation_on_a_two_stain_tile(tmp_path):
    c_ref, c_src = concentrations(0, 1.0), concentrations(1, 0.6)
    reference = fit_reference("macenko", save(tmp_path / "ref.png", beer_lambert(H_REF, E_REF, c_ref)))
    fitted = np.array(reference.params["stain_matrix"])
    np.testing.assert_allclose(fitted[:, 0], unit(H_REF), atol=0.01)  # haematoxylin first
    np.testing.assert_allclose(fitted[:, 1], unit(E_REF), atol=0.01)
    max_ref = np.percentile(c_ref, 99, axis=1)
    np.testing.assert_allclose(reference.params["max_concentrations"], max_ref, rtol=0.02)

    # by hand: the source's concentrations, rescaled to the reference's 99th percentiles, in the reference's stains
    rescaled = c_src * (max_ref / np.percentile(c_src, 99, axis=1))[:, None]
    expected = beer_lambert(H_REF, E_REF, rescaled).astype(int)
    out = StainNormalizer(reference).normalize_array(beer_lambert(H_SRC, E_SRC, c_src)).astype(int)
    before = np.abs(beer_lambert(H_SRC, E_SRC, c_src).astype(int) - expected).mean()
    assert np.abs(out - expected).mean() < 1.0 < before / 20  # uint8 rounding of the tiles is all that is left
    assert np.abs(out - expected).max() <= 3


def test_reinhard_matches_the_hand_computation_in_lab(tmp_path):
    rng = np.random.default_rng(0)
    ref_rgb = np.clip(rng.normal((190, 110, 170), 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    src_rgb = np.clip(rng.normal((150, 90, 200), 15, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    reference = fit_reference("reinhard", save(tmp_path / "ref.png", ref_rgb))

    # by hand, with scikit-image's CIELAB: each channel standardised, then given the reference's mean and std
    ref_lab, src_lab = rgb2lab(ref_rgb / 255.0), rgb2lab(src_rgb / 255.0)
    mean, std = ref_lab.reshape(-1, 3).mean(axis=0), ref_lab.reshape(-1, 3).std(axis=0)
    np.testing.assert_allclose(reference.params["means"], mean, atol=1e-3)
    np.testing.assert_allclose(reference.params["stds"], std, atol=1e-3)
    lab = (src_lab - src_lab.reshape(-1, 3).mean(axis=0)) / src_lab.reshape(-1, 3).std(axis=0) * std + mean
    expected = np.clip(lab2rgb(lab), 0, 1) * 255

    out = StainNormalizer(reference).normalize_array(src_rgb)
    assert np.abs(out - expected).max() <= 1.01  # torchstain truncates to uint8 where we keep floats
    assert np.abs(src_rgb - expected).mean() > 10


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_tiles_the_method_cannot_handle_pass_unchanged_and_the_record_round_trips(tmp_path, method):
    reference = fit_reference(method, save(tmp_path / "ref.png", beer_lambert(H_REF, E_REF, concentrations(0, 1.0))))
    normalizer = StainNormalizer(StainReference.from_dict(reference.to_dict()))
    assert normalizer.reference == reference and reference.reference == "ref.png"
    glass = np.full((SIZE, SIZE, 3), 236, dtype=np.uint8)
    assert normalizer.normalize_array(glass) is not None and (normalizer.normalize_array(glass) == glass).all()
    tile = torch.from_numpy(beer_lambert(H_SRC, E_SRC, concentrations(1, 0.6))).permute(2, 0, 1).contiguous()
    out = normalizer(tile)
    assert out.dtype == torch.uint8 and out.shape == tile.shape and not torch.equal(out, tile)
    with pytest.raises(ValueError, match="lacks its parameter"):
        StainReference.from_dict({"method": method, "params": {}})
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        StainReference.from_dict({"method": "vahadane"})


def test_bad_references_are_one_line_errors_naming_the_option(tmp_path):
    key = "data.stain_normalize.reference"
    with pytest.raises(ConfigError, match=f"'{key}': reference tile .*gone.png not found"):
        load_config(None, [f"{key}={tmp_path / 'gone.png'}"])
    with pytest.raises(ConfigError, match="'data.stain_normalize.method': Input should be 'macenko' or 'reinhard'"):
        load_config(None, ["data.stain_normalize.method=vahadane", f"{key}={__file__}"])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ConfigError, match=f"^{key}: .*notes.png is not a readable image"):
        fit_reference("macenko", tmp_path / "notes.png")
    glass = save(tmp_path / "glass.png", np.full((SIZE, SIZE, 3), 236, dtype=np.uint8))
    with pytest.raises(ConfigError, match=f"^{key}: .*too little stained tissue for Macenko"):
        fit_reference("macenko", glass)
    with pytest.raises(ConfigError, match=f"^{key}: .*single colour"):
        fit_reference("reinhard", glass)


def test_normalisation_comes_first_in_every_transform_and_both_views(tmp_path):
    reference = fit_reference("macenko", save(tmp_path / "ref.png", beer_lambert(H_REF, E_REF, concentrations(0, 1.0))))
    normalizer = StainNormalizer(reference)
    tile = torch.from_numpy(beer_lambert(H_SRC, E_SRC, concentrations(1, 0.6))).permute(2, 0, 1).contiguous()
    plain = AugmentConfig(hflip=False, vflip=False, rot90=False, randaugment=False)
    expected = build_eval_transform(plain)(normalizer(tile))
    assert torch.equal(build_eval_transform(plain, normalizer)(tile), expected)
    assert torch.equal(build_train_transform(plain, normalizer)(tile), expected)
    strong, weak = TwoViews(plain, normalizer)(tile)
    assert torch.equal(weak, expected) and torch.equal(strong, expected)  # the teacher's weak view too
    assert not torch.equal(build_eval_transform(plain)(tile), expected)

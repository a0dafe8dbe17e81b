"""data.augment_on=device: uint8 views from the loader, stain jitter and normalisation per batch on the device."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from skimage.color import hed2rgb, rgb2hed

from moma.config import AugmentConfig, build_config, load_config
from moma.data.device_augment import DeviceAugment, DeviceViews, hed_jitter
from moma.data.transforms import TwoViews, build_student_transform
from moma.engine.runs import run_training
from moma.errors import ConfigError

from conftest import interrupt_run, write_teacher

AUG = AugmentConfig(randaugment=False, stain_jitter=0.1, strong_stain_jitter=0.05)


def tiles(n=4, size=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def seeded(transform, image, seed):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform.with_view(image)


def test_the_weak_view_on_the_device_is_the_loaders_normalised_view_of_the_same_tile_and_view():
    device_views, loader_views = DeviceViews(AUG, strong_augment=True), TwoViews(AUG)
    augment = DeviceAugment(AUG, two_views=True)
    for seed, tile in enumerate(tiles()):
        viewed, view = seeded(device_views, tile, seed)
        (_, loader_weak), loader_view = seeded(loader_views, tile, seed)
        assert view == loader_view and viewed.dtype == torch.uint8
        strong, weak = augment(viewed[None])
        assert torch.equal(weak[0], loader_weak)
        assert not torch.equal(strong, weak)
    assert device_views.teacher_view_is_pure
    assert not DeviceViews(AUG, strong_augment=False).teacher_view_is_pure  # the one view is jittered
    assert DeviceViews(AugmentConfig(randaugment=False), strong_augment=False).teacher_view_is_pure


def test_hed_jitter_matches_scikit_image_per_sample_and_draws_independent_factors():
    images = tiles(3).float() / 255
    alpha = torch.tensor([[1.1, 0.9, 1.0], [0.95, 1.05, 1.02], [1.0, 1.0, 1.0]])
    beta = torch.tensor([[0.02, -0.03, 0.0], [-0.01, 0.04, 0.01], [0.0, 0.0, 0.0]])
    got = hed_jitter(images, alpha, beta)
    for i in range(3):  # HEDJitter's arithmetic on one tile, in float64, without its uint8 rounding
        hed = rgb2hed(images[i].permute(1, 2, 0).double().numpy())
        span = np.maximum(hed.reshape(-1, 3).max(axis=0), 1e-3)
        want = np.clip(hed2rgb(hed * alpha[i].double().numpy() + beta[i].double().numpy() * span), 0, 1)
        assert np.abs(got[i].permute(1, 2, 0).numpy() - want).max() < 1e-4

    same = tiles(1).expand(6, -1, -1, -1).contiguous()  # one tile six times: each gets its own factors
    strong, weak = DeviceAugment(AUG, two_views=True)(same, torch.Generator().manual_seed(0))
    assert all(torch.equal(weak[0], w) for w in weak)
    assert len({tuple(s.flatten()[:8].tolist()) for s in strong}) == 6
    again, _ = DeviceAugment(AUG, two_views=True)(same, torch.Generator().manual_seed(0))
    assert torch.equal(strong, again)  # the generator decides everything

    off = AugmentConfig(randaugment=False)
    plain = DeviceAugment(off, two_views=False)(same)
    strong, weak = DeviceAugment(off, two_views=True)(same)
    assert torch.equal(plain, weak) and torch.equal(strong, weak)  # strength 0: the identity


def test_device_augmentation_with_randaugment_is_a_one_line_config_error():
    tree = {"data": {"augment_on": "device"}}
    with pytest.raises(ConfigError, match="set augment.randaugment=false or data.augment_on=loader") as info:
        build_config(tree)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="strong_color_jitter"):
        build_config({"data": {"augment_on": "device", "strong_augment": True},
                      "augment": {"randaugment": False, "strong_color_jitter": 0.2}})
    assert build_config({}).data.augment_on == "loader"


def test_the_setting_survives_a_round_trip(tmp_path):
    cfg = build_config({"data": {"augment_on": "device"}, "augment": {"randaugment": False}})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg and load_config(path).data.augment_on == "device"
    transform = build_student_transform(cfg.augment, False, None, cfg.data.augment_on)
    assert isinstance(transform, DeviceViews)


def test_a_run_augmenting_on_the_device_trains_and_resumes_bit_identically(tile_folder, make_config, tmp_path,
                                                                           monkeypatch):
    teacher = write_teacher(tmp_path / "teacher.safetensors", ["tumour", "stroma", "immune"])
    cfg = make_config(tile_folder, data={"augment_on": "device", "strong_augment": True, "train_per_class": 3,
                                         "unlabelled": ["rest"], "cache": "disk",
                                         "tile_store_dir": str(tmp_path / "stores")},
                      augment={"stain_jitter": 0.05, "strong_stain_jitter": 0.05},
                      distill={"method": "kd", "teacher": str(teacher), "student_init": "scratch"},
                      optim={"epochs": 2, "batch_size": 4})
    seen = []
    real_forward = DeviceAugment.forward

    def spy(self, images, generator=None):
        seen.append(images.dtype)
        return real_forward(self, images, generator)

    monkeypatch.setattr(DeviceAugment, "forward", spy)
    reference = run_training(cfg).run_dir
    assert seen and set(seen) == {torch.uint8}
    interrupt_run(cfg, monkeypatch)  # in the middle of the second epoch
    resumed = run_training(cfg, resume_dir=f"{cfg.run.output_dir}/t-2").run_dir
    a, b = load_file(f"{reference}/last.safetensors"), load_file(f"{resumed}/last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

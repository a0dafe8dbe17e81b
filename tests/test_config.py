import pytest

from moma.config import load_config, parse_override
from moma.errors import ConfigError


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.model.arch == "efficientnet_b0"
    assert cfg.optim.optimizer == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    # run_moma.sh: lr 0.05 for 64 images per GPU on 2 GPUs, i.e. a global batch of 128; linear scaling
    assert cfg.optim.effective_lr(128) == pytest.approx(0.05)
    assert cfg.optim.effective_lr(64) == pytest.approx(0.025)
    assert cfg.optim.min_lr == 5e-5 and cfg.optim.epochs == 50


def test_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 7\n  lr: 0.1\ndata:\n  image_size: 96\n")
    cfg = load_config(path, ["optim.lr=0.01", "augment.stain_jitter=0.05", "distill.params.beta=2"])
    assert cfg.optim.epochs == 7 and cfg.optim.lr == 0.01 and cfg.data.image_size == 96
    assert cfg.augment.stain_jitter == 0.05 and cfg.distill.params == {"beta": 2}


def test_override_values_are_typed():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("augment.rot90=false") == (["augment", "rot90"], False)
    assert parse_override("data.classes=[a, b]") == (["data", "classes"], ["a", "b"])


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("optim.lr=fast", "config key 'optim.lr'"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("data.val_fraction=0.85", "val_fraction + data.test_fraction"),
])
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  archh: resnet18\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.archh'"):
        load_config(path)


def test_broken_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_the_shared_kl_temperature_has_its_own_name():
    from moma.config import build_config

    assert build_config({"distill": {"kl_temperature": 2.0}}).distill.kl_temperature == 2.0
    with pytest.raises(ConfigError, match=r"'distill.temperature' is now distill.kl_temperature .*distill.params"):
        build_config({"distill": {"temperature": 2.0}})

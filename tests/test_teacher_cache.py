"""The teacher cache (``moma embed``, ``distill.teacher_cache``): a frozen teacher's outputs per tile
and flip/rotation view, computed once and read instead of the live teacher."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import make_tile_folder, tiny_config, write_teacher
from moma.config import AugmentConfig
from moma.data.dataset import decode_tile
from moma.data.transforms import normalize_transform
from moma.data.views import apply_view
from moma.errors import ConfigError, DataError
from moma.models.taps import FeatureTap

CLASSES = ["immune", "stroma", "tumour"]


@pytest.fixture
def tiles(tmp_path):
    return make_tile_folder(tmp_path / "tiles", per_class=6)


@pytest.fixture
def teacher(tmp_path):
    return write_teacher(tmp_path / "teacher.safetensors", CLASSES)


def _embed(teacher_path, sources, folder, **options):
    from moma.engine.teacher_cache_write import embed_sources

    return embed_sources(str(teacher_path), [str(s) for s in sources], out=str(folder), device="cpu", **options)


@pytest.fixture
def count_rows(monkeypatch):
    """Rows (tile-views) the cache writer runs through the teacher, one entry per forward pass."""
    import moma.engine.teacher_cache_write as cache_module

    rows: list[int] = []
    real = cache_module._forward_teacher

    def counted(tap, images):
        rows.append(len(images))
        return real(tap, images)

    monkeypatch.setattr(cache_module, "_forward_teacher", counted)
    return rows


@pytest.fixture
def no_live_teacher(monkeypatch):
    """Live teacher passes during training, counted."""
    from moma.distill.base import DistillMethod
    from moma.distill.moma import MoMA

    calls: list[str] = []
    for cls in (DistillMethod, MoMA):
        real = cls.teacher_forward

        def counted(self, teacher, images, real=real):
            calls.append(self.name)
            return real(self, teacher, images)

        monkeypatch.setattr(cls, "teacher_forward", counted)
    return calls


# ----------------------------------------------------------------------------- parity


def test_cached_outputs_equal_the_live_teacher_on_the_same_view(tmp_path, tiles, teacher):
    from moma.engine.builder import load_teacher
    from moma.engine.teacher_cache import TeacherCache

    _embed(teacher, [tiles], tmp_path / "cache", shard_tiles=7, batch_size=5)
    cache = TeacherCache(tmp_path / "cache")
    live = load_teacher(teacher)
    tap = FeatureTap(live.tap.model).eval()
    normalize = normalize_transform(AugmentConfig(mean=tuple(live.meta.mean), std=tuple(live.meta.std)))
    paths = sorted(str(p) for p in tiles.rglob("*.png"))
    rows = cache.rows(paths)
    for view in (0, 1, 4, 6, 7):  # identity, a quarter turn, both mirrors, a mirrored quarter turn
        images = torch.stack([normalize(apply_view(decode_tile(p, 32), view)) for p in paths])
        with torch.no_grad():
            expected = tap(images)
        cached = cache.outputs(rows, np.full(len(rows), view), torch.device("cpu"))
        assert cached.logits.dtype == torch.float32
        assert (cached.logits - expected.logits).abs().max() <= 1e-5
        assert (cached.embedding - expected.embedding).abs().max() <= 1e-5
    assert not torch.allclose(cache.outputs(rows[:1], np.array([0]), torch.device("cpu")).logits,
                              cache.outputs(rows[:1], np.array([1]), torch.device("cpu")).logits)  # views differ


def _trainer(tmp_path, tiles, teacher, name, method="kd", cache="off", **sections):
    from moma.engine.trainer import Trainer

    distill = {"method": method, "teacher": str(teacher), "teacher_cache": cache, **sections.pop("distill", {})}
    data = {"strong_augment": True, "num_workers": 0, **sections.pop("data", {})}
    cfg = tiny_config(tmp_path, tiles, distill=distill, data=data, optim={"epochs": 1}, **sections)
    run_dir = tmp_path / name
    run_dir.mkdir()
    return Trainer(cfg, run_dir)


def _first_step_terms(trainer) -> dict[str, float]:
    loader = trainer.loaders.train_loader(0)
    pool = iter(trainer.loaders.pool_loader(0, 1)) if trainer.data.unlabelled is not None else None
    batch = trainer.loaders.make_batch(next(iter(loader)), next(pool) if pool is not None else None)
    trainer.train_model.train()
    out = trainer.task(batch)
    trainer.close()
    return {"loss": float(out["loss"].detach()), **{k: float(v) for k, v in out["terms"].items()}}


@pytest.mark.parametrize("method,params", [("kd", {}), ("moma", {"keys": "teacher"})])
def test_a_run_reading_the_cache_has_the_live_teacher_s_first_step_loss(tmp_path, tiles, teacher, method, params,
                                                                        no_live_teacher):
    sections = {"distill": {"params": params}, "data": {"train_per_class": 2, "unlabelled": ["rest"]}}
    live = _first_step_terms(_trainer(tmp_path, tiles, teacher, "live", method, **sections))
    assert no_live_teacher
    no_live_teacher.clear()
    cached_trainer = _trainer(tmp_path, tiles, teacher, "cached", method, cache="auto", **sections)
    assert cached_trainer.loaders.teacher_cache is not None
    cached = _first_step_terms(cached_trainer)
    assert no_live_teacher == []
    assert cached.keys() == live.keys()
    for name in live:
        assert cached[name] == pytest.approx(live[name], abs=1e-5), name


def test_a_run_with_the_cache_trains_end_to_end(tmp_path, tiles, teacher, no_live_teacher):
    from moma.engine.runs import run_training

    cache = tmp_path / "cache"
    _embed(teacher, [tiles], cache, views="2")
    cfg = tiny_config(tmp_path, tiles, distill={"method": "kd", "teacher": str(teacher), "teacher_cache": str(cache)},
                      data={"strong_augment": True, "num_workers": 0}, optim={"epochs": 1})
    result = run_training(cfg)
    assert np.isfinite(result.history[-1]["train_loss"]) and no_live_teacher == []


def test_training_draws_each_tile_s_views_from_those_the_cache_holds(tmp_path, tiles, teacher):
    from moma.engine.teacher_cache import TeacherCache

    _embed(teacher, [tiles], tmp_path / "cache", views="2", view_seed=3)
    trainer = _trainer(tmp_path, tiles, teacher, "run", cache=str(tmp_path / "cache"))
    cache = TeacherCache(tmp_path / "cache")
    stored = cache.views[cache.rows(trainer.data.train.paths)]
    assert stored.shape[1] == 2 and len({tuple(r) for r in stored}) > 1  # a seeded subset per tile
    for seed in range(4):
        for row in range(len(trainer.data.train)):
            *_, view = trainer.data.train[(row, seed)]
            assert view in stored[row]


# ----------------------------------------------------------------------------- once per tile-view


def test_a_grid_computes_each_tile_view_once(tmp_path, tiles, teacher, count_rows, no_live_teacher):
    from moma.compare import run_compare
    from test_compare import tiny_compare, write_yaml

    tree = tiny_compare(tmp_path, tiles, {"checkpoint": str(teacher)}, folds=1, seeds=[0, 1],
                        methods=["kd", "pkt"], baseline="kd")
    tree["base"]["data"]["strong_augment"] = True
    tree["base"]["distill"] = {"teacher_cache": "auto"}
    out = run_compare(write_yaml(tmp_path / "grid.yaml", tree))
    results = (out / "results.csv").read_text()
    assert results.count("done") == 4, results
    assert sum(count_rows) == 18 * 8  # every tile of the source, in each of its 8 views, once
    assert no_live_teacher == []
    caches = [p.parent for p in (out / "teacher_cache").glob("*/index.json")]
    assert len(caches) == 1


def test_an_interrupted_embed_resumes_without_recomputing_finished_shards(tmp_path, tiles, teacher, count_rows,
                                                                         monkeypatch):
    import moma.engine.teacher_cache_write as cache_module

    real = cache_module.CacheWriter.compute_shard
    done: list[str] = []

    def fail_after_first(self, path, *args):
        if done:
            raise KeyboardInterrupt
        done.append(path.name)
        return real(self, path, *args)

    monkeypatch.setattr(cache_module.CacheWriter, "compute_shard", fail_after_first)
    with pytest.raises(KeyboardInterrupt):
        _embed(teacher, [tiles], tmp_path / "cache", shard_tiles=5)
    first_shard = sorted(p.name for p in (tmp_path / "cache").glob("shard-*.npy"))
    assert first_shard == ["shard-00000.npy"] and sum(count_rows) == 5 * 8
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no half-written shard left behind
    monkeypatch.setattr(cache_module.CacheWriter, "compute_shard", real)
    count_rows.clear()
    summary = _embed(teacher, [tiles], tmp_path / "cache", shard_tiles=5)
    assert summary["shards_kept"] == 1 and summary["shards_computed"] == 3
    assert sum(count_rows) == (18 - 5) * 8  # only the missing tiles


# ----------------------------------------------------------------------------- refusals


def test_a_cache_of_other_teacher_weights_or_image_size_is_refused(tmp_path, tiles, teacher):
    _embed(teacher, [tiles], tmp_path / "cache")
    other = write_teacher(tmp_path / "other.safetensors", CLASSES, seed=1)
    with pytest.raises(ConfigError, match="made with other teacher weights;") as refused:
        _trainer(tmp_path, tiles, other, "other-weights", cache=str(tmp_path / "cache"))
    assert str(tmp_path / "cache") in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"made with other image size 32 \(this run: 48\)"):
        _trainer(tmp_path, tiles, teacher, "other-size", cache=str(tmp_path / "cache"), data={"image_size": 48})
    with pytest.raises(ConfigError, match="teacher weights"):  # moma embed into the same folder, too
        _embed(other, [tiles], tmp_path / "cache")


def test_a_tile_changed_since_the_cache_was_made_is_refused(tmp_path, tiles, teacher):
    _embed(teacher, [tiles], tmp_path / "cache")
    for tile in tiles.rglob("*.png"):  # every tile rewritten (a new modification time), whichever split it is in
        os.utime(tile, ns=(tile.stat().st_atime_ns, tile.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match="changed since it was made"):
        _trainer(tmp_path, tiles, teacher, "run", cache=str(tmp_path / "cache"))


def test_methods_that_read_feature_maps_or_update_their_teacher_run_it_live(tmp_path, tiles, teacher, caplog):
    caplog.set_level("INFO")
    fitnet = _trainer(tmp_path, tiles, teacher, "fitnet", "fitnet", cache="auto")
    assert fitnet.loaders.teacher_cache is None and "intermediate feature maps" in caplog.text
    single_view = _trainer(tmp_path, tiles, teacher, "single", cache="auto", data={"strong_augment": False},
                           augment={"randaugment": True})
    assert single_view.loaders.teacher_cache is None and "augmented view" in caplog.text


def test_which_methods_can_read_the_cache(tmp_path, tiles, teacher):
    from moma.distill import all_methods
    from moma.engine.builder import build_task

    def method(name: str, params: dict):
        cfg = tiny_config(tmp_path, tiles, distill={"teacher": str(teacher), "method": name, "params": params})
        return build_task(cfg, CLASSES, 12, torch.device("cpu"))[0].method

    usable = {name for name, cls in all_methods().items() if cls.requires_teacher
              and method(name, {"keys": "teacher"} if name == "moma" else {}).uses_cached_teacher_outputs}
    assert usable == {"kd", "dkd", "crd", "cc", "pkt", "rkd", "pseudo", "moma"}
    assert not method("moma", {"keys": "momentum"}).uses_cached_teacher_outputs  # its teacher learns


# ----------------------------------------------------------------------------- the command


def test_moma_embed_writes_a_cache_and_reports_a_bad_input_in_one_line(tmp_path, tiles, teacher, capsys,
                                                                      restore_logging):
    from moma.cli import main

    out = tmp_path / "cache"
    assert main(["embed", str(teacher), str(tiles), "--out", str(out), "--device", "cpu", "--shard-tiles", "10"]) == 0
    printed = capsys.readouterr().out
    assert f"teacher cache {out}: 18 tiles x 8 views, 3 logits + " in printed
    assert {p.name for p in out.iterdir()} >= {"index.json", "tiles.csv", "views.npy", "shard-00000.npy",
                                               "shard-00001.npy"}
    assert main(["embed", str(teacher), str(tmp_path / "nowhere"), "--out", str(tmp_path / "c2")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("moma: error: data ") and "nowhere" in error and "not found" in error
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert main(["embed", str(teacher), str(tiles), "--views", "9", "--out", str(tmp_path / "c3")]) == 2
    assert "--views 9" in capsys.readouterr().err

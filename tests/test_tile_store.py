"""The tile store (data.cache=disk): byte-exact tiles, built once and reused, rebuilt when a file
changes, safe under concurrent builders and interruption, lazy for the unlabelled pool, and the
config values that choose it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moma.data.tile_store as store_module
from conftest import ROOT, make_tile_folder, write_tile
from moma.config import build_config, load_config
from moma.data.dataset import TileDataset, decode_tile
from moma.data.tile_store import ARRAY_NAME, SIDECAR_NAME, open_table_store, open_tile_store
from moma.data.tiles import scan_tiles
from moma.data.unlabelled import UnlabelledDataset, open_pool_stores, scan_pool
from moma.engine.builder import build_data
from moma.engine.distributed import DistInfo, PoolSampler
from moma.errors import DataError


@pytest.fixture
def table(tmp_path):
    return scan_tiles(make_tile_folder(tmp_path / "tiles", per_class=4, size=24, manifest=False))


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every path the store decodes."""
    seen: list[str] = []
    real = store_module.decode_tile
    monkeypatch.setattr(store_module, "decode_tile", lambda path, size: seen.append(path) or real(path, size))
    return seen


def test_store_tiles_equal_decoding_the_files(table, tmp_path):
    store = open_table_store(table, 20, tmp_path / "stores")
    dataset = TileDataset(table, 20, store=store)
    assert dataset.cached and dataset.images is None and len(dataset) == len(table)
    for row, path in enumerate(dataset.paths):
        assert torch.equal(dataset.raw_image(row), decode_tile(path, 20))
    rows = [5, 0, 3]
    assert torch.equal(store.read_rows(rows), torch.stack([decode_tile(dataset.paths[r], 20) for r in rows]))


def test_store_is_built_once_and_reused(table, tmp_path, decodes):
    first = open_table_store(table, 20, tmp_path / "stores")
    assert first.built and len(decodes) == len(table)
    again = open_table_store(table, 20, tmp_path / "stores")
    assert not again.built and len(decodes) == len(table)
    other_size = open_table_store(table, 16, tmp_path / "stores")  # another size: another store
    assert other_size.built and other_size.folder != first.folder


def test_a_changed_file_rebuilds_the_store_with_one_line(table, tmp_path, decodes, caplog):
    open_table_store(table, 20, tmp_path / "stores")
    changed = table.frame["path"].iloc[2]
    write_tile(Path(changed), (10, 200, 10), size=24, seed=99)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    with caplog.at_level("WARNING", logger="moma.data.tile_store"):
        store = open_table_store(table, 20, tmp_path / "stores")
    assert store.built and len(decodes) == 2 * len(table)
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and "1 tile(s) changed" in stale[0]
    row = int(store.rows_of([changed])[0])
    assert torch.equal(store.read(row), decode_tile(changed, 20))


def test_concurrent_builders_build_once_and_read_the_same_tiles(table, tmp_path, monkeypatch):
    real = store_module.decode_tile
    calls: list[str] = []

    def slow_decode(path, size):
        calls.append(path)
        time.sleep(0.01)
        return real(path, size)

    monkeypatch.setattr(store_module, "decode_tile", slow_decode)
    stores: list = []
    threads = [threading.Thread(target=lambda: stores.append(open_table_store(table, 20, tmp_path / "s")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stores) == 3 and sum(s.built for s in stores) == 1 and len(calls) == len(table)
    assert all(np.array_equal(s.array, stores[0].array) for s in stores)


BUILDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import moma.data.tile_store as store_module
    from moma.data.tiles import scan_tiles
    real = store_module.decode_tile
    store_module.decode_tile = lambda path, size: time.sleep(0.02) or real(path, size)
    table = scan_tiles(sys.argv[1])
    Path(sys.argv[3]).touch()
    while not Path(sys.argv[4]).exists():
        time.sleep(0.01)
    store = store_module.open_table_store(table, 20, sys.argv[2])
    print(int(store.built), int(store.array.sum()))
""")


def test_two_processes_building_at_once_build_once(table, tmp_path):
    go = tmp_path / "go"
    args = [str(table.source), str(tmp_path / "stores")]
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER_SCRIPT, *args, str(r), str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(built) for built, _ in outputs) == [0, 1]  # one built it, the other waited and read it
    assert outputs[0][1] == outputs[1][1]
    store = open_table_store(table, 20, tmp_path / "stores")
    assert not store.built and str(int(store.array.sum())) == outputs[0][1]


def test_an_interrupted_build_leaves_nothing_that_is_read(table, tmp_path, monkeypatch):
    real = store_module.decode_tile
    decodes: list[str] = []

    def dies_at_the_third(path, size):
        if len(decodes) == 3:
            raise KeyboardInterrupt
        decodes.append(path)
        return real(path, size)

    monkeypatch.setattr(store_module, "decode_tile", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        open_table_store(table, 20, tmp_path / "stores")
    folder = next((tmp_path / "stores").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no array, no sidecar, no temporary file
    monkeypatch.setattr(store_module, "decode_tile", real)
    store = open_table_store(table, 20, tmp_path / "stores")
    assert store.built
    assert torch.equal(store.read(7), decode_tile(table.frame["path"].iloc[7], 20))


def test_a_killed_build_s_leftovers_and_a_lone_array_are_not_read(table, tmp_path, decodes):
    store = open_table_store(table, 20, tmp_path / "stores")
    (store.folder / SIDECAR_NAME).unlink()  # as if killed between the array's rename and the sidecar's
    (store.folder / f".{ARRAY_NAME}.x1y2.tmp").write_bytes(b"half a store")  # as if killed mid-build
    again = open_table_store(table, 20, tmp_path / "stores")
    assert again.built and len(decodes) == 2 * len(table)
    assert not list(store.folder.glob("*.tmp"))


def test_unreadable_tiles_are_recorded_then_skipped_or_refused(table, tmp_path):
    broken = Path(table.frame["path"].iloc[1])
    broken.write_bytes(b"not a png")
    store = open_table_store(table, 20, tmp_path / "stores")
    assert list(store.bad) == [1] and str(broken) in store.bad[1]
    with pytest.raises(DataError, match="cannot read image"):
        TileDataset(table, 20, store=store)
    dataset = TileDataset(table, 20, store=store, skip_bad=True)
    assert len(dataset) == len(table) - 1 and dataset.skipped == [str(broken)]
    assert torch.equal(dataset.raw_image(1), decode_tile(dataset.paths[1], 20))


def _pool_folder(root: Path, count: int, size: int) -> Path:
    write_tile(root / "t00000.png", (120, 80, 160), size=size, seed=1)
    data = (root / "t00000.png").read_bytes()
    for i in range(1, count):
        (root / f"t{i:05d}.png").write_bytes(data)
    return root


def test_the_pool_reads_its_tiles_from_the_store_without_decoding(tmp_path, monkeypatch):
    import moma.data.unlabelled as pool_module

    folder = _pool_folder(tmp_path / "pool", 50, 24)
    pool = scan_pool([str(folder)], table=None, split=None, group_column="group")
    stores = open_pool_stores(pool.paths, pool.sources, None, 20, tmp_path / "stores")
    decoded: list[str] = []
    monkeypatch.setattr(pool_module, "decode_tile", lambda p, s: decoded.append(p))
    dataset = UnlabelledDataset(pool, 20, stores=stores)
    sampler = PoolSampler(len(dataset), seed=0, info=DistInfo())
    sampler.set_round(0, 8)
    images, rows, skipped = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)))
    assert images.shape == (8, 3, 20, 20) and decoded == [] and list(skipped) == [""] * 8
    monkeypatch.undo()
    assert torch.equal(images[0], decode_tile(pool.paths[int(rows[0])], 20))


POOL_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from moma.data.dataset import decode_tile
    from moma.data.unlabelled import UnlabelledDataset, open_pool_stores, scan_pool
    from moma.engine.distributed import DistInfo, PoolSampler

    def rise_mb(work):  # the peak resident memory during work() above the resident memory before it
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
        status = lambda key: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                                      if l.startswith(key)).split()[1])
        before = status("VmRSS:")
        out = work()
        return out, (status("VmHWM:") - before) / 1024

    torch.set_num_threads(1)
    pool = scan_pool([sys.argv[1]], None, None, "group")
    decode_tile(pool.paths[0], 96)  # imports and first-call allocations before the baseline
    stores, built_mb = rise_mb(lambda: open_pool_stores(pool.paths, pool.sources, None, 96, sys.argv[2]))
    dataset = UnlabelledDataset(pool, 96, stores=stores)
    sampler = PoolSampler(len(dataset), 0, DistInfo())
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler)
    sampler.set_round(0, 64)
    next(iter(loader))  # the loader's first-call allocations before the baseline
    sampler.set_round(1, 12 * 64)  # 768 tiles, 20 MiB of pixels
    _, read_mb = rise_mb(lambda: sum(len(batch[0]) for batch in loader))
    print(int(stores[0].built), built_mb, read_mb)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_building_and_reading_a_pool_store_keeps_peak_memory_flat(tmp_path):
    folder = _pool_folder(tmp_path / "pool", 4000, 96)
    out = subprocess.run([sys.executable, "-c", POOL_RSS_SCRIPT, str(folder), str(tmp_path / "stores")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    built, build_rise_mb, read_rise_mb = out.stdout.split()
    all_decoded_mb = 4000 * 3 * 96 * 96 / 2**20  # 105 MiB
    assert built == "1"
    assert float(build_rise_mb) < 20 < all_decoded_mb / 4, f"building raised peak RSS by {build_rise_mb} MiB"
    assert float(read_rise_mb) < 10, f"reading 12 batches raised peak RSS by {read_rise_mb} MiB"


def test_a_rest_pool_reads_the_labelled_store_and_runs_share_it(tmp_path, make_config):
    source = make_tile_folder(tmp_path / "tiles", per_class=16, size=32, patients_per_class=8)
    stores = tmp_path / "stores"
    cfg = make_config(source, data={"cache": "disk", "tile_store_dir": str(stores), "train_per_class": 1,
                                    "unlabelled": ["rest"]})
    first = build_data(cfg)
    assert first.train.store is not None and first.train.store.built
    assert first.unlabelled.stores == [first.train.store] and (first.unlabelled.store_of == 0).all()
    other_fold = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_folds": 3, "fold": 1})})
    second = build_data(other_fold)
    assert not second.train.store.built and second.train.store.folder == first.train.store.folder
    assert len(list(stores.iterdir())) == 1


@pytest.mark.parametrize("given, stored", [("disk", "disk"), ("memory", "memory"), ("off", "off"), ("auto", "auto"),
                                           (True, "memory"), (False, "off"), ("Disk", "disk")])
def test_data_cache_values_round_trip_and_old_booleans_still_load(tmp_path, given, stored):
    cfg = build_config({"data": {"cache": given}})
    assert cfg.data.cache == stored
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved).data.cache == stored


def test_an_unknown_cache_value_is_refused_naming_the_key():
    from moma.errors import ConfigError

    with pytest.raises(ConfigError, match="data.cache"):
        build_config({"data": {"cache": "ssd"}})


def test_a_grid_cell_is_not_refused_for_reading_its_tiles_another_way():
    from moma.compare.plan import config_differences

    stored = {"data": {"cache": True, "tile_store_dir": None}}
    assert config_differences(stored, {"data": {"cache": "disk", "tile_store_dir": "/scratch/stores"}}) == []

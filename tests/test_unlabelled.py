"""The unlabelled pool: what each loss term sees, the leakage guard, lazy reading, bad tiles, the
sampler, resume, and the pool as an axis of `moma compare`."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moma.distill.task as task_module
from moma.data.unlabelled import REST, PoolTable, UnlabelledDataset, scan_pool
from moma.engine.builder import build_data
from moma.engine.distributed import DistInfo, PoolSampler
from moma.engine.runs import run_training
from moma.errors import ConfigError, DataError

from conftest import ROOT, interrupt_run, write_teacher, write_tile

TEACHER_CLASSES = ["immune", "stroma", "tumour"]


@pytest.fixture
def teacher(tmp_path) -> Path:
    return write_teacher(tmp_path / "teacher.safetensors", TEACHER_CLASSES)


def pool_config(make_config, source, teacher, method="kd", **data):
    return make_config(source, data={"train_per_class": 3, "unlabelled": [REST], **data},
                       distill={"method": method, "teacher": str(teacher), "student_init": "scratch"},
                       optim={"epochs": 1, "batch_size": 4})


def test_cross_entropy_sees_labelled_rows_only_and_the_distillation_terms_see_all(
        tile_folder, make_config, teacher, monkeypatch):
    seen = {"ce": [], "kl": [], "batch": []}
    real_ce, real_kl, real_forward = F.cross_entropy, task_module.kd_loss, task_module.DistillationTask.forward

    def ce(logits, target, **kw):
        seen["ce"].append((len(logits), int((target < 0).sum())))
        return real_ce(logits, target, **kw)

    def kl(student, teacher_logits, temperature):
        seen["kl"].append(len(student))
        return real_kl(student, teacher_logits, temperature)

    def forward(self, batch):
        seen["batch"].append((batch.num_labelled, len(batch.target), batch.teacher_input is not None))
        return real_forward(self, batch)

    monkeypatch.setattr(task_module.F, "cross_entropy", ce)
    monkeypatch.setattr(task_module, "kd_loss", kl)
    monkeypatch.setattr(task_module.DistillationTask, "forward", forward)
    cfg = pool_config(make_config, tile_folder, teacher, strong_augment=True)
    results = run_training(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"unlabelled_ratio": 2})}))
    n_train, n_pool = results.data["train"], results.data["unlabelled"]
    assert n_train == 18 and n_pool == 18  # 3 tiles x 2 whole patients per class labelled, the rest pooled
    steps = results.optimizer_steps
    assert len(seen["batch"]) == steps > 0
    for labelled, rows, two_views in seen["batch"]:
        assert rows == labelled + 2 * 4 and two_views  # B labelled (or the pass's remainder) + mu x B pool tiles
    assert [n for n, _ in seen["ce"]] == [labelled for labelled, _, _ in seen["batch"]]
    assert all(unlabelled == 0 for _, unlabelled in seen["ce"])
    assert seen["kl"] == [rows for _, rows, _ in seen["batch"]]


def test_cross_entropy_by_hand_on_the_labelled_part():
    from moma.distill.base import UNLABELLED, Batch
    from moma.distill.task import DistillationTask
    from moma.distill.registry import get_method

    class Fixed(torch.nn.Module):  # a "student" whose logits are the first 3 input channels' means
        def forward(self, x):
            from moma.models.taps import TapOutputs

            return TapOutputs(logits=x.mean((2, 3)), embedding=x.mean((2, 3)), features=[])

    method = get_method("none").__new__(get_method("none"))
    torch.nn.Module.__init__(method)
    method.loss_weights = {}
    task = DistillationTask(Fixed(), None, method, ce_weight=1.0, kl_weight=0.0)
    images = torch.randn(5, 3, 4, 4)
    target = torch.tensor([2, 0, UNLABELLED, UNLABELLED, UNLABELLED])
    out = task(Batch(images, target, torch.arange(5), num_labelled=2))
    logits = images.mean((2, 3))
    expected = -(torch.log_softmax(logits[0], 0)[2] + torch.log_softmax(logits[1], 0)[0]) / 2
    assert torch.isclose(out["terms"]["ce"], expected, atol=1e-6)


def _held_out_tile(cfg) -> tuple[str, str]:
    """(path, group) of one test tile of the run's split."""
    data = build_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"unlabelled": []})}))
    row = data.test.table.frame.iloc[0]
    return row["path"], row["group"]


def test_a_test_tile_in_the_pool_is_refused_by_path_and_by_content(tile_folder, make_config, teacher, tmp_path):
    cfg = pool_config(make_config, tile_folder, teacher)
    path, _ = _held_out_tile(cfg)
    manifest = tmp_path / "pool.csv"
    manifest.write_text(f"path\n{path}\n")
    with pytest.raises(DataError, match="also a validation/test tile"):
        build_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"unlabelled": [str(manifest)]})}))
    copy_dir = tmp_path / "copies"
    copy_dir.mkdir()
    shutil.copy(path, copy_dir / "renamed.png")
    with pytest.raises(DataError, match="same content as the validation/test tile"):
        build_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"unlabelled": [str(copy_dir)]})}))


def test_a_group_shared_with_test_is_refused_unless_allowed(tile_folder, make_config, teacher, tmp_path):
    cfg = pool_config(make_config, tile_folder, teacher)
    _, group = _held_out_tile(cfg)
    write_tile(tmp_path / "pool" / "a.png", (10, 200, 10), seed=99)
    (tmp_path / "pool" / "manifest.csv").write_text(f"path,group\na.png,{group}\n")
    data_cfg = cfg.data.model_copy(update={"unlabelled": [str(tmp_path / "pool")]})
    with pytest.raises(DataError, match=f"shares group\\(s\\) {group}"):
        build_data(cfg.model_copy(update={"data": data_cfg}))
    allowed = data_cfg.model_copy(update={"allow_group_overlap": True})
    assert len(build_data(cfg.model_copy(update={"data": allowed})).unlabelled) == 1


def test_rest_without_a_labelled_subset_says_what_to_set(tile_folder, make_config, teacher):
    cfg = pool_config(make_config, tile_folder, teacher)
    whole = cfg.data.model_copy(update={"train_per_class": None})
    with pytest.raises(DataError, match="set data.train_per_class"):
        build_data(cfg.model_copy(update={"data": whole}))


def test_the_pool_decodes_only_what_is_drawn(tmp_path, monkeypatch):
    import moma.data.unlabelled as pool_module

    folder = tmp_path / "pool"
    write_tile(folder / "t0000.png", (120, 80, 160), seed=1)
    for i in range(1, 500):
        shutil.copy(folder / "t0000.png", folder / f"t{i:04d}.png")
    decoded = []
    real = pool_module.decode_tile
    monkeypatch.setattr(pool_module, "decode_tile", lambda p, s: decoded.append(p) or real(p, s))
    pool = scan_pool([str(folder)], table=None, split=None, group_column="group")
    dataset = UnlabelledDataset(pool, 32)
    assert len(dataset) == 500 and decoded == []
    sampler = PoolSampler(len(dataset), seed=0, info=DistInfo())
    sampler.set_round(0, 8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    images, rows, skipped = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and len(decoded) == 8 and list(skipped) == [""] * 8


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, shutil, sys, torch
    from pathlib import Path
    from moma.data.dataset import decode_tile
    from moma.data.unlabelled import UnlabelledDataset, scan_pool
    from moma.engine.distributed import DistInfo, PoolSampler
    folder = Path(sys.argv[1])
    torch.set_num_threads(1)
    decode_tile(str(folder / "t00000.png"), 64)  # imports and first-call allocations before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dataset = UnlabelledDataset(scan_pool([str(folder)], None, None, "group"), 64)
    sampler = PoolSampler(len(dataset), 0, DistInfo())
    sampler.set_round(0, 3 * 64)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler):
        pass
    print(len(dataset), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def test_a_pool_of_10000_tiles_does_not_raise_peak_memory_beyond_a_batch(tmp_path):
    folder = tmp_path / "pool"
    write_tile(folder / "t00000.png", (120, 80, 160), size=64, seed=1)
    data = (folder / "t00000.png").read_bytes()
    for i in range(1, 10_000):
        (folder / f"t{i:05d}.png").write_bytes(data)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(folder)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    count, rise_mb = out.stdout.split()
    all_decoded_mb = 10_000 * 3 * 64 * 64 / 2**20  # 117 MiB if every tile were decoded up front
    assert int(count) == 10_000
    assert float(rise_mb) < 25 < all_decoded_mb / 4, f"peak RSS rose by {rise_mb} MiB"


def _pool_with_a_corrupt_tile(tmp_path) -> Path:
    folder = tmp_path / "own_tiles"
    for i in range(5):
        write_tile(folder / f"slide1_{i}.png", (200, 60, 90), seed=500 + i)
    (folder / "slide1_broken.png").write_bytes(b"not a png")
    return folder


def test_a_corrupt_pool_tile_is_skipped_and_counted_with_skip_bad(tile_folder, make_config, teacher, tmp_path):
    folder = _pool_with_a_corrupt_tile(tmp_path)
    cfg = pool_config(make_config, tile_folder, teacher, unlabelled=[str(folder)], skip_bad=True)
    results = run_training(cfg)  # 6 pool tiles, 12 drawn per step: every tile is drawn
    assert results.skipped_unlabelled_tiles >= 1
    assert results.data["unlabelled"] == 6


def test_a_corrupt_pool_tile_is_a_one_line_error_without_skip_bad(tile_folder, tmp_path, teacher):
    folder = _pool_with_a_corrupt_tile(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "moma", "distill", "--data", tile_folder, "--method", "kd", "--teacher", teacher,
         "--unlabelled", folder, "--arch", "test_resnet", "--image-size", "32", "--epochs", "1",
         "--out", tmp_path / "runs", "--set", "augment.randaugment=false", "--set", "data.train_per_class=3",
         "--set", "distill.student_init=scratch", "--set", "train.progress=false", "--set", "train.tensorboard=false"],
        capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if "slide1_broken.png" in line]
    assert len(error) == 1 and "--skip-bad" in error[0]


def test_none_refuses_a_pool_and_fixmatch_needs_two_views(tile_folder, make_config, teacher):
    cfg = pool_config(make_config, tile_folder, teacher, method="none")
    with pytest.raises(ConfigError, match="no term that can learn from unlabelled tiles"):
        run_training(cfg)
    cfg = pool_config(make_config, tile_folder, teacher, method="fixmatch")
    with pytest.raises(ConfigError, match="data.strong_augment=true"):
        run_training(cfg)


def test_pool_sampler_draws_every_tile_once_before_any_twice_and_ranks_do_not_overlap():
    one = PoolSampler(10, seed=3, info=DistInfo())
    drawn = []
    for round_id in range(3):
        one.set_round(round_id, 4)
        drawn += [row for row, _ in one]
    assert sorted(drawn[:10]) == list(range(10)) and len(drawn) == 12
    ranks = []
    for rank in range(2):
        sampler = PoolSampler(10, seed=3, info=DistInfo(rank=rank, world_size=2, local_rank=rank))
        sampler.set_round(0, 5)
        ranks.append([row for row, _ in sampler])
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    again = PoolSampler(10, seed=3, info=DistInfo())
    again.set_round(2, 4)
    assert [row for row, _ in again] == drawn[8:]  # a resumed round draws what it drew before


def test_resume_with_a_pool_gives_identical_weights(tile_folder, make_config, teacher, monkeypatch):
    cfg = pool_config(make_config, tile_folder, teacher, strong_augment=True)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 2})})
    reference = run_training(cfg).run_dir
    interrupt_run(cfg, monkeypatch)  # in the middle of the second epoch
    resumed = run_training(cfg, resume_dir=f"{cfg.run.output_dir}/t-2").run_dir
    a, b = load_file(f"{reference}/last.safetensors"), load_file(f"{resumed}/last.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_compare_runs_each_pool_using_method_with_and_without_the_pool(tmp_path, tile_folder):
    from moma.compare.config import build_compare_config
    from moma.compare.grid import Grid
    from moma.compare.plan import Cell

    cfg = build_compare_config({
        "base": {"data": {"source": str(tile_folder), "image_size": 32}, "model": {"arch": "test_resnet"}},
        "settings": {"plain": {}},
        "methods": ["none", "fixmatch", "kd"],
        "unlabelled": {"rest": "rest"},
        "train_per_class": [2, "all"],
    })
    assert list(cfg.methods) == ["none", "fixmatch", "kd", "fixmatch+rest", "kd+rest"]
    assert cfg.registered_name("kd+rest") == "kd"
    grid = Grid(cfg, tmp_path / "out")
    with_pool = grid.cell_config(Cell("plain", "kd+rest", 0, 0, "2"))
    without = grid.cell_config(Cell("plain", "kd", 0, 0, "2"))
    assert with_pool.data.unlabelled == ["rest"] and without.data.unlabelled == []
    assert with_pool.distill.method == "kd" and with_pool.data.train_per_class == 2
    assert "no tile is left" in grid.not_applicable_reason(Cell("plain", "fixmatch+rest", 0, 0, "all"))


def test_a_pool_key_set_by_hand_in_a_compare_setting_is_refused(tile_folder):
    from moma.compare.config import build_compare_config

    with pytest.raises(ConfigError, match="data.unlabelled is set by the grid"):
        build_compare_config({"base": {"data": {"source": str(tile_folder)}},
                              "settings": {"s": {"data": {"unlabelled": ["rest"]}}}, "methods": ["kd"]})


def test_a_pool_entry_is_drawn_dashed_in_its_method_s_colour():
    from moma.compare.report_plots import curve_style

    colours = {"kd": (1, 0, 0, 1), "none": (0, 0, 1, 1)}
    plain, pooled = curve_style("kd", colours), curve_style("kd+rest", colours)
    assert plain == {"color": (1, 0, 0, 1), "label": "kd", "linestyle": "-"}
    assert pooled["color"] == plain["color"] and pooled["linestyle"] == "--"
    assert pooled["label"] == "kd with unlabelled tiles (rest)"


def test_sizes_of_spends_the_curve_on_some_entries_and_rejects_what_is_not_in_it(tile_folder):
    from moma.compare.config import build_compare_config
    from moma.compare.grid import Grid

    tree = {
        "base": {"data": {"source": str(tile_folder), "image_size": 32}, "model": {"arch": "test_resnet"}},
        "settings": {"s": {"sizes_of": {"kd": [2], "kd+rest": [1, 2]}}},
        "methods": ["none", "kd"], "unlabelled": {"rest": "rest"}, "train_per_class": [1, 2, "all"], "folds": 1,
    }
    cells = Grid(build_compare_config(tree), Path("unused")).cells()
    sizes = {m: sorted(c.size for c in cells if c.method == m) for m in ("none", "kd", "kd+rest")}
    assert sizes == {"none": ["1", "2", "all"], "kd": ["2"], "kd+rest": ["1", "2"]}
    tree["settings"]["s"]["sizes_of"] = {"kd": [4]}
    with pytest.raises(ConfigError, match=r"settings.s.sizes_of.kd: 4: use sizes of the compare's list \(1, 2, all\)"):
        build_compare_config(tree)
    tree["settings"]["s"]["sizes_of"] = {"crd": [2]}
    with pytest.raises(ConfigError, match="sizes_of.crd: not an entry of this setting"):
        build_compare_config(tree)

"""`moma compare`: config validation, the grid (resume after a kill, failures, not-applicable
methods), the statistics against hand computation, and the report (HTML parsed; screenshotted
with headless Chromium where installed).

One real grid is trained once per module (test_resnet, 32 px, 1 epoch, 2 folds x 1 seed, methods
none + kd); the other grid tests replace training by copying that grid's finished runs."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats as scipy_stats

from conftest import load_script, make_tile_folder
from moma.compare import run_compare
from moma.compare.config import load_compare_config
from moma.compare.holdout import write_holdout_manifests
from moma.compare.plan import choose_out_dir, config_differences
from moma.compare.stats import add_ranks, average_ranks, compare_with_baseline, paired_difference, verdict, wilcoxon_p
from moma.compare.training import train_or_resume
from moma.engine.checkpoint import load_model_checkpoint, save_model_checkpoint
from moma.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CELLS = [f"same/{m}/fold{k}-seed0" for k in (0, 1) for m in ("none", "kd")]


def tiny_compare(tmp: Path, target: Path, teacher: dict, **extra) -> dict:
    tree = {
        "name": "grid",
        "output_dir": str(tmp / "compare"),
        "base": {
            "data": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
            "augment": {"randaugment": False},
            "model": {"arch": "test_resnet"},
            "optim": {"epochs": 1, "batch_size": 16, "lr": 0.05},
            "train": {"tensorboard": False, "max_steps_per_epoch": 2},
        },
        "teachers": {"t": teacher},
        "settings": {"same": {"teacher": "t", "data": {"source": str(target)}}},
        "methods": ["none", "kd"],
        "folds": 2,
        "seeds": [0],
    }
    tree.update(extra)
    return tree


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def counting(monkeypatch, fail_on_cell: int | None = None, replacement=None) -> list[Path]:
    """Record the run folder of every run_training call; optionally raise KeyboardInterrupt at the
    n-th cell (teachers do not count) or train with ``replacement`` instead."""
    import moma.engine.runs as trainer

    real = trainer.run_training
    calls: list[Path] = []

    def wrapper(cfg, resume_dir=None, run_dir=None):
        folder = Path(resume_dir or run_dir)
        calls.append(folder)
        if fail_on_cell is not None and sum("cells" in p.parts for p in calls) == fail_on_cell:
            raise KeyboardInterrupt
        return (replacement or real)(cfg, resume_dir=resume_dir, run_dir=run_dir)

    monkeypatch.setattr(trainer, "run_training", wrapper)
    return calls


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("compare-data")
    return {
        "tmp": tmp,
        "target": make_tile_folder(tmp / "target", classes=("tumour", "stroma"), per_class=16),
        "teacher": make_tile_folder(tmp / "teacher", classes=("tumour", "stroma"), per_class=12),
        "external": make_tile_folder(tmp / "external", classes=("tumour", "stroma"), per_class=6, manifest=False),
    }


@pytest.fixture(scope="module")
def finished(data) -> dict:
    """A real grid, killed at its 3rd cell and re-run: the calls of both invocations."""
    config = write_yaml(data["tmp"] / "grid.yaml", tiny_compare(data["tmp"], data["target"], {"data": {"source": str(data["teacher"])}}))
    with pytest.MonkeyPatch.context() as mp:
        first = counting(mp, fail_on_cell=3)
        with pytest.raises(KeyboardInterrupt):
            run_compare(config)
    out = data["tmp"] / "compare" / "grid"
    interrupted = pd.read_csv(out / "results.csv")
    with pytest.MonkeyPatch.context() as mp:
        second = counting(mp)
        assert run_compare(config) == out
    return {"config": config, "out": out, "first": first, "second": second, "interrupted": interrupted}


# ---------------------------------------------------------------------- the real grid
def test_killed_grid_completes_only_the_missing_cells(finished):
    out = finished["out"]
    rel = lambda calls: [p.relative_to(out).as_posix() for p in calls]  # noqa: E731
    # first invocation: the teacher, two cells, then the kill at the third cell
    assert rel(finished["first"]) == ["teachers/t"] + [f"cells/{c}" for c in CELLS[:3]]
    assert list(finished["interrupted"]["status"]) == ["done", "done", "pending", "pending"]
    # second invocation: the teacher and the two finished cells are skipped
    assert rel(finished["second"]) == [f"cells/{c}" for c in CELLS[2:]]


def test_results_have_a_row_per_cell_with_finite_metrics(finished):
    out = finished["out"]
    for name in ("results.csv", "failures.csv", "summary.csv", "summary.md", "report.html", "compare.yaml",
                 "compare.log", "plots/bars.png", "plots/accuracy_vs_time.png", "plots/confusion_same_none.png"):
        assert (out / name).is_file(), name
    results = pd.read_csv(out / "results.csv")
    assert [f"{r.setting}/{r.method}/fold{r.fold}-seed{r.seed}" for r in results.itertuples()] == CELLS
    assert (results["status"] == "done").all()
    for column in ("best_accuracy", "best_macro_f1", "best_kappa", "last_accuracy", "last_macro_f1", "train_seconds",
                   "images_per_second", "forward_backward_ms", "peak_memory_mb", "extra_parameters"):
        assert np.isfinite(results[column]).all(), column
    assert results["best_accuracy"].between(0, 1).all()
    for row in results.itertuples():  # each row is its cell's metrics.json
        metrics = json.loads((out / row.run_dir / "metrics.json").read_text())
        assert row.best_macro_f1 == pytest.approx(metrics["best"]["test"]["macro_f1"], abs=1e-5)
    assert len(pd.read_csv(out / "failures.csv")) == 0
    assert set(results["device"]) == {"cpu"}
    # finished runs keep their models but not the (large) training state
    for run_dir in [out / "teachers" / "t"] + [out / "cells" / c for c in CELLS]:
        assert (run_dir / "best.safetensors").is_file() and not (run_dir / "state.pt").exists()


def test_every_method_of_a_setting_gets_the_same_teacher_folds_and_init(finished):
    out = finished["out"]
    configs = {c: yaml.safe_load((out / "cells" / c / "config.yaml").read_text()) for c in CELLS}
    teacher = str((out / "teachers" / "t" / "best.safetensors").resolve())
    assert {c["distill"]["teacher"] for c in configs.values()} == {teacher}
    assert [c["distill"]["method"] for c in configs.values()] == ["none", "kd", "none", "kd"]
    assert all(c["train"]["progress"] is False and c["data"]["num_folds"] == 2 for c in configs.values())
    for fold in (0, 1):  # identical test patients for both methods, different ones per fold
        splits = [pd.read_csv(out / "cells" / f"same/{m}/fold{fold}-seed0" / "split.csv") for m in ("none", "kd")]
        pd.testing.assert_frame_equal(splits[0], splits[1])
    tests = [set(pd.read_csv(out / "cells" / f"same/none/fold{k}-seed0" / "split.csv").query("split == 'test'")["group"]) for k in (0, 1)]
    assert tests[0] and tests[1] and not tests[0] & tests[1]
    env = json.loads((out / "cells" / CELLS[0] / "environment.json").read_text())
    assert env["setup"]["student_init"].startswith("teacher weights")


def test_summary_matches_the_results(finished):
    out = finished["out"]
    results = pd.read_csv(out / "results.csv")
    summary = pd.read_csv(out / "summary.csv")
    for row in summary.itertuples():
        cells = results[(results["setting"] == row.setting) & (results["method"] == row.method)]
        assert row.n == 2
        assert row.macro_f1_mean == pytest.approx(cells["best_macro_f1"].mean(), abs=1e-5)
        assert row.accuracy_std == pytest.approx(cells["best_accuracy"].std(ddof=1), abs=1e-5)
    kd = summary[summary["method"] == "kd"].iloc[0]
    diffs = (results[results["method"] == "kd"]["best_macro_f1"].to_numpy()
             - results[results["method"] == "none"]["best_macro_f1"].to_numpy())
    assert kd.delta_best_macro_f1 == pytest.approx(diffs.mean(), abs=1e-5)
    text = (out / "summary.md").read_text()
    assert "| method | runs | accuracy | macro F1 | kappa | rank (macro F1) |" in text
    assert "same: kd " in text and " none (macro F1 " in text


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.headers: list[str] = []
        self.images: list[str] = []
        self.alts: list[str] = []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        self._in_th = tag == "th"
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
            self.alts.append(dict(attrs).get("alt", ""))

    def handle_data(self, text):
        if self._in_th:
            self.headers.append(text)

    def handle_endtag(self, tag):
        self._in_th = False


def test_report_html_is_self_contained(finished):
    parser = _ReportParser()
    parser.feed((finished["out"] / "report.html").read_text())
    assert {"method", "runs", "macro F1", "rank (macro F1)", "Δ macro F1 [95% CI]"} <= set(parser.headers)
    embedded = [src for src in parser.images if src.startswith("data:image/png;base64,")]
    assert embedded and len(embedded) == len(parser.images)
    assert base64.b64decode(embedded[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def require_chromium() -> None:
    """Skip without Chromium, except under CI=true, where .ci/run installs it and its absence fails."""
    browsers = load_script("screenshot_report")
    if browsers.find_chromium() is None:
        missing = f"no Chromium found (looked for {', '.join(browsers.BROWSERS)}); install it: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)


def test_screenshot_of_the_report_is_not_blank(finished, tmp_path):
    require_chromium()
    png = tmp_path / "report.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(finished["out"] / "report.html"),
                           str(png), "--height", "1200"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert png.is_file()


def test_a_changed_config_is_refused_in_the_same_folder(finished):
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.05 -> 0\.1.*--fresh"):
        run_compare(finished["config"], ["base.optim.lr=0.1"])


# ---------------------------------------------------------------------- grid logic with copied runs
def copy_finished_run(finished_out: Path):
    def fake(cfg, resume_dir=None, run_dir=None):
        if cfg.distill.method == "kd":
            raise RuntimeError("boom: kd exploded")
        shutil.copytree(finished_out / "cells" / CELLS[0], run_dir, dirs_exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(cfg.to_yaml())
        return json.loads((Path(run_dir) / "metrics.json").read_text())

    return fake


def test_failures_and_not_applicable_cells_do_not_stop_the_grid(finished, data, monkeypatch, tmp_path):
    teacher = finished["out"] / "teachers" / "t" / "best.safetensors"
    state, meta = load_model_checkpoint(teacher)
    meta.class_names = ["a", "b", "c"]  # a teacher of another task: kd cannot apply
    save_model_checkpoint(tmp_path / "other.safetensors", state, meta)
    tree = tiny_compare(tmp_path, data["target"], {"checkpoint": str(teacher)})
    tree["teachers"]["other"] = {"checkpoint": str(tmp_path / "other.safetensors")}
    tree["settings"]["same"]["external_test"] = {"source": str(data["external"])}
    tree["settings"]["far"] = {"teacher": "other", "data": {"source": str(data["target"])}}
    calls = counting(monkeypatch, replacement=copy_finished_run(finished["out"]))
    out = run_compare(write_yaml(tmp_path / "c.yaml", tree))
    results = pd.read_csv(out / "results.csv").set_index(["setting", "method", "fold"]).sort_index()
    assert results.loc[("same", "kd", 1), "status"] == "failed"
    assert "boom: kd exploded" in results.loc[("same", "kd", 0), "message"]
    assert (results.loc[("far", "kd"), "status"] == "not_applicable").all()
    assert (results.xs("none", level="method")["status"] == "done").all()  # the grid went on after failures
    assert len(calls) == 6  # 4 none cells + 2 kd attempts; no teacher training, nothing for n/a cells
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["method"]) == ["kd", "kd"] and set(failures["status"]) == {"failed"}
    assert "RuntimeError: boom" in (out / "cells/same/kd/fold0-seed0/error.txt").read_text()
    external = results.loc[("same", "none", 0)]
    assert 0 <= external["ext_accuracy"] <= 1 and (out / "cells/same/none/fold0-seed0/external/metrics_eval.json").is_file()
    assert math.isnan(results.loc[("far", "none", 0), "ext_accuracy"])
    summary_md = (out / "summary.md").read_text()
    assert "kd: not applicable" in summary_md and "## Failures" in summary_md
    # failed cells are retried by a re-run, finished ones are not
    calls.clear()
    run_compare(write_yaml(tmp_path / "c.yaml", tree))
    assert [p.relative_to(out).as_posix() for p in calls] == ["cells/same/kd/fold0-seed0", "cells/same/kd/fold1-seed0"]


def test_fresh_starts_a_new_folder_and_never_overwrites(tmp_path):
    from moma.compare.config import build_compare_config

    cfg = build_compare_config({"name": "x", "output_dir": str(tmp_path), "settings": {"s": {}}, "methods": ["none"]})
    first = choose_out_dir(cfg, None, resume=True)
    (first / "compare.yaml").write_text("name: x\n")
    assert choose_out_dir(cfg, None, resume=True) == first
    assert choose_out_dir(cfg, None, resume=False) == tmp_path / "x-2"
    assert choose_out_dir(cfg, None, resume=False) == tmp_path / "x-3"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("")
    with pytest.raises(ConfigError, match="not a compare folder"):
        choose_out_dir(cfg, tmp_path / "junk", resume=True)


def test_cell_folders_are_skipped_resumed_or_restarted(tmp_path, monkeypatch):
    import moma.engine.runs as trainer

    seen = []
    monkeypatch.setattr(trainer, "run_training", lambda cfg, resume_dir=None, run_dir=None: seen.append((resume_dir, run_dir)))
    done, interrupted, broken = tmp_path / "done", tmp_path / "interrupted", tmp_path / "broken"
    for folder, name in ((done, "metrics.json"), (interrupted, "state.pt"), (broken, "config.yaml")):
        folder.mkdir()
        (folder / name).write_text("{}")
    assert train_or_resume(None, done) == "skipped"
    assert train_or_resume(None, interrupted) == "resumed"
    assert train_or_resume(None, broken) == "trained"
    assert seen == [(interrupted, None), (None, broken)]
    assert not broken.exists()  # a run without any checkpoint was cleared before it restarted


def test_config_differences_ignore_how_a_run_executes():
    old = {"run": {"name": "a", "device": "cpu", "seed": 0}, "optim": {"lr": 0.1}, "distill": {"params": {"k": 1}}}
    new = {"run": {"name": "b", "device": "cuda", "seed": 0}, "optim": {"lr": 0.2}, "distill": {"params": {}}}
    assert config_differences(old, new) == ["distill.params: {'k': 1} -> {}", "optim.lr: 0.1 -> 0.2"]
    # a field added to the schema since the run: its default is no difference, another value is
    assert config_differences({"optim": {"lr": 0.1}}, {"optim": {"lr": 0.1, "epochs": 50}}) == []
    assert config_differences({"optim": {"lr": 0.1}}, {"optim": {"lr": 0.1, "epochs": 7}}) == ["optim.epochs: None -> 7"]


# ---------------------------------------------------------------------- config
def _load(tmp_path, tree, overrides=None):
    return load_compare_config(write_yaml(tmp_path / "c.yaml", tree), overrides)


def base_tree(source="data") -> dict:
    return {"teachers": {"t": {"data": {"source": source}}},
            "settings": {"s": {"teacher": "t", "data": {"source": source}}}, "methods": ["none", "kd"]}


@pytest.mark.parametrize("change, fragment", [
    ({"sedes": [0]}, "unknown compare key 'sedes'"),
    ({"settings": {"s": {"teacher": "t", "dta": {}}}}, "unknown compare key 'settings.s.dta'"),
    ({"teachers": {"t": {"data": {"sorce": "x"}}}}, "teachers.t: unknown config key 'data.sorce'"),
    ({"base": {"optim": {"lrr": 1}}}, "base: unknown config key 'optim.lrr'"),
    ({"methods": {"kd": {"kl_wieght": 1}}}, "unknown compare key 'methods.kd.kl_wieght'"),
    ({"methods": {"kd": {"params": {"nope": 1}}}}, "methods.kd: unknown config key 'distill.params.nope' (method 'kd' takes: none)"),
    ({"methods": ["none", "nosuch"]}, "methods.nosuch: distill.method 'nosuch' is unknown"),
    ({"settings": {"s": {"teacher": "missing"}}}, "settings.s.teacher: 'missing' is not under teachers"),
    ({"settings": {"s": {"teacher": "t", "run": {"seed": 3}}}}, "settings.s.run.seed is set by the grid; use 'seeds'"),
    ({"base": {"data": {"fold": 1, "num_folds": 2}}}, "base.data.num_folds is set by the grid"),
    ({"settings": {"s": {"teacher": "t", "methods": ["kd", "fitnett"]}}}, "settings.s.methods: fitnett not under methods"),
    ({"seeds": [1, 1]}, "seeds must be a non-empty list of distinct integers"),
    ({"methods": ["kd"]}, "baseline 'none' is not under methods"),
    ({"teachers": {"t": {"checkpoint": "x.safetensors", "data": {"source": "y"}}}}, "either 'checkpoint"),
    ({"teachers": {"t": {"distill": {"method": "kd"}}}}, "teachers are trained without distillation"),
    ({"train_per_class": [8], "train_fraction": [0.5]}, "set train_per_class or train_fraction, not both"),
    ({"train_per_class": [8, 8]}, "a non-empty list of distinct sizes"),
    ({"train_per_class": [0]}, "compare key 'train_per_class.0"),
    ({"base": {"data": {"train_per_class": 8}}}, "base.data.train_per_class is set by the grid; use 'train_per_class"),
    ({"min_teacher_margin": 1.5}, "compare key 'min_teacher_margin'"),
])
def test_config_errors_name_the_key_in_one_line(tmp_path, change, fragment):
    tree = base_tree()
    tree.update(change)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, tree)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_config_forms_and_overrides(tmp_path):
    tree = base_tree()
    tree["methods"] = {"none": None, "kd": {"kl_weight": 0.5}, "kd_t2": {"method": "kd", "kl_temperature": 2}}
    cfg = _load(tmp_path, tree, ["seeds=[0, 1]", "base.optim.epochs=3", "methods.kd.ce_weight=0.2", "folds=3"])
    assert cfg.seeds == [0, 1] and cfg.folds == 3 and cfg.base["optim"]["epochs"] == 3
    assert cfg.methods["kd"].distill_overrides() == {"ce_weight": 0.2, "kl_weight": 0.5}
    assert cfg.registered_name("kd_t2") == "kd" and cfg.methods["kd_t2"].distill_overrides() == {"kl_temperature": 2}
    listed = _load(tmp_path, base_tree(), ["methods.none.kl_weight=0"])  # a list in YAML takes dotted keys too
    assert listed.methods["none"].kl_weight == 0
    subset = _load(tmp_path, base_tree(), ["settings.s.methods=[kd]"])
    assert subset.methods_of("s") == ["kd"]


def test_size_axis_orders_sizes_and_sets_each_cell_s_data_keys(tmp_path):
    from moma.compare.grid import Grid

    tree = base_tree()
    tree.update(train_per_class=["all", 32, 8], folds=2)
    cfg = _load(tmp_path, tree)
    assert cfg.sizes() == ["8", "32", "all"]
    grid = Grid(cfg, tmp_path / "out")
    cells = grid.cells()
    assert len(cells) == 2 * 3 * len(cfg.methods_of("s"))
    by_size = {c.size: grid.cell_config(c).data for c in cells if c.method == "none" and c.fold == 0}
    assert by_size["8"].train_per_class == 8 and by_size["32"].train_per_class == 32
    assert by_size["all"].train_per_class is None and by_size["all"].train_fraction is None
    assert cells[0].rel_dir.as_posix() == "cells/s/none/size-8/fold0-seed0"
    fractions = _load(tmp_path, {**base_tree(), "train_fraction": [0.5, 0.1]})
    assert fractions.sizes() == ["0.1", "0.5"] and fractions.size_keys("0.1") == {"train_fraction": 0.1}


def test_curves_paper_gpu_and_demo_configs_parse():
    """The grids' structure (their MoMA entries use keys that the method validates separately)."""
    from moma.compare.config import CompareConfig, methods_as_mapping
    from moma.config import read_yaml

    for name, sizes in (("curves", ["8", "24", "all"]), ("paper_gpu", ["10", "30", "100", "300", "all"])):
        tree = read_yaml(ROOT / "configs" / "compare" / f"{name}.yaml")
        tree["methods"] = methods_as_mapping(tree["methods"])
        cfg = CompareConfig.model_validate(tree)
        assert cfg.sizes() == sizes and cfg.folds >= 3 and len(cfg.seeds) >= 2 and cfg.min_teacher_margin == 0.15
        assert cfg.settings["same_scratch"].distill["student_init"] == "scratch"
        for setting in cfg.settings:
            assert {"none", "crd", "moma", "moma_official"} <= set(cfg.methods_of(setting))
        assert cfg.methods["moma_official"].params == {"preset": "official-code"}
        assert cfg.base["optim"]["total_steps"] >= 120
    demo = CompareConfig.model_validate(read_yaml(ROOT / "configs" / "demo" / "demo.yaml"))
    assert demo.sizes() == ["2", "8", "all"] and demo.methods_of("same") == ["none", "moma", "kd+rest"]
    assert demo.settings["same"].distill["student_init"] == "scratch"
    assert demo.pool_source("kd+rest") == "rest"  # the demo's curve has a line with unlabelled tiles


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_compare_config_loads(path):
    cfg = load_compare_config(path)
    assert cfg.settings and cfg.methods


def test_smoke_config_is_valid():
    cfg = load_compare_config(ROOT / "configs" / "compare" / "smoke.yaml")
    assert set(cfg.settings) == {"same", "relevant", "irrelevant"} and cfg.folds == 2 and cfg.seeds == [0]
    assert cfg.teachers["glas_half"].holdout == 0.5


# ---------------------------------------------------------------------- holdout
def test_holdout_splits_patients_into_disjoint_parts(tmp_path):
    source = make_tile_folder(tmp_path / "tiles", classes=("tumour", "stroma"), per_class=16)
    teacher_csv, student_csv = write_holdout_manifests(source, tmp_path / "parts", "t", 0.5, seed=0)
    teacher, student = pd.read_csv(teacher_csv), pd.read_csv(student_csv)
    assert len(teacher) + len(student) == 32
    assert not set(teacher["group"]) & set(student["group"])
    assert set(teacher["group"]) | set(student["group"]) == {f"{c}_patient{i}" for c in ("tumour", "stroma") for i in range(4)}
    assert set(teacher["label"]) == set(student["label"]) == {"tumour", "stroma"}  # stratified by label
    assert all((teacher_csv.parent / p).is_file() for p in teacher["path"])
    again, _ = write_holdout_manifests(source, tmp_path / "again", "t", 0.5, seed=0)
    assert list(pd.read_csv(again)["group"]) == list(teacher["group"])  # seeded: the same on every run
    quarter, _ = write_holdout_manifests(source, tmp_path / "quarter", "t", 0.25, seed=0)
    assert pd.read_csv(quarter)["group"].nunique() == 2


def test_holdout_patients_are_removed_from_every_setting_with_that_target(tmp_path):
    """The paper keeps the target fixed across settings: with a same-task teacher holding out
    patients, the relevant-task students use the same student patients."""
    from moma.compare.plan import GridPlan
    from moma.compare.teachers import prepare_holdouts

    target = make_tile_folder(tmp_path / "target", per_class=8, patients_per_class=4)
    other = make_tile_folder(tmp_path / "other", classes=("immune", "fat"), per_class=8)
    tree = tiny_compare(tmp_path, target, {"data": {"source": str(target)}, "holdout": 0.5})
    tree["teachers"]["o"] = {"data": {"source": str(other)}}
    tree["settings"]["relevant"] = {"teacher": "o", "data": {"source": str(target)}}
    tree["settings"]["elsewhere"] = {"teacher": "o", "data": {"source": str(other)}}
    cfg = load_compare_config(write_yaml(tmp_path / "c.yaml", tree))
    grid = GridPlan(cfg, tmp_path / "out")
    prepare_holdouts(grid)
    sources = {cell.setting: grid.cell_config(cell).data.source for cell in grid.cells()}
    student_part = str(grid.holdout_paths("t")[1])
    assert sources["same"] == sources["relevant"] == student_part
    assert sources["elsewhere"] == str(other.resolve())
    assert grid.teacher_config("t").data.source == str(grid.holdout_paths("t")[0])


def test_holdout_needs_patient_ids(tmp_path):
    source = make_tile_folder(tmp_path / "tiles", classes=("tumour", "stroma"), per_class=4, manifest=False)
    with pytest.raises(ConfigError, match="teachers.t.holdout: .* no 'group' column"):
        write_holdout_manifests(source, tmp_path / "parts", "t", 0.5, seed=0)


def test_holdout_by_tile_without_patient_ids(tmp_path):
    source = make_tile_folder(tmp_path / "tiles", classes=("tumour", "stroma"), per_class=8, manifest=False)
    teacher_csv, student_csv = write_holdout_manifests(source, tmp_path / "parts", "t", 0.25, seed=0, unit="tile")
    teacher, student = pd.read_csv(teacher_csv), pd.read_csv(student_csv)
    assert "group" not in teacher.columns and "group" not in student.columns
    assert set(teacher["path"]).isdisjoint(student["path"])
    assert len(teacher) + len(student) == 16
    assert teacher["label"].value_counts().to_dict() == {"tumour": 2, "stroma": 2}  # stratified, 1/4 of 8 each


# ---------------------------------------------------------------------- statistics
def hand_results() -> pd.DataFrame:
    """Setting s: 3 folds x 2 seeds; kd = none + known differences; 'same' equals none exactly."""
    none = [0.60, 0.70, 0.65, 0.55, 0.72, 0.68]
    kd_delta = [0.05, 0.02, 0.04, 0.06, 0.01, 0.03]
    rows = []
    for i, (fold, seed) in enumerate([(f, s) for f in range(3) for s in range(2)]):
        for method, f1 in (("none", none[i]), ("kd", none[i] + kd_delta[i]), ("same", none[i])):
            rows.append({"setting": "s", "method": method, "fold": fold, "seed": seed, "status": "done",
                         "best_macro_f1": f1, "best_accuracy": f1 + 0.1})
    rows.append({"setting": "s", "method": "fit", "fold": 0, "seed": 0, "status": "done", "best_macro_f1": 0.9,
                 "best_accuracy": 0.9})
    rows.append({"setting": "s", "method": "fit", "fold": 0, "seed": 1, "status": "failed",
                 "best_macro_f1": float("nan"), "best_accuracy": float("nan")})
    return pd.DataFrame(rows)


def test_paired_difference_ci_and_wilcoxon_match_hand_computation():
    d = np.array([0.05, 0.02, 0.04, 0.06, 0.01, 0.03])
    result = paired_difference(d)
    sd = math.sqrt(sum((x - 0.035) ** 2 for x in d) / 5)  # = 0.018708
    half = 2.570582 * sd / math.sqrt(6)  # t_{0.975, 5} = 2.570582
    assert result.n == 6 and result.mean == pytest.approx(0.035)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.035 - half, 0.035 + half), abs=1e-6)
    assert result.ci_low == pytest.approx(0.015367, abs=1e-5)
    assert result.p_value == pytest.approx(scipy_stats.wilcoxon(d).pvalue)
    assert result.p_value == pytest.approx(2 / 64)  # exact: all 6 positive, 2 * (1/2)^6
    assert verdict(result.ci_low, result.ci_high, result.n) == "beats"


def test_paired_statistics_edge_cases():
    zero = paired_difference(np.zeros(4))
    assert (zero.mean, zero.ci_low, zero.ci_high, zero.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert verdict(zero.ci_low, zero.ci_high, 4) == "shows no clear difference from"
    single = paired_difference(np.array([0.2]))
    assert single.mean == pytest.approx(0.2) and math.isnan(single.ci_low) and math.isnan(single.p_value)
    assert verdict(single.ci_low, single.ci_high, 1).startswith("has too few paired runs")
    assert paired_difference(np.array([])).n == 0
    assert math.isnan(wilcoxon_p(np.array([0.1])))
    worse = paired_difference(-np.array([0.05, 0.02, 0.04, 0.06]))
    assert verdict(worse.ci_low, worse.ci_high, 4) == "is worse than"


def test_compare_with_baseline_pairs_on_fold_and_seed():
    table = compare_with_baseline(hand_results(), "none", ["best_macro_f1", "best_accuracy"]).set_index("method")
    assert table.loc["kd", "pairs"] == 6
    assert table.loc["kd", "delta_best_macro_f1"] == pytest.approx(0.035)
    assert table.loc["kd", "delta_best_macro_f1_p"] == pytest.approx(scipy_stats.wilcoxon([0.05, 0.02, 0.04, 0.06, 0.01, 0.03]).pvalue)
    assert table.loc["same", "delta_best_macro_f1"] == 0 and table.loc["same", "delta_best_macro_f1_p"] == 1.0
    # fit: one finished pair (fold 0, seed 0: 0.9 - 0.60); its failed cell is not paired
    assert table.loc["fit", "pairs"] == 1 and table.loc["fit", "delta_best_macro_f1"] == pytest.approx(0.30)
    assert math.isnan(table.loc["fit", "delta_best_macro_f1_ci_low"])


def test_ranks_and_average_ranks():
    summary = pd.DataFrame({
        "setting": ["a"] * 3 + ["b"] * 3 + ["c"] * 2,
        "method": ["none", "kd", "moma"] * 2 + ["none", "moma"],
        "macro_f1_mean": [0.70, 0.80, 0.75, 0.60, 0.60, 0.90, 0.50, float("nan")],
    })
    ranked = add_ranks(summary)
    assert list(ranked["rank"][:6]) == [3, 1, 2, 2.5, 2.5, 1]  # a tie shares the mean rank
    assert ranked["rank"].iloc[6] == 1 and math.isnan(ranked["rank"].iloc[7])  # no result, no rank
    averages = average_ranks(ranked).set_index("method")
    assert averages.loc["moma", "average_rank"] == pytest.approx((2 + 1) / 2)
    assert averages.loc["kd", "average_rank"] == pytest.approx((1 + 2.5) / 2)
    assert averages.loc["none", "average_rank"] == pytest.approx((3 + 2.5 + 1) / 3)
    assert list(averages.index) == ["moma", "kd", "none"]
    assert averages.loc["none", "settings"] == 3 and averages.loc["moma", "settings"] == 2


def test_summary_mean_std_and_counts():
    from moma.compare.stats import summarize

    table = summarize(hand_results(), ["best_macro_f1"]).set_index("method")
    assert table.loc["kd", "n"] == 6
    expected = np.array([0.60, 0.70, 0.65, 0.55, 0.72, 0.68]) + np.array([0.05, 0.02, 0.04, 0.06, 0.01, 0.03])
    assert table.loc["kd", "best_macro_f1_mean"] == pytest.approx(expected.mean())
    assert table.loc["kd", "best_macro_f1_std"] == pytest.approx(expected.std(ddof=1))
    assert table.loc["fit", "n"] == 1 and math.isnan(table.loc["fit", "best_macro_f1_std"])



# ---------------------------------------------------------------------- learning curves, teachers, shards
def curves_compare(tmp: Path, data: dict, name: str = "curves", **extra) -> dict:
    """Two starting points (teacher weights / scratch) x 2 sizes x none + kd, equal optimiser steps."""
    tree = tiny_compare(tmp, data["curve_target"], {"data": {"source": str(data["teacher"])}}, name=name)
    tree["base"]["optim"].update(epochs=1, total_steps=2, batch_size=4)
    tree["base"]["train"].pop("max_steps_per_epoch")
    tree["settings"]["scratch"] = {"teacher": "t", "data": {"source": str(data["curve_target"])},
                                   "distill": {"student_init": "scratch"}, "methods": ["none"]}
    tree.update(train_per_class=[2, "all"], min_teacher_margin=0.99, **extra)
    return tree


@pytest.fixture(scope="module")
def curves(data) -> Path:
    # 8 patients of 3 tiles per class: 2 labelled tiles per class means one whole patient (3 tiles)
    data["curve_target"] = make_tile_folder(data["tmp"] / "curve_target", classes=("tumour", "stroma"), per_class=24,
                                            patients_per_class=8)
    config = write_yaml(data["tmp"] / "curves.yaml", curves_compare(data["tmp"], data))
    return run_compare(config)


def test_learning_curve_cells_share_subsets_and_steps(curves):
    results = pd.read_csv(curves / "results.csv", dtype={"size": str})
    assert (results["status"] == "done").all() and len(results) == 2 * 2 * (2 + 1)
    assert set(results["size"]) == {"2", "all"}
    small = results[results["size"] == "2"]
    assert (small["train_tiles_per_class"] == 3).all()  # whole patients: one patient of 3 tiles per class
    assert (results[results["size"] == "all"]["train_tiles_per_class"] > 3).all()
    assert (results["optimizer_steps"] == 2).all()  # the same number of steps whatever the subset
    for (fold, size), part in results.groupby(["fold", "size"]):
        splits = {(curves / d / "split.csv").read_text() for d in part["run_dir"]}
        assert len(splits) == 1, f"fold {fold}, size {size}: the methods and settings learnt from other tiles"
    scratch = json.loads((curves / "cells/scratch/none/size-2/fold0-seed0/metrics.json").read_text())
    teacher_init = json.loads((curves / "cells/same/none/size-2/fold0-seed0/metrics.json").read_text())
    assert scratch["setup"]["student_init"] == "random initialisation"
    assert teacher_init["setup"]["student_init"].startswith("teacher weights")


def test_report_has_learning_curves_per_size_statistics_and_weak_teacher(curves):
    summary = pd.read_csv(curves / "summary.csv", dtype={"size": str})
    assert set(zip(summary["setting"], summary["size"])) == {(s, z) for s in ("same", "scratch") for z in ("2", "all")}
    results = pd.read_csv(curves / "results.csv", dtype={"size": str})
    one = results[(results["setting"] == "same") & (results["size"] == "2") & (results["method"] == "kd")]
    row = summary[(summary["setting"] == "same") & (summary["size"] == "2") & (summary["method"] == "kd")].iloc[0]
    assert row["macro_f1_mean"] == pytest.approx(one["best_macro_f1"].mean())
    for setting in ("same", "scratch"):
        assert Image.open(curves / "plots" / f"curve_{setting}.png").size[0] > 300
    html_text = (curves / "report.html").read_text()
    parser = _ReportParser()
    parser.feed(html_text)
    assert "Learning curves" in html_text and "2 labelled tiles per class" in html_text
    assert {"teacher", "test macro F1", "chance (1/classes)", "verdict", "setting", "kd"} <= set(parser.headers)
    assert "same (teacher t) — weak teacher" in html_text  # a tiny teacher cannot clear chance + 0.99
    assert "weak teacher" in (curves / "compare.log").read_text()
    assert "scratch (teacher t) — weak teacher" in html_text
    curve_alts = [a for a in parser.alts if "labelled tiles per class" in a]
    assert len(curve_alts) == 2


def test_screenshot_of_a_report_with_learning_curves_is_not_blank(curves, tmp_path):
    require_chromium()
    png = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(curves / "report.html"),
                           str(png), "--height", "2400"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert Image.open(png).size[1] == 2400


def test_curve_tables_print_the_paired_differences_of_each_size(curves, capsys):
    tables = load_script("curve_tables", "benchmarks")
    assert tables.main([str(curves)]) == 0
    printed = capsys.readouterr().out
    results = pd.read_csv(curves / "results.csv", dtype={"size": str})
    same = results[(results["setting"] == "same") & (results["size"] == "2")].set_index(["fold", "seed", "method"])
    by_hand = (same.xs("kd", level="method")["best_macro_f1"] - same.xs("none", level="method")["best_macro_f1"]).mean()
    kd_line = next(line for line in printed.splitlines() if line.startswith("| 2 | kd |"))
    assert f"{by_hand:+.3f}" in kd_line
    assert tables.main([str(curves / "cells")]) == 2  # not a compare folder: one line, exit 2


def test_teacher_agreement_is_one_for_the_teacher_s_own_predictions_and_zero_for_their_opposite(curves, tmp_path):
    import torch

    folder = tmp_path / "curves"
    shutil.copytree(curves, folder)
    agreement = load_script("teacher_agreement", "benchmarks")
    model = folder / "cells/same/kd/size-2/fold0-seed0"
    config = yaml.safe_load((model / "config.yaml").read_text())
    teacher = agreement.teacher_predictions(config["distill"]["teacher"], config["data"]["source"], model / "split.csv",
                                            {}, torch.device("cpu"))
    classes = sorted(teacher["label"].unique())
    for name, predictions in (("echo", teacher["prediction"]),
                              ("contrary", teacher["prediction"].map(lambda c: classes[1 - classes.index(c)]))):
        cell = folder / "cells/same" / name / "size-2/fold0-seed0"
        shutil.copytree(model, cell)
        teacher.assign(prediction=predictions).to_csv(cell / agreement.PREDICTIONS, index=False)
    rows = agreement.agreement_rows(folder, ["same"], torch.device("cpu")).set_index(["method", "size", "run"])
    assert rows.loc[("echo", "2", "fold0-seed0"), "agreement"] == 1.0
    assert rows.loc[("contrary", "2", "fold0-seed0"), "agreement"] == 0.0
    echo = rows.loc[("echo", "2", "fold0-seed0")]
    assert echo["student_macro_f1"] == pytest.approx(echo["teacher_macro_f1"])
    assert len(rows) == 2 * 2 * 2 + 2  # none and kd, 2 sizes, 2 folds, and the two planted cells


def test_shards_are_disjoint_deterministic_and_cover_the_grid():
    from moma.compare.plan import Cell, parse_shard, shard_cells

    cells = [Cell("s", m, k, 0) for k in range(3) for m in ("a", "b", "c")]
    shares = [shard_cells(cells, k, 3) for k in (1, 2, 3)]
    assert set().union(*shares) == set(cells) and sum(map(len, shares)) == len(cells)
    assert shard_cells(cells, 2, 3) == {cells[1], cells[4], cells[7]}
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_two_shards_run_concurrently_into_one_folder(data, tmp_path):
    """Two processes share one folder: the teacher is trained once (the other waits for it), every
    cell once, and the report that the later one writes covers both shares."""
    tree = tiny_compare(tmp_path, data["target"], {"data": {"source": str(data["teacher"])}}, name="sharded")
    config = write_yaml(tmp_path / "sharded.yaml", tree)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "moma", "compare", str(config), "--shard", f"{k}/2"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    out = tmp_path / "compare" / "sharded"
    log_text = (out / "compare.log").read_text()
    assert log_text.count("teacher t trained") == 1
    for cell in CELLS:
        assert log_text.count(f"cell {cell} trained") == 1, cell
    results = pd.read_csv(out / "results.csv")
    assert (results["status"] == "done").all() and len(results) == len(CELLS)


def test_report_only_merges_the_finished_cells_of_a_partial_run(finished, data, monkeypatch, tmp_path):
    from moma.cli import main

    tree = tiny_compare(tmp_path, data["target"], {"checkpoint": str(finished["out"] / "teachers/t/best.safetensors")})
    tree["methods"] = ["none"]
    config = write_yaml(tmp_path / "partial.yaml", tree)
    counting(monkeypatch, replacement=copy_finished_run(finished["out"]))
    out = run_compare(config, shard="1/2")  # trains fold 0 only
    (out / "report.html").unlink()
    assert main(["compare", str(config), "--report-only"]) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(results["status"]) == ["done", "pending"]
    assert "1 done, 0 failed, 0 not applicable, 1 pending" in (out / "report.html").read_text()
    assert main(["compare", str(config), "--report-only", "--shard", "1/2"]) == 2
    assert main(["compare", str(tmp_path / "partial.yaml"), "--report-only", "--out", str(tmp_path / "none")]) == 2
def test_a_method_entry_temperature_is_refused_with_the_new_names(tmp_path):
    tree = yaml.safe_load((ROOT / "configs" / "compare" / "smoke.yaml").read_text())
    tree["methods"] = {"none": None, "moma": {"temperature": 0.2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"methods.moma.*'temperature' is now 'kl_temperature'.*under params"):
        load_compare_config(path)

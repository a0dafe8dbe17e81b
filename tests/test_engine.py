import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moma.engine.runs import run_training
from moma.errors import CheckpointError, ConfigError, DataError

from conftest import interrupt_run


def test_training_learns_separable_tiles(tile_folder, make_config):
    cfg = make_config(tile_folder, optim={"epochs": 4, "lr": 0.05})
    results = run_training(cfg)
    run_dir = results.run_dir
    history = pd.read_csv(f"{run_dir}/history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert results.test_metrics("best")["accuracy"] >= 0.9  # chance is 1/3
    metrics = json.loads(open(f"{run_dir}/metrics.json").read())
    for key in ("accuracy", "macro_f1", "kappa", "qwk"):
        assert key in metrics["best"]["test"] and key in metrics["last"]["test"]
    for name in ("config.yaml", "split.csv", "best.safetensors", "state.pt", "curves.png", "confusion_test_best.png",
                 "confusion_test_best.csv", "predictions_test_best.csv", "environment.json", "train.log"):
        assert Path(run_dir, name).is_file(), name


def test_a_second_run_never_overwrites_the_first(tile_folder, make_config):
    cfg = make_config(tile_folder, optim={"epochs": 1})
    first = run_training(cfg).run_dir
    second = run_training(cfg).run_dir
    assert first != second and second.endswith("t-2")


def test_resume_after_interruption_gives_identical_weights(tile_folder, make_config, monkeypatch):
    cfg = make_config(tile_folder, optim={"epochs": 3}, augment={"randaugment": True, "stain_jitter": 0.05})
    reference = run_training(cfg).run_dir

    interrupt_run(cfg, monkeypatch)  # in the middle of the second epoch
    interrupted_dir = f"{cfg.run.output_dir}/t-2"
    resumed = run_training(cfg, resume_dir=interrupted_dir).run_dir
    assert resumed == interrupted_dir
    a, b = load_file(f"{reference}/last.safetensors"), load_file(f"{resumed}/last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert pd.read_csv(f"{resumed}/history.csv")["epoch"].tolist() == [1, 2, 3]
    assert open(f"{reference}/split.csv").read() == open(f"{resumed}/split.csv").read()


@pytest.mark.parametrize("teacher_bytes, message", [
    (None, "teacher.safetensors not found"),
    (b"\x00" * 64, "teacher.safetensors: not a readable safetensors file"),
])
def test_a_bad_teacher_fails_before_any_tile_is_read(tmp_path, make_config, monkeypatch, teacher_bytes, message):
    teacher = tmp_path / "teacher.safetensors"
    if teacher_bytes is not None:
        teacher.write_bytes(teacher_bytes)
    data = tmp_path / "huge-slide-archive"  # a folder that would take long to scan: it must never be opened
    data.mkdir()

    def no_scan(*args, **kwargs):
        raise AssertionError("the data was scanned before the teacher was checked")

    monkeypatch.setattr("moma.engine.builder.scan_tiles", no_scan)
    monkeypatch.setattr("moma.data.tiles.scan_tiles", no_scan)
    cfg = make_config(data, distill={"method": "kd", "teacher": str(teacher)})
    with pytest.raises(CheckpointError, match=message):
        run_training(cfg)
    assert not (tmp_path / "runs" / "t").exists()  # nothing left behind


def test_a_missing_student_weights_file_fails_before_any_tile_is_read(tmp_path, make_config, monkeypatch):
    monkeypatch.setattr("moma.engine.builder.scan_tiles", lambda *a, **k: pytest.fail("data scanned"))
    cfg = make_config(tmp_path, distill={"student_init": str(tmp_path / "nope.pt")})
    with pytest.raises(CheckpointError, match="weights file .*nope.pt not found"):
        run_training(cfg)


def test_a_momentum_teacher_of_another_architecture_fails_before_any_tile_is_read(tmp_path, make_config, monkeypatch):
    from conftest import write_teacher

    teacher = write_teacher(tmp_path / "teacher.safetensors", ["a", "b"], arch="test_efficientnet")
    monkeypatch.setattr("moma.engine.builder.scan_tiles", lambda *a, **k: pytest.fail("data scanned"))
    cfg = make_config(tmp_path, distill={"method": "moma", "teacher": str(teacher), "params": {"keys": "momentum"}})
    with pytest.raises(ConfigError, match="needs a teacher of the student's architecture .*model.arch=test_efficientnet"):
        run_training(cfg)


def test_metrics_json_round_trips_through_the_typed_result_and_reads_old_files(tmp_path):
    from moma.engine.result import ModelScores, RunResult

    result = RunResult(run_dir="r", classes=["a", "b"], select_metric="macro_f1", best_epoch=2, epochs=3,
                       best=ModelScores(val={"macro_f1": 0.5}, test={"macro_f1": 0.75, "accuracy": 0.8}),
                       data={"train": 10}, train_seconds=3.5, peak_memory_mb=100.0,
                       history=[{"train_loss": 1.0, "train_kd": 0.25, "val_macro_f1": 0.5}])
    result.write(tmp_path)
    back = RunResult.read(tmp_path)
    assert back == result
    assert back.test_metrics()["macro_f1"] == 0.75 and math.isnan(back.test_metrics()["auc"])
    assert math.isnan(back.test_metrics("last")["accuracy"])  # no last model recorded
    assert back.last_epoch_terms() == {"kd": 0.25} and back.train_tiles_per_class == 5
    (tmp_path / "metrics.json").write_text('{"run_dir": "old", "best": {"test": {"accuracy": 1.0}}, "retired_key": 1}')
    old = RunResult.read(tmp_path)  # a key a later version dropped, and keys an older one lacked
    assert old.test_metrics()["accuracy"] == 1.0 and old.history == [] and old.classes == []
    (tmp_path / "metrics.json").write_text("[1, 2")
    with pytest.raises(DataError, match="metrics.json is not a run's metrics file"):
        RunResult.read(tmp_path)

"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors, no tracebacks."""

import json
import os
import subprocess
import sys

import pytest

from conftest import make_tile_folder

TINY = ["--arch", "test_resnet", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "augment.randaugment=false"]


def moma(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "moma", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("moma: error")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_unknown_config_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  epochz: 3\n")
    assert_one_line_error(moma("train", config), "unknown config key 'optim.epochz'")


def test_corrupt_image(tmp_path):
    root = make_tile_folder(tmp_path / "d", per_class=4, manifest=False)
    (root / "tumour" / "bad.png").write_bytes(b"garbage")
    result = moma("train", "--data", root, "--out", tmp_path / "runs", *TINY)
    assert_one_line_error(result, "bad.png: cannot read image")
    assert not (tmp_path / "runs" / "run").exists()  # a failed start leaves no run folder behind


def test_empty_class_folder(tmp_path):
    root = make_tile_folder(tmp_path / "d", per_class=4, manifest=False)
    (root / "necrosis").mkdir()
    assert_one_line_error(moma("train", "--data", root, *TINY), "necrosis holds no image tiles")


def test_debug_shows_the_traceback(tmp_path):
    result = moma("--debug", "train", "--data", tmp_path / "nowhere", *TINY)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_methods_lists_the_registry():
    result = moma("methods")
    assert result.returncode == 0
    assert "none" in result.stdout and "kd" in result.stdout and "Hinton" in result.stdout


def test_train_evaluate_predict_info_end_to_end(tmp_path):
    root = make_tile_folder(tmp_path / "d", per_class=12)
    result = moma("train", "--data", root, "--out", tmp_path / "runs", "--name", "cli", *TINY)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "cli"
    assert f"run folder: {run}" in result.stdout

    evaluated = moma("evaluate", run, root, "--split-file", run / "split.csv", "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout[: evaluated.stdout.rindex("}") + 1])
    saved = json.loads((run / "metrics.json").read_text())["best"]["test"]
    assert scores["accuracy"] == pytest.approx(saved["accuracy"])  # same tiles, same model, same number
    assert (tmp_path / "eval" / "confusion_eval.png").is_file()
    assert_one_line_error(moma("evaluate", run, root, "--out", tmp_path / "eval"), "exists and is not empty")
    for expected in ("evaluation", "evaluation-2"):  # the default folder is per run and never overwritten
        again = moma("evaluate", run, root, "--split-file", run / "split.csv")
        assert again.returncode == 0 and f"reports written to {run / expected}" in again.stdout, again.stderr

    predicted = moma("predict", run / "best.safetensors", root / "tumour", "--out", tmp_path / "pred.csv")
    assert predicted.returncode == 0, predicted.stderr
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == "path,prediction,prob_immune,prob_stroma,prob_tumour" and len(lines) == 13

    info = moma("info", run / "best.safetensors")
    meta = json.loads(info.stdout)
    assert meta["arch"] == "test_resnet" and meta["class_names"] == ["immune", "stroma", "tumour"] and meta["image_size"] == 32

    resumed = moma("train", "--resume", run)
    assert resumed.returncode == 0  # already complete: resuming only re-reports
    assert "best epoch" in resumed.stdout


def run_in_process(*argv):
    from moma import cli

    args = cli.build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def test_resume_honours_the_flags_that_make_sense_and_refuses_the_others(tile_folder, make_config, capsys):
    import pandas as pd

    from moma.engine.runs import run_training
    from moma.errors import ConfigError

    run = run_training(make_config(tile_folder, optim={"epochs": 1})).run_dir
    for flag, value in (("--arch", "resnet18"), ("--lr", "0.1"), ("--data", tile_folder), ("--name", "other")):
        with pytest.raises(ConfigError, match=f"{flag} cannot change on resume .allowed: --epochs, --device"):
            run_in_process("train", "--resume", run, flag, value)
    assert run_in_process("train", "--resume", run, "--epochs", "2", "--device", "cpu", "--profile") == 0
    assert pd.read_csv(f"{run}/history.csv")["epoch"].tolist() == [1, 2]  # --epochs extended the run
    assert "best epoch" in capsys.readouterr().out


def test_config_checks_the_methods_parameters():
    result = moma("config", "--method", "moma", "--set", "distill.params.queue_sise=64")
    assert_one_line_error(result, "unknown config key 'distill.params.queue_sise' (method 'moma' takes: preset, keys, momentum,")
    assert_one_line_error(moma("config", "--method", "kdd"), "distill.method 'kdd' is unknown")
    shown = moma("config", "--method", "moma", "--set", "distill.params.queue_size=64")
    assert shown.returncode == 0 and "queue_size: 64" in shown.stdout

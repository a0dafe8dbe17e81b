"""The training state cannot run code: it is read with ``torch.load(weights_only=True)``, and a
file that is not our state is refused with one line that names it, before any data is read."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys

import pytest
import torch

from moma.engine.state import load_training_state, rng_state, save_training_state, set_rng_state
from moma.engine.runs import run_training
from moma.errors import CheckpointError


class CreatesAFile:
    """Unpickling this object opens (so creates) a file: a stand-in for a payload that runs a command."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return builtins.open, (self.target, "w")


def moma_cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "moma", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture
def finished_run(tile_folder, make_config):
    cfg = make_config(tile_folder, optim={"epochs": 1})
    return cfg, run_training(cfg).run_dir


def test_a_state_that_would_run_code_is_refused_by_resume(finished_run, tmp_path):
    _, run_dir = finished_run
    state = os.path.join(run_dir, "state.pt")
    # The payload works: a full unpickle of such a file creates the file it names.
    probe = tmp_path / "probe.pt"
    torch.save({"task": CreatesAFile(tmp_path / "created-by-probe")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "created-by-probe").exists()

    marker = tmp_path / "created-by-resume"
    torch.save({"epoch": 1, "task": CreatesAFile(marker)}, state)
    result = moma_cli("train", "--resume", run_dir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("moma: error")]
    assert len(errors) == 1 and "state.pt" in errors[0] and "refused" in errors[0], result.stderr
    assert not marker.exists()


def test_damaged_and_foreign_states_name_the_file_and_the_problem(finished_run, tmp_path):
    _, run_dir = finished_run
    good = load_training_state(os.path.join(run_dir, "state.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(run_dir, "state.pt"), "rb").read()[:200])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: cannot be read, the file is damaged"):
        load_training_state(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a moma-distill training state"):
        load_training_state(foreign)
    incomplete = tmp_path / "incomplete.pt"
    save_training_state(incomplete, {k: v for k, v in good.items() if k not in ("task", "format", "version")})
    with pytest.raises(CheckpointError, match=r"incomplete\.pt: incomplete, missing 'task'"):
        load_training_state(incomplete)


def test_resume_with_a_damaged_state_is_one_line_before_the_data_is_read(finished_run, monkeypatch):
    cfg, run_dir = finished_run
    state = load_training_state(os.path.join(run_dir, "state.pt"))
    del state["optimizer"]
    torch.save(state, os.path.join(run_dir, "state.pt"))

    def no_scan(*args, **kwargs):
        raise AssertionError("the data was scanned before the state was checked")

    monkeypatch.setattr("moma.engine.builder.scan_tiles", no_scan)
    with pytest.raises(CheckpointError, match="state.pt: incomplete, missing 'optimizer'"):
        run_training(cfg, resume_dir=run_dir)


def test_the_state_is_plain_and_restores_every_generator(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_training_state(tmp_path / "s.pt", {"rng": saved, "history": [{"loss": np.float64(0.5)}]})
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)  # readable by the restricted loader
    assert loaded["history"] == [{"loss": 0.5}] and type(loaded["history"][0]["loss"]) is float
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    with pytest.raises(TypeError, match=r"state.history\[0\].when: datetime is not allowed"):
        import datetime

        save_training_state(tmp_path / "t.pt", {"history": [{"when": datetime.datetime.now()}]})


def test_a_state_of_another_model_is_one_line_naming_the_file(tmp_path):
    from moma.engine.state import load_matching

    with pytest.raises(CheckpointError, match=r"s.pt does not fit this run's model \(missing bias; unexpected extra"):
        load_matching(torch.nn.Linear(2, 1), {"weight": torch.zeros(1, 2), "extra": torch.zeros(1)}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"s.pt does not fit this run's model \(size mismatch for weight"):
        load_matching(torch.nn.Linear(2, 1), {"weight": torch.zeros(3, 2), "bias": torch.zeros(1)}, tmp_path / "s.pt")

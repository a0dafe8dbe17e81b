"""Multi-process training on CPU with gloo.

The end-to-end tests start this file as a worker under ``torchrun --standalone`` (or as two
plain processes with the torchrun environment variables): ``python tests/test_distributed.py
MODE OUT_DIR -- <moma command line>``. The worker installs recording hooks, runs ``moma.cli.main``
and writes what it saw per rank to OUT_DIR; the tests compare the ranks' records. The collective
helpers are checked in two processes started with ``torch.multiprocessing``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moma.engine import distributed
from moma.utils import collectives
from moma.engine.state import load_training_state
from moma.errors import ConfigError
from conftest import write_teacher

HERE = Path(__file__).resolve()
CLASSES = ["immune", "stroma", "tumour"]  # conftest's tile classes, sorted


# ----------------------------------------------------------------------------- pure permutation logic


def test_shuffled_slices_cover_the_global_batch_and_unshuffle_restores_it():
    order = torch.tensor([4, 0, 3, 1, 2])
    sizes = [3, 2]  # ranks may hold different numbers of samples
    assert collectives.rank_offsets(sizes) == [0, 3]
    assert collectives.shuffled_slice(order, sizes, 0).tolist() == [4, 0, 3]
    assert collectives.shuffled_slice(order, sizes, 1).tolist() == [1, 2]
    samples = torch.tensor([[10.0], [11.0], [12.0], [13.0], [14.0]])  # row i = global sample i
    computed = torch.cat([samples[collectives.shuffled_slice(order, sizes, r)] for r in (0, 1)])
    assert computed.flatten().tolist() == [14.0, 10.0, 13.0, 11.0, 12.0]  # rows in the shuffled order
    restored = collectives.unshuffle(computed, order)
    assert torch.equal(restored, samples)
    assert collectives.rank_rows(restored, sizes, 1).flatten().tolist() == [13.0, 14.0]  # rank 1's own samples


def test_sample_seeds_differ_by_sample_and_epoch_and_order_is_per_epoch():
    seeds = {distributed.sample_seed(0, e, i) for e in range(3) for i in range(100)}
    assert len(seeds) == 300
    sampler = distributed.EpochSampler(10, seed=3, info=distributed.DistInfo())
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and [i for i, _ in first] != [i for i, _ in second]
    assert sorted(i for i, _ in first) == list(range(10))
    assert first[0][1] == distributed.sample_seed(3, 0, first[0][0])


def test_augmentation_depends_on_the_sample_seed_not_on_the_caller(tile_folder, make_config):
    from moma.engine.builder import build_data

    cfg = make_config(tile_folder, augment={"randaugment": True})
    train = build_data(cfg).train
    torch.manual_seed(1)
    a = train[(0, 7)][0]
    torch.manual_seed(2)
    b = train[(0, 7)][0]
    assert torch.equal(a, b) and not torch.equal(a, train[(0, 8)][0])
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(2)
    train[(0, 7)]
    assert torch.equal(torch.rand(3), expected)  # the caller's generator is left as it was


def test_two_process_sampler_splits_an_epoch_like_distributed_sampler():
    ranks = [distributed.EpochSampler(7, seed=0, info=distributed.DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    rows = [[i for i, _ in sampler] for sampler in ranks]
    assert len(rows[0]) == len(rows[1]) == 4  # 7 samples padded to 8
    assert set(rows[0]) | set(rows[1]) == set(range(7))


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.collective_timeout().total_seconds() == 150
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="positive number of minutes"):
        distributed.collective_timeout()


# ----------------------------------------------------------------------------- collectives in 2 processes


def _collectives_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = distributed.DistInfo(rank=rank, world_size=world)
    record = {}
    # rows of different lengths per rank
    record["gathered"] = collectives.all_gather_rows(torch.full((rank + 1, 2), float(rank)))
    # gradients: the method's second parameter has a gradient on rank 1 only
    method = torch.nn.Module()
    method.a, method.b, method.c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    method.a.grad = torch.tensor([1.0, 2.0]) * (rank + 1)
    method.b.grad = torch.tensor([4.0, 8.0]) if rank == 1 else None
    task = torch.nn.Module()
    task.method = method
    distributed.sync_method_grads(task, info)
    record["grads"] = [None if p.grad is None else p.grad.clone() for p in (method.a, method.b, method.c)]
    # CRD: each rank updates its banks with this step's rows of both ranks
    from moma.distill.base import Batch, MethodContext
    from moma.distill.crd import CRD
    from moma.models.taps import TapOutputs

    torch.manual_seed(100 + rank)  # different initial banks per rank: rank 0's must win
    probe = TapOutputs(logits=torch.zeros(2, 3), embedding=torch.zeros(2, 6))
    ctx = MethodContext(student=None, teacher=None, student_probe=probe, teacher_probe=probe, num_classes=3,
                        teacher_num_classes=3, num_train_samples=20, same_label_space=True)
    crd = CRD(CRD.parse_params({"nce_k": 4, "feat_dim": 5, "negatives": "other_sample"}), ctx).train()
    distributed.broadcast_module_state(crd, info)
    record["bank_before"] = crd.memory_s.clone()
    torch.manual_seed(10 + rank)  # each rank its own batch and negatives
    index = torch.tensor([0, 1, 2]) + 10 * rank
    student, teacher = (TapOutputs(logits=torch.zeros(3, 3), embedding=torch.randn(3, 6)) for _ in range(2))
    crd(student, teacher, Batch(torch.zeros(3, 3, 4, 4), torch.zeros(3, dtype=torch.long), index))
    crd.after_step()
    record["crd"] = {k: v.clone() for k, v in crd.state_dict().items()}
    torch.save(record, f"{out}/collectives_{rank}.pt")
    dist.destroy_process_group()


def test_gather_grad_sync_and_crd_banks_agree_across_two_processes(tmp_path):
    torch.multiprocessing.spawn(_collectives_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    records = [torch.load(tmp_path / f"collectives_{r}.pt") for r in (0, 1)]
    expected_rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for record in records:
        assert torch.equal(record["gathered"], expected_rows)
        a, b, c = record["grads"]
        assert a.tolist() == [1.5, 3.0]  # (1 + 2) / 2, (2 + 4) / 2
        assert b.tolist() == [2.0, 4.0]  # rank 0 had none: it counts as zero, as in DDP
        assert c is None  # no rank had one: the optimiser skips it everywhere
    bank_0, bank_1 = records[0]["crd"], records[1]["crd"]
    for key in bank_0:
        assert torch.equal(bank_0[key], bank_1[key]), key
    assert torch.equal(records[0]["bank_before"], records[1]["bank_before"])  # rank 0's initial bank everywhere
    changed = (bank_0["memory_s"] != records[0]["bank_before"]).any(dim=1)
    assert torch.nonzero(changed).flatten().tolist() == [0, 1, 2, 10, 11, 12]  # both ranks' samples
    assert torch.equal(bank_0["normaliser"], bank_1["normaliser"]) and bool((bank_0["normaliser"] > 0).all())


# ----------------------------------------------------------------------------- torchrun end to end


def _worker(mode: str, out: Path, argv: list[str]) -> int:
    """Runs in each torchrun process: recording hooks, then the moma command line."""
    from moma import cli
    from moma.distill.moma import MoMA
    from moma.engine import trainer as trainer_module

    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    original_attend, original_step = MoMA._attend_keys, trainer_module.Trainer._step
    seen = {}

    def recording_attend(self, keys, all_keys):
        positive, enqueued = original_attend(self, keys, all_keys)
        if "keys" not in seen:
            seen.update(keys=keys.clone(), all_keys=all_keys.clone(), enqueued=enqueued.clone())
        return positive, enqueued

    def recording_step(self, batch, epoch, step):
        if mode == "fail" and rank == 1:
            raise RuntimeError("injected failure on rank 1")
        out_step = original_step(self, batch, epoch, step)
        if epoch == 0 and step == 0:
            with distributed.unwrapped_student(self.task) as task:
                params = {k: v.detach().clone() for k, v in task.named_parameters()}
            queue = self.task.method.queue
            torch.save({**seen, "params": params, "queue": queue.keys.clone(), "ptr": int(queue.ptr)},
                       out / f"step1_rank{rank}.pt")
        return out_step

    MoMA._attend_keys = recording_attend
    trainer_module.Trainer._step = recording_step
    return cli.main(argv)



def _distill_args(tiles: Path, teacher: Path, runs: Path, bf16: bool = False) -> list[str]:
    return ["distill", "--data", str(tiles), "--arch", "test_resnet", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--method", "moma", "--teacher", str(teacher), "--out", str(runs),
            "--set", "distill.params.queue_size=32", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "train.max_steps_per_epoch=2",
            "--set", "augment.randaugment=false", "--set", "data.val_fraction=0.25",
            "--set", "data.test_fraction=0.25", *(["--set", "train.amp=bf16"] if bf16 else [])]


def _worker_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture
def setup(tmp_path, tile_folder):
    return tile_folder, write_teacher(tmp_path / "teacher.safetensors", CLASSES), tmp_path / "runs", tmp_path / "records"


def test_torchrun_moma_run_gathers_keys_syncs_weights_and_resumes_in_one_process(setup):
    """Under bf16 autocast, so that the half-precision keys also travel through gloo."""
    tiles, teacher, runs, records = setup
    records.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE),
               "record", str(records), "--", *_distill_args(tiles, teacher, runs, bf16=True)]
    done = subprocess.run(command, env=_worker_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # only rank 0 reports

    r0, r1 = (torch.load(records / f"step1_rank{r}.pt") for r in (0, 1))
    n = r0["keys"].shape[0]
    # the queue received the keys of both ranks: the gathered keys are rank 0's and rank 1's, shuffled
    for record in (r0, r1):
        assert record["all_keys"].shape[0] == 2 * n
        both = torch.cat([r0["keys"], r1["keys"]])
        assert (both[:, None, :] == record["all_keys"][None]).all(dim=2).sum(dim=1).tolist() == [1] * (2 * n)
        assert record["ptr"] == 2 * n
        assert torch.equal(record["queue"][:2 * n], record["enqueued"].float())
    assert torch.equal(r0["all_keys"], r1["all_keys"]) and not torch.equal(r0["keys"], r1["keys"])
    assert torch.equal(r0["queue"], r1["queue"])
    # identical weights after a step: student, heads, attention and the EMA teacher
    assert r0["params"].keys() == r1["params"].keys()
    assert any(k.startswith("method.atts_q.") for k in r0["params"])
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key

    run_dir = runs / "run"
    state = load_training_state(run_dir / "state.pt")
    assert state["world_size"] == 2 and not any(".module." in k for k in state["task"])

    from moma.config import load_config
    from moma.engine.runs import run_training

    cfg = load_config(run_dir / "config.yaml", ["optim.epochs=2"])
    results = run_training(cfg, resume_dir=run_dir)  # this process: one rank
    assert results.epochs == 2
    resumed = load_training_state(run_dir / "state.pt")
    assert resumed["world_size"] == 1 and resumed["task"].keys() == state["task"].keys()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_error_on_one_rank_stops_every_rank_with_a_nonzero_exit(setup):
    tiles, teacher, runs, records = setup
    records.mkdir()
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **{distributed.TIMEOUT_ENV: "1"})
        command = [sys.executable, str(HERE), "fail", str(records), "--", *_distill_args(tiles, teacher, runs)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    elapsed = time.monotonic() - start
    assert [proc.returncode for proc in procs] == [1, 1], [err[-1500:] for _, err in outputs]
    assert "injected failure on rank 1" in outputs[1][1]
    assert elapsed < 50  # well before the 1-minute collective timeout: rank 0 notices the peer is gone


if __name__ == "__main__":
    mode, out, separator, *cli_args = sys.argv[1:]
    assert separator == "--"
    sys.exit(_worker(mode, Path(out), cli_args))

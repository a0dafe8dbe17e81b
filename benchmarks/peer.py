"""Training throughput of one distillation step: moma-distill's engine against torchdistill's.

One process, the same timm student/teacher pair (random weights, ``pretrained=False``), the same
synthetic batches (random images, random labels), the same SGD settings and loss weights:

- ours: ``build_task`` from a :class:`~moma.config.Config` and a saved teacher checkpoint, then
  exactly ``Trainer._step`` (DistillationTask forward, backward, SGD step, ``after_step``);
- theirs: torchdistill 1.1.5's ``DistillationBox`` built by ``get_distillation_box`` from a config
  dict (the layout of its ImageNet sample configs), fed the same tensors through
  ``forward_process`` + ``post_forward_process`` (backward and SGD step), without its data loaders.

Methods: ``kd`` (CE 0.1 + KL 0.9, T = 4, ``KDLoss``) and ``crd`` (CE 1 + CRD 0.8, 128-d
embeddings, K negatives, ``CRDLoss`` with ``Linear4CRD`` on both networks, the teacher's linear
trained as in torchdistill's config). torchdistill draws CRD negatives in its data set
(``CRDDatasetWrapper``, usually in loader workers); here they are drawn before timing, which
favours torchdistill, while ours draws them inside the timed step.

Ours and theirs alternate step by step within a round (ABAB..., the first flips every round), so
that load from other processes hits both alike; what counts is the ratio ours / theirs (images per
second) per round and its median over rounds.

    python benchmarks/peer.py                       # defaults: both pairs, kd and crd, 2 threads, <= ~5 min
    python benchmarks/peer.py --threads 1 --rounds 10 --budget-s 0   # steadier on a shared machine
    python benchmarks/peer.py --pairs resnet34:resnet18 --methods kd --rounds 3 --steps 5
    python benchmarks/peer.py --profile kd          # operator profile of a few steps of each, then exit
    python benchmarks/peer.py --fill-cost           # cost of deterministic mode's memory filling to our step
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

CLASSES = [f"class{i}" for i in range(10)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--pairs", default="resnet34:resnet18,efficientnet_b0:efficientnet_b0",
                        help="comma-separated teacher:student timm names")
    parser.add_argument("--methods", default="kd,crd", help="comma-separated: kd, crd")
    parser.add_argument("--crd-samples", type=int, default=20000, help="training-set size N (memory-bank rows)")
    parser.add_argument("--crd-k", type=int, default=16384, help="CRD negatives per anchor (RepDistiller's nce_k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="wall-clock budget: a comparison stops after the round that passes its share "
                             "(at least one round each); 0 = no limit")
    parser.add_argument("--determinism", choices=["own", "same"], default="own",
                        help="own: each runs under its own defaults (ours: Trainer's configure_determinism with "
                             "run.deterministic=true; torchdistill: torch's defaults); same: theirs under ours too")
    parser.add_argument("--profile", choices=["kd", "crd"], help="profile a few steps of the first pair and exit")
    parser.add_argument("--profile-lines", type=int, default=30, help="operators listed per profile")
    parser.add_argument("--fill-cost", action="store_true",
                        help="time our KD step with and without deterministic mode's memory filling, and exit")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ data
@dataclass
class Batches:
    images: list[torch.Tensor]
    targets: list[torch.Tensor]
    index: list[torch.Tensor]
    contrast_idx: list[torch.Tensor]  # torchdistill's CRD negatives (drawn as its CRDDatasetWrapper does)
    train_targets: torch.Tensor


def make_batches(args, count: int = 4) -> Batches:
    gen = torch.Generator().manual_seed(args.seed)
    train_targets = torch.randint(0, len(CLASSES), (args.crd_samples,), generator=gen)
    rng = np.random.default_rng(args.seed)
    images, targets, index, contrast = [], [], [], []
    for _ in range(count):
        rows = torch.randperm(args.crd_samples, generator=gen)[: args.batch_size]
        images.append(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen))
        targets.append(train_targets[rows])
        index.append(rows)
        contrast.append(torch.from_numpy(np.stack([_other_class_rows(rng, train_targets, int(r), args.crd_k) for r in rows])))
    return Batches(images, targets, index, contrast, train_targets)


def _other_class_rows(rng, train_targets: torch.Tensor, row: int, k: int) -> np.ndarray:
    pool = np.flatnonzero(train_targets.numpy() != int(train_targets[row]))
    negatives = rng.choice(pool, k, replace=k > len(pool))
    return np.concatenate([[row], negatives])


# ---------------------------------------------------------------------------- determinism
def determinism_flags() -> tuple[bool, bool, bool]:
    """The process-wide flags that ``configure_determinism`` sets (the cuDNN ones do not matter on CPU)."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)


def set_determinism_flags(flags: tuple[bool, bool, bool]) -> None:
    enabled, warn_only, fill = flags
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


# ------------------------------------------------------------------------------------ ours
class Ours:
    """moma-distill: build_task from a Config + teacher checkpoint, and the trainer's own step."""

    def __init__(self, args, teacher_arch: str, student_arch: str, method: str, batches: Batches, workdir: Path):
        from moma.config import build_config
        from moma.engine.builder import build_task
        from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
        from moma.engine.device import configure_determinism
        from moma.engine.distributed import DistInfo
        from moma.engine.schedule import build_optimizer
        from moma.engine.trainer import Trainer
        from moma.models.backbone import create_backbone

        teacher = create_backbone(teacher_arch, len(CLASSES))
        checkpoint = workdir / f"teacher_{teacher_arch}.safetensors"
        from moma.config import IMAGENET_MEAN, IMAGENET_STD

        save_model_checkpoint(checkpoint, teacher.state_dict(),
                              ModelMetadata(teacher_arch, CLASSES, args.image_size, list(IMAGENET_MEAN), list(IMAGENET_STD)))
        params = {"nce_k": args.crd_k} if method == "crd" else {}
        cfg = build_config({
            "run": {"device": "cpu", "seed": args.seed, "output_dir": str(workdir)},
            "data": {"image_size": args.image_size},
            "model": {"arch": student_arch},
            "optim": {"batch_size": args.batch_size, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                      "scheduler": "constant"},
            "train": {"amp": "off", "channels_last": False},
            "distill": {"method": method, "teacher": str(checkpoint), "student_init": "scratch", "kl_temperature": 4.0,
                        "params": params},
        })
        before = determinism_flags()
        configure_determinism(cfg.run.deterministic)  # as Trainer.__init__; process-wide, so each step sets its own
        self.flags = determinism_flags()
        set_determinism_flags(before)
        device = torch.device("cpu")
        self.task, self.info = build_task(cfg, CLASSES, args.crd_samples, device, train_targets=batches.train_targets)
        optimizer = build_optimizer(cfg, self.task.trainable_parameters(), args.batch_size)
        self.state = SimpleNamespace(
            cfg=cfg, device=device, amp_dtype=None, task=self.task, train_model=self.task, optimizer=optimizer,
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), dist=DistInfo.from_env(),
        )
        self._step = Trainer._step
        self.batches = batches
        self.count = 0
        self.task.train()

    def step(self) -> None:
        from moma.distill.base import Batch

        set_determinism_flags(self.flags)
        i = self.count % len(self.batches.images)
        batch = Batch(self.batches.images[i], self.batches.targets[i], self.batches.index[i])
        self._step(self.state, batch, 0, self.count)
        self.count += 1


# ---------------------------------------------------------------------------------- theirs
def _kd_term(alpha: float, beta: float) -> dict:
    return {"criterion": {"key": "KDLoss", "kwargs": {
        "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
        "teacher_module_io": "output", "temperature": 4.0, "alpha": alpha, "beta": beta, "reduction": "batchmean"}},
        "weight": 1.0}


def _ce_term(weight: float) -> dict:
    return {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                "target": {"uses_label": True}}},
            "weight": weight}


def _crd_wrapper(in_features: int) -> dict:
    return {"key": "Linear4CRD", "kwargs": {"input_module_path": "model.global_pool", "power": 2,
                                             "linear_kwargs": {"in_features": in_features, "out_features": 128,
                                                               "bias": True}}}


def torchdistill_config(method: str, lr: float, momentum: float, weight_decay: float, teacher_dim: int,
                        student_dim: int, num_samples: int, k: int) -> dict:
    """A DistillationBox config in the layout of torchdistill's ImageNet sample configs."""
    optimizer = {"key": "SGD", "kwargs": {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}}
    if method == "kd":
        return {"num_epochs": 1, "optimizer": optimizer,
                "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
                "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
                "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": _kd_term(0.1, 0.9)}}}}
    crd = {"criterion": {"key": "CRDLoss", "kwargs": {
        "teacher_norm_module_path": "normalizer", "student_norm_module_path": "normalizer",
        "student_empty_module_path": "empty", "input_size": 128, "output_size": num_samples,
        "num_negative_samples": k, "num_samples": num_samples, "temperature": 0.07, "momentum": 0.5, "eps": 1e-7}},
        "weight": 0.8}
    return {"num_epochs": 1, "optimizer": optimizer,
            "teacher": {"forward_proc": "forward_batch_supp_dict", "auxiliary_model_wrapper": _crd_wrapper(teacher_dim),
                        "forward_hook": {"input": [], "output": ["model.global_pool", "normalizer"]},
                        "requires_grad": True, "frozen_modules": ["model"]},
            "student": {"forward_proc": "forward_batch_supp_dict", "auxiliary_model_wrapper": _crd_wrapper(student_dim),
                        "forward_hook": {"input": ["empty"], "output": ["model.global_pool", "normalizer"]},
                        "requires_grad": True},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": _ce_term(1.0), "crd": crd}}}}


class Theirs:
    """torchdistill: a DistillationBox with the same networks (copies of ours) and settings."""

    def __init__(self, args, ours: Ours, method: str, batches: Batches):
        from torchdistill.core.distillation import get_distillation_box

        student = copy.deepcopy(ours.task.student_tap.model)
        teacher = copy.deepcopy(ours.task.teacher.model).eval()
        group = ours.state.optimizer.param_groups[0]
        config = torchdistill_config(method, group["lr"], group["momentum"], group["weight_decay"],
                                     teacher.num_features, student.num_features, args.crd_samples, args.crd_k)
        self.box = get_distillation_box(teacher, student, {}, config, torch.device("cpu"), None, False, 1)
        self.box.pre_epoch_process(epoch=0)
        self.box.teacher_model.eval()  # torchdistill leaves the teacher's mode to the caller
        if method == "crd":
            self.box.teacher_model.normalizer.train()
        self.method = method
        self.batches = batches
        self.count = 0
        # torchdistill sets no determinism flags: torch's defaults, unless asked to run under ours
        self.flags = ours.flags if args.determinism == "same" else determinism_flags()

    def step(self) -> None:
        set_determinism_flags(self.flags)
        i = self.count % len(self.batches.images)
        supp = {}
        if self.method == "crd":
            supp = {"pos_idx": self.batches.index[i], "contrast_idx": self.batches.contrast_idx[i]}
        loss = self.box.forward_process(self.batches.images[i], self.batches.targets[i], supp)
        self.box.post_forward_process(loss=loss)
        self.count += 1


# --------------------------------------------------------------------------------- timing
def timed_round(ours, theirs, steps: int, ours_first: bool) -> tuple[float, float]:
    """Seconds spent by each in ``steps`` steps, interleaved step by step (ABAB...), so that a load
    change from other processes hits both alike."""
    spent = {id(ours): 0.0, id(theirs): 0.0}
    order = (ours, theirs) if ours_first else (theirs, ours)
    for _ in range(steps):
        for runner in order:
            start = time.perf_counter()
            runner.step()
            spent[id(runner)] += time.perf_counter() - start
    return spent[id(ours)], spent[id(theirs)]


def compare(args, teacher_arch: str, student_arch: str, method: str, batches: Batches, workdir: Path,
            deadline: float = float("inf")) -> dict:
    ours = Ours(args, teacher_arch, student_arch, method, batches, workdir)
    theirs = Theirs(args, ours, method, batches)
    for runner in (ours, theirs):
        for _ in range(args.warmup):
            runner.step()
    rows = []
    images = args.steps * args.batch_size
    for r in range(args.rounds):
        seconds_ours, seconds_theirs = timed_round(ours, theirs, args.steps, ours_first=r % 2 == 0)
        ips_ours, ips_theirs = images / seconds_ours, images / seconds_theirs
        rows.append((ips_ours, ips_theirs, ips_ours / ips_theirs))
        print(f"  {teacher_arch}->{student_arch} {method} round {r + 1}: ours {ips_ours:6.1f} img/s  "
              f"theirs {ips_theirs:6.1f} img/s  ratio {ips_ours / ips_theirs:.3f}", flush=True)
        if time.perf_counter() > deadline and r + 1 < args.rounds:
            print(f"  time budget reached: {r + 1} of {args.rounds} rounds", flush=True)
            break
    ratios = [row[2] for row in rows]
    result = {"pair": f"{teacher_arch} -> {student_arch}", "method": method, "rounds": len(rows),
              "ours": statistics.median(r[0] for r in rows), "theirs": statistics.median(r[1] for r in rows),
              "median": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}
    del ours, theirs
    gc.collect()
    return result


def op_profiles(ours, theirs, steps: int) -> tuple[dict, dict]:
    """aten op -> (calls per step, self CPU ms per step) for each, from torch.profiler; the steps
    alternate, one profiled step each, so that load from other processes hits both alike."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    totals = ({}, {})
    for _ in range(steps):
        for runner, table in zip((ours, theirs), totals):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.step()
            for e in prof.key_averages():
                calls, ms = table.get(e.key, (0, 0.0))
                table[e.key] = (calls + e.count / steps, ms + e.self_cpu_time_total / 1000 / steps)
    return totals


def profile(args, batches: Batches, workdir: Path) -> None:
    """Which operators each implementation runs per step, and where the two differ. Op counts do
    not depend on the machine's load; times do (they are per step, self CPU, in ms)."""
    teacher_arch, student_arch = args.pairs.split(",")[0].split(":")
    ours = Ours(args, teacher_arch, student_arch, args.profile, batches, workdir)
    theirs = Theirs(args, ours, args.profile, batches)
    for runner in (ours, theirs):
        for _ in range(args.warmup):
            runner.step()
    mine, peer = op_profiles(ours, theirs, args.steps)
    print(f"===== {teacher_arch} -> {student_arch} {args.profile}: per step, {args.steps} steps profiled")
    for name, table in (("ours", mine), ("theirs", peer)):
        calls = sum(c for c, _ in table.values())
        total = sum(t for _, t in table.values())
        print(f"{name:>7}: {calls:7.0f} op calls, {total:8.1f} ms self CPU; heaviest: " + ", ".join(
            f"{k} {t:.0f} ms" for k, (_, t) in sorted(table.items(), key=lambda kv: -kv[1][1])[:6]))
    print(f"\n{'operator':<44}{'calls ours':>11}{'calls theirs':>13}{'ms ours':>10}{'ms theirs':>11}")
    differing = [k for k in set(mine) | set(peer) if mine.get(k, (0, 0))[0] != peer.get(k, (0, 0))[0]]
    for key in sorted(differing, key=lambda k: -max(mine.get(k, (0, 0))[1], peer.get(k, (0, 0))[1]))[:args.profile_lines]:
        (c_o, t_o), (c_t, t_t) = mine.get(key, (0, 0.0)), peer.get(key, (0, 0.0))
        print(f"{key[:43]:<44}{c_o:>11.0f}{c_t:>13.0f}{t_o:>10.2f}{t_t:>11.2f}")


def fill_cost(args, batches: Batches, workdir: Path) -> None:
    """What deterministic mode's ``fill_uninitialized_memory`` (on before ``configure_determinism``
    switched it off) costs our KD step: the same runner alternates between the two settings."""
    for pair in args.pairs.split(","):
        teacher_arch, student_arch = pair.split(":")
        ours = Ours(args, teacher_arch, student_arch, "kd", batches, workdir)
        enabled, warn_only, _ = ours.flags
        filled, unfilled = (enabled, warn_only, True), (enabled, warn_only, False)
        for _ in range(args.warmup):
            ours.step()
        ratios = []
        for r in range(args.rounds):
            spent = {filled: 0.0, unfilled: 0.0}
            for _ in range(args.steps):
                for flags in ((filled, unfilled) if r % 2 == 0 else (unfilled, filled)):
                    ours.flags = flags
                    start = time.perf_counter()
                    ours.step()
                    spent[flags] += time.perf_counter() - start
            ratios.append(spent[filled] / spent[unfilled])
        print(f"{teacher_arch} -> {student_arch}: step time with / without filling, per round: "
              + " ".join(f"{x:.3f}" for x in ratios) + f"; median {statistics.median(ratios):.3f}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    import timm
    import torchdistill

    print(f"torch {torch.__version__}, timm {timm.__version__}, torchdistill {torchdistill.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.image_size} px, "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps, "
          f"determinism flags: {args.determinism}", flush=True)
    batches = make_batches(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            profile(args, batches, Path(tmp))
            return
        if args.fill_cost:
            fill_cost(args, batches, Path(tmp))
            return
        combos = [(*pair.split(":"), method) for pair in args.pairs.split(",") for method in args.methods.split(",")]
        start, results = time.perf_counter(), []
        for i, (teacher_arch, student_arch, method) in enumerate(combos):
            deadline = start + args.budget_s * (i + 1) / len(combos) if args.budget_s > 0 else float("inf")
            results.append(compare(args, teacher_arch, student_arch, method, batches, Path(tmp), deadline))
    print("\n| pair (teacher -> student) | method | rounds | ours img/s | torchdistill img/s | ours / theirs, median | range |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['pair']} | {r['method']} | {r['rounds']} | {r['ours']:.1f} | {r['theirs']:.1f} | {r['median']:.3f} | "
              f"{r['low']:.3f} - {r['high']:.3f} |")


if __name__ == "__main__":
    main()

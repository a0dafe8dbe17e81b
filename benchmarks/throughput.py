"""Training throughput: images per second of one training step per method, and of the input pipeline.

One process, one student/teacher pair (same architecture, random weights), the shipped demo tiles
(``data/demo/glas_colon``, 600 tiles, 2 classes) at 64 px, batch 32 by default:

1. **Step cost per method.** Each variant is a real :class:`~moma.engine.trainer.Trainer` (the
   config of ``moma distill``); its ``_step`` (task forward, backward, optimiser step,
   ``after_step``) is timed on the same pre-loaded batches, without data loading. The variants run
   one after the other, interleaved over several rounds with the order rotated every round, so
   that load from other processes hits all alike; the table gives the median images/s and the
   median per-round ratio to ``none`` (and of MoMA to ``kd``).

   - ``none``: the student alone (cross-entropy).
   - ``kd``: + one teacher pass (same classes), KL term.
   - ``crd``: + one teacher pass, embeddings, two memory banks.
   - ``moma``: MoMA's default preset with a teacher of the same classes (KL on): one teacher pass
     (keys and KL logits), EMA update, heads, batch attention, queue (``auto``: the training set).
   - ``moma-official``: ``preset=official-code``: two teacher passes (logits before the EMA update,
     keys after it), two frozen key attentions, queue of 16384.
   - ``moma-cross``: the default with a teacher of other classes (KL off): one teacher pass.
   - ``moma-teacher``: keys from the frozen teacher (``keys: teacher``, what a student from random
     weights or of another architecture gets), teacher of the same classes: one teacher pass (keys
     and KL logits), learnt key head and its EMA copy, in-batch negatives.

2. **Input pipeline.** The training loader alone (decoded tiles cached in memory, the training
   transforms with RandAugment) for several ``num_workers``: images/s.

3. **Data wait in training.** Two short epochs of ``kd`` per ``num_workers`` setting through
   ``Trainer.train_epoch``; the share of step time spent waiting for data in the second epoch
   (persistent workers are already running then), as ``moma distill --profile`` reports it.

4. **Where MoMA's extra time goes.** Its parts timed alone (process CPU time, median of repeats)
   next to KD's teacher pass: the key pass with split-batch BN, the EMA update, projection heads
   + batch attention + InfoNCE over the queue (forward and backward).

5. **A cached foundation-size teacher.** A KD step (resnet18 student by default) with a ViT-B/16
   teacher (``vit_base_patch16_224`` at ``--cache-image-size``, random weights) read from a teacher
   cache (``moma embed``, one stored view per tile), against the same step with the live ViT-B
   teacher and against a vanilla step (``none``), interleaved as in part 1. The cached step's time
   includes reading the batch's teacher outputs from the cache; the time to make the cache (one
   teacher forward per tile and view, once) is reported beside it.

**Tile store** (``--tile-store``, on its own, then exit): the training loader (the same
``num_workers`` for all) reading tiles decoded from their files on every read (``data.cache=off``),
from the uint8 tile store (``data.cache=disk``, built once before timing; its build time is
reported) and from memory (``data.cache=memory``), at each of ``--store-sizes``, doing per tile the
training transform (flips, 90-degree rotations, RandAugment), the same without RandAugment,
nothing (the uint8 tile as read: what a loader is left with when augmentation runs on whole batches
elsewhere), or ``data.augment_on=device`` (the loader hands out uint8 tiles in their flip/rotation
view and :class:`~moma.data.device_augment.DeviceAugment` converts and normalises each batch on the
device, in the main process, timed with the loader); medians of ``--store-rounds`` interleaved measurements of ``--loader-batches`` batches.
With ``--store-step`` also the student's own training step (``none``) at that size on the run's
device, so the loader can be set against it.

Everything runs with one torch thread by default (``--threads``; part 3: ``--wait-threads``,
e.g. 2 as a training run on 2 cores uses): step costs are given in wall-clock time and in
process CPU time, and on a shared machine only the latter is stable (with several threads,
OpenMP's spinning threads turn other processes' load into CPU time too).

    python benchmarks/throughput.py                          # defaults, a few minutes on 2 CPU cores
    python benchmarks/throughput.py --arch efficientnet_b0 --rounds 3 --steps 4
    python benchmarks/throughput.py --profile moma-official     # operator profile of a few steps, then exit
    python benchmarks/throughput.py --skip steps,loader,wait,parts   # part 5 only: cached vs live ViT-B teacher
    python benchmarks/throughput.py --tile-store     # loader tiles/s: files vs tile store vs memory, 64 and 224 px
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "glas_colon"
VARIANTS = ("none", "kd", "crd", "moma", "moma-official", "moma-cross", "moma-teacher")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", help="timm name of student and teacher")
    parser.add_argument("--data", default=str(DEMO))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of parts 1, 2 and 4")
    parser.add_argument("--wait-threads", type=int, default=None,
                        help="torch threads of part 3 (default: --threads; training uses torch's default, "
                             f"{torch.get_num_threads()} here)")
    parser.add_argument("--wait-repeats", type=int, default=2, help="measurements per setting in part 3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workers", default="0,1,2,auto", help="num_workers settings of parts 2 and 3")
    parser.add_argument("--loader-batches", type=int, default=12, help="batches per loader measurement")
    parser.add_argument("--wait-steps", type=int, default=8, help="steps per epoch of part 3")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: steps, loader, wait, parts, cache")
    parser.add_argument("--cache-teacher", default="vit_base_patch16_224", help="timm name of the teacher of part 5")
    parser.add_argument("--cache-student", default="resnet18", help="timm name of the student of part 5")
    parser.add_argument("--cache-image-size", type=int, default=64, help="tile size of part 5 (the ViT's img_size)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per MoMA part (part 4)")
    parser.add_argument("--profile", choices=VARIANTS, help="torch.profiler table of a few steps of one variant")
    parser.add_argument("--tile-store", action="store_true",
                        help="only the loader from files against the uint8 tile store (and memory), then exit")
    parser.add_argument("--store-sizes", default="64,224", help="tile sizes (px) of --tile-store")
    parser.add_argument("--store-workers", default="auto",
                        help="num_workers of every loader of --tile-store (auto: as training resolves it for files)")
    parser.add_argument("--store-rounds", type=int, default=3, help="interleaved measurements per loader")
    parser.add_argument("--store-step", action="store_true",
                        help="with --tile-store: also the student step (none) tiles/s at each size on the device")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- set-up


def save_teacher(path: Path, arch: str, classes: list[str], image_size: int) -> Path:
    from moma.config import IMAGENET_MEAN, IMAGENET_STD
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    torch.manual_seed(0)
    model = create_backbone(arch, len(classes))
    meta = ModelMetadata(arch, classes, image_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
    save_model_checkpoint(path, model.state_dict(), meta)
    return path


def variant_config(args, variant: str, workdir: Path, teachers: dict[str, Path], workers="auto"):
    from moma.config import build_config

    distill: dict = {"method": "none"}
    if variant in ("kd", "crd"):
        distill = {"method": variant, "teacher": str(teachers["same"])}
    elif variant.startswith("moma"):
        teacher = teachers["other"] if variant == "moma-cross" else teachers["same"]
        params = {"moma-official": {"preset": "official-code"}, "moma-teacher": {"keys": "teacher"}}.get(variant, {})
        distill = {"method": "moma", "teacher": str(teacher), "params": params}
    tree = {
        "run": {"name": variant, "output_dir": str(workdir / "runs"), "seed": 0},
        "data": {"source": args.data, "image_size": args.image_size, "num_workers": workers},
        "model": {"arch": args.arch},
        "optim": {"batch_size": args.batch_size, "epochs": 2},
        "train": {"progress": False, "tensorboard": False},
        "distill": distill,
    }
    return build_config(tree)


def make_trainer(args, variant: str, workdir: Path, teachers: dict[str, Path], workers="auto"):
    from moma.engine.trainer import Trainer

    run_dir = workdir / f"{variant}-{workers}-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    return Trainer(variant_config(args, variant, workdir, teachers, workers), run_dir)


def fixed_batches(trainer, count: int):
    from moma.distill.base import Batch

    loader = trainer.loaders.train_loader(0)
    batches = []
    for images, targets, index, *_ in loader:  # a training sample also names its flip/rotation view
        batches.append(Batch(images.to(trainer.device), targets.to(trainer.device), index.to(trainer.device)))
        if len(batches) == count:
            break
    trainer.close()
    return batches


def run_steps(trainer, batches, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds for ``steps`` training steps (task forward, backward, optimiser
    step, after_step)."""
    trainer.train_model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        trainer._step(batches[i % len(batches)], 0, i)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------------------------- the parts


def measure_steps(args, variants: list[str], workdir: Path, teachers: dict[str, Path]) -> dict[str, dict]:
    trainers = {v: make_trainer(args, v, workdir, teachers) for v in variants}
    batches = fixed_batches(trainers[variants[0]], 4)
    for name, trainer in trainers.items():
        run_steps(trainer, batches, args.warmup)
    walls: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            wall, cpu = run_steps(trainers[variant], batches, args.steps)
            walls[variant].append(wall / args.steps)
            cpus[variant].append(cpu / args.steps)
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{v} {args.batch_size / walls[v][-1]:.1f}" for v in variants) + " images/s", flush=True)
    table = {}
    for variant in variants:
        row = {"images_per_s": args.batch_size / statistics.median(walls[variant]),
               "cpu_s": statistics.median(cpus[variant]), "passes": teacher_passes(trainers[variant]),
               "raw": [round(args.batch_size / w, 1) for w in walls[variant]]}
        for base in ("none", "kd"):
            if base in walls:  # per-round step-time ratios, then their median
                row[f"wall_vs_{base}"] = statistics.median(a / b for a, b in zip(walls[variant], walls[base]))
                row[f"cpu_vs_{base}"] = statistics.median(a / b for a, b in zip(cpus[variant], cpus[base]))
        table[variant] = row
    return table


def teacher_passes(trainer) -> int:
    method = trainer.task.method
    if trainer.task.teacher is None:
        return 0
    return 2 if getattr(method, "_separate_logits_pass", False) else 1


def measure_loader(args, workdir: Path, teachers: dict[str, Path], settings: list[str]) -> dict[str, float]:
    """Images/s of the training loader alone (cached tiles, training transforms with RandAugment)."""
    out = {}
    for workers in settings:
        trainer = make_trainer(args, "none", workdir, teachers, workers)
        loader = trainer.loaders.train_loader(0)
        iterator = iter(loader)
        next(iterator)  # workers started
        start, images = time.perf_counter(), 0
        for _ in range(args.loader_batches):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                batch = next(iterator)
            images += len(batch[0])
        out[f"{workers} ({loader.num_workers})"] = images / (time.perf_counter() - start)
        trainer.close()
    return out


def measure_data_wait(args, workdir: Path, teachers: dict[str, Path], settings: list[str]) -> dict[str, dict]:
    """Share of step time waiting for data in the second of two short kd epochs (median over
    ``--wait-repeats`` measurements, the settings interleaved)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.wait_threads or threads)
    rows: dict[str, list[dict]] = {}
    for _ in range(args.wait_repeats):
        for workers in settings:
            trainer = make_trainer(args, "kd", workdir, teachers, workers)
            trainer.cfg.train.max_steps_per_epoch = args.wait_steps
            trainer.loaders.steps_per_epoch = min(trainer.loaders.steps_per_epoch, args.wait_steps)
            trainer.train_epoch(0)
            second = trainer.train_epoch(1)
            rows.setdefault(f"{workers} ({trainer.loaders.num_workers()})", []).append(second)
            trainer.close()
    torch.set_num_threads(threads)
    out = {}
    for name, seen in rows.items():
        out[name] = {key: statistics.median(row[f"time_{key}"] for row in seen)
                     for key in ("data_wait_share", "data_wait_ms", "images_per_second")}
        out[name]["raw_share"] = [round(row["time_data_wait_share"], 3) for row in seen]
    return out


def median_seconds(work, repeats: int) -> float:
    """Median process CPU seconds of ``work()`` over ``repeats`` calls (after one untimed call)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure_moma_parts(args, workdir: Path, teachers: dict[str, Path]) -> dict[str, float]:
    """CPU seconds of MoMA's parts alone, next to KD's teacher pass and a student step."""
    from moma.distill.moma import batchnorm_mode, pooled_features
    from moma.models.taps import TapOutputs

    kd = make_trainer(args, "kd", workdir, teachers)
    moma = make_trainer(args, "moma-cross", workdir, teachers)
    none = make_trainer(args, "none", workdir, teachers)
    batch = fixed_batches(kd, 1)[0]
    method, teacher = moma.task.method, moma.task.teacher
    moma.train_model.train()
    kd.train_model.train()
    with torch.no_grad():
        student = moma.task.student(batch.input)
    fmap = student.feature_map.detach()
    key_pass = method._key_pass(teacher, batch.input)

    def plain_key_pass():
        with torch.no_grad(), batchnorm_mode(teacher, training=True):
            out = teacher(batch.input)
            method.embed_t(pooled_features(teacher.model, out))

    def heads_attention_infonce():
        leaf = fmap.clone().requires_grad_(True)
        out = TapOutputs(logits=student.logits, embedding=student.embedding, feature_map=leaf)
        method(out, key_pass, batch)["nce"].backward()

    def student_step():
        none._step(batch, 0, 0)

    return {
        "student step (none: forward, backward, SGD)": median_seconds(student_step, args.repeats),
        "KD: teacher pass, eval BN, batch of 32": median_seconds(
            lambda: kd.task.method.teacher_forward(kd.task.teacher, batch.input), args.repeats),
        "MoMA key pass: train BN, 2 sub-batches (shuffle_bn=split), embed_t": median_seconds(
            lambda: method._key_pass(teacher, batch.input), args.repeats),
        "MoMA key pass: train BN, one batch (shuffle_bn=none), embed_t": median_seconds(plain_key_pass, args.repeats),
        "MoMA EMA update (teacher + embed_t)": median_seconds(method.momentum_update, args.repeats),
        "MoMA heads + attention + InfoNCE over the queue, forward + backward": median_seconds(
            heads_attention_infonce, args.repeats),
    }


CACHE_VARIANTS = ("vanilla", "kd, live teacher", "kd, cached teacher")


def save_vit_teacher(path: Path, arch: str, classes: list[str], image_size: int) -> Path:
    """A randomly initialised ViT teacher at ``image_size`` (its ``img_size`` recorded as an import's model_args)."""
    from moma.config import IMAGENET_MEAN, IMAGENET_STD
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    torch.manual_seed(0)
    model_args = {"img_size": image_size}
    model = create_backbone(arch, len(classes), model_args=model_args)
    meta = ModelMetadata(arch, classes, image_size, list(IMAGENET_MEAN), list(IMAGENET_STD), method="imported",
                         config={"model_args": model_args})
    save_model_checkpoint(path, model.state_dict(), meta)
    return path


def cache_trainer(args, variant: str, workdir: Path, teacher: Path, cache: Path):
    from moma.config import build_config
    from moma.engine.trainer import Trainer

    distill = {"method": "none"} if variant == "vanilla" else {
        "method": "kd", "teacher": str(teacher), "teacher_cache": str(cache) if "cached" in variant else "off"}
    tree = {
        "run": {"name": "cache", "output_dir": str(workdir / "runs"), "seed": 0},
        "data": {"source": args.data, "image_size": args.cache_image_size, "num_workers": 0, "strong_augment": True},
        "model": {"arch": args.cache_student},
        "optim": {"batch_size": args.batch_size, "epochs": 2},
        "train": {"progress": False, "tensorboard": False},
        "distill": distill,
    }
    run_dir = workdir / f"cache-{variant.replace(', ', '-').replace(' ', '-')}"
    run_dir.mkdir(parents=True)
    return Trainer(build_config(tree), run_dir)


def step_with_cache_read(trainer, batch, step: int) -> None:
    """One training step, the batch's teacher outputs read from the cache first (as the loop does)."""
    if trainer.loaders.teacher_cache is not None:
        batch.teacher_outputs = trainer.loaders.teacher_cache.outputs(batch.index.cpu(), batch.view.cpu(), trainer.device)
    trainer._step(batch, 0, step)


def measure_cached_teacher(args, workdir: Path, classes: list[str]) -> dict:
    """Part 5: vanilla vs KD with the live ViT-B teacher vs KD reading the same teacher from a cache."""
    from moma.engine.teacher_cache_write import embed_sources

    teacher = save_vit_teacher(workdir / "vit.safetensors", args.cache_teacher, classes, args.cache_image_size)
    start = time.perf_counter()
    made = embed_sources(str(teacher), [args.data], out=str(workdir / "cache"), views="1", device="auto",
                         batch_size=args.batch_size)
    cache_seconds = time.perf_counter() - start
    trainers = {v: cache_trainer(args, v, workdir, teacher, workdir / "cache") for v in CACHE_VARIANTS}
    batches = {}
    for variant, trainer in trainers.items():
        loader = iter(trainer.loaders.train_loader(0))
        batches[variant] = [trainer.loaders.make_batch(next(loader), None) for _ in range(2)]
        trainer.close()
        trainer.train_model.train()
        for i in range(args.warmup):
            step_with_cache_read(trainer, batches[variant][i % 2], i)
    walls: dict[str, list[float]] = {v: [] for v in CACHE_VARIANTS}
    cpus: dict[str, list[float]] = {v: [] for v in CACHE_VARIANTS}
    for round_index in range(args.rounds):
        shift = round_index % len(CACHE_VARIANTS)
        for variant in CACHE_VARIANTS[shift:] + CACHE_VARIANTS[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step_with_cache_read(trainers[variant], batches[variant][i % 2], i)
            walls[variant].append((time.perf_counter() - wall) / args.steps)
            cpus[variant].append((time.process_time() - cpu) / args.steps)
        print(f"cache round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{v} {args.batch_size / walls[v][-1]:.1f}" for v in CACHE_VARIANTS) + " images/s", flush=True)
    rows = {v: {"images_per_s": args.batch_size / statistics.median(walls[v]), "cpu_s": statistics.median(cpus[v]),
                "wall_vs_vanilla": statistics.median(a / b for a, b in zip(walls[v], walls["vanilla"])),
                "cpu_vs_vanilla": statistics.median(a / b for a, b in zip(cpus[v], cpus["vanilla"]))}
            for v in CACHE_VARIANTS}
    return {"rows": rows, "cache_seconds": cache_seconds, "tile_views": made["tiles"] * made["views_per_tile"]}


def print_cache_report(args, cache: dict) -> None:
    print(f"\nmachine: {machine()}")
    print(f"student {args.cache_student}, teacher {args.cache_teacher} (img_size {args.cache_image_size}), "
          f"{args.cache_image_size} px, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps (medians)\n")
    print("| step | images/s (wall) | step cost vs vanilla: wall / CPU | CPU s/step |\n|---|---|---|---|")
    for name, row in cache["rows"].items():
        print(f"| {name} | {row['images_per_s']:.1f} | {row['wall_vs_vanilla']:.2f}x / {row['cpu_vs_vanilla']:.2f}x | "
              f"{row['cpu_s']:.3f} |")
    print(f"\nthe cache: {cache['tile_views']} tile-views, one teacher forward each, in {cache['cache_seconds']:.0f} s")


def profile_variant(args, variant: str, workdir: Path, teachers: dict[str, Path]) -> None:
    from torch.profiler import ProfilerActivity, profile

    trainer = make_trainer(args, variant, workdir, teachers)
    batches = fixed_batches(trainer, 2)
    run_steps(trainer, batches, args.warmup)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(trainer, batches, args.steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# ---------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()}")


def print_report(args, steps: dict | None, loader: dict | None, wait: dict | None, parts: dict | None) -> None:
    print(f"\nmachine: {machine()}")
    print(f"student = teacher = {args.arch}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps (medians), {args.threads} torch thread(s)\n")
    if steps:
        print("| variant | teacher passes | images/s (wall) | step cost vs none: wall / CPU | vs kd: wall / CPU "
              "| CPU s/step | per-round images/s |")
        print("|---|---|---|---|---|---|---|")
        for name, row in steps.items():
            ratios = [f"{row[f'wall_vs_{b}']:.2f}x / {row[f'cpu_vs_{b}']:.2f}x" if f"wall_vs_{b}" in row else ""
                      for b in ("none", "kd")]
            print(f"| `{name}` | {row['passes']} | {row['images_per_s']:.1f} | {ratios[0]} | {ratios[1]} | "
                  f"{row['cpu_s']:.3f} | {', '.join(map(str, row['raw']))} |")
    if loader:
        print("\n| num_workers (resolved) | loader images/s |\n|---|---|")
        for name, rate in loader.items():
            print(f"| {name} | {rate:.0f} |")
    if wait:
        print(f"\n| num_workers (resolved) | data-wait share (kd, epoch 2, {args.wait_threads or args.threads} threads) | "
              "data wait ms/step | images/s | each measurement |")
        print("|---|---|---|---|---|")
        for name, row in wait.items():
            print(f"| {name} | {row['data_wait_share']:.1%} | {row['data_wait_ms']:.1f} | "
                  f"{row['images_per_second']:.1f} | {', '.join(f'{r:.1%}' for r in row['raw_share'])} |")
    if parts:
        print("\n| part (alone) | CPU ms |\n|---|---|")
        for name, seconds in parts.items():
            print(f"| {name} | {1000 * seconds:.1f} |")


# ---------------------------------------------------------------------------------- tile store

STORAGES = ("off", "disk", "memory")  # data.cache: decoded on every read, the tile store, in memory
# The loader's per-tile work: the training transform with and without RandAugment, and none at all
# (uint8 tiles as read: what is left to a loader when augmentation runs on whole batches elsewhere).
LOADER_WORK = ("flips, rot90, RandAugment", "flips, rot90", "none (uint8 tiles)",
               "flips, rot90 (uint8) + device augmentation per batch")
DEVICE_WORK = LOADER_WORK[-1]  # data.augment_on=device


def storage_trainer(args, workdir: Path, teachers: dict[str, Path], size: int, cache: str, work: str, workers):
    """A ``none`` trainer at ``size`` px whose tiles come from files, the tile store or memory and
    whose training loader does ``work`` (one of LOADER_WORK) per tile."""
    from moma.engine.trainer import Trainer

    sized = argparse.Namespace(**{**vars(args), "image_size": size})
    cfg = variant_config(sized, "none", workdir, teachers, workers)
    cfg.data.cache = cache
    cfg.data.tile_store_dir = str(workdir / "tile_stores")
    cfg.augment.randaugment = "RandAugment" in work
    cfg.data.augment_on = "device" if work == DEVICE_WORK else "loader"
    run_dir = workdir / f"store-{size}-{cache}-{LOADER_WORK.index(work)}-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, run_dir)
    if work == LOADER_WORK[2]:
        trainer.data.train.transform = None
    return trainer


def loader_rate(loader, batches: int, run_loaders=None) -> float:
    """Tiles/s of ``batches`` batches, after one untimed batch (workers started, first-call costs).
    The rest of the pass is drained untimed: batches the workers prefetched would otherwise still be
    in the making while the next loader is timed, and take its cores. With ``run_loaders`` (a
    trainer's RunLoaders with data.augment_on=device) each batch is also moved to the device and
    augmented there, as training does."""
    def finish(batch):
        if run_loaders is not None:
            run_loaders._to_device(batch[0], run_loaders.step_generator(0, tiles))
        return len(batch[0])

    iterator = iter(loader)
    tiles = 0
    finish(next(iterator))
    start, tiles = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        tiles += finish(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rate = tiles / (time.perf_counter() - start)
    for _ in iterator:
        pass
    return rate


def build_store_once(args, workdir: Path, teachers: dict[str, Path], size: int) -> float:
    """Seconds to decode every tile into the store (the one-off cost the later runs save)."""
    start = time.perf_counter()
    storage_trainer(args, workdir, teachers, size, "disk", LOADER_WORK[0], 0).close()
    return time.perf_counter() - start


def store_workers(args, workdir: Path, teachers: dict[str, Path], size: int) -> int:
    """--store-workers as a count: ``auto`` as training resolves it for tiles decoded from files."""
    if args.store_workers != "auto":
        return int(args.store_workers)
    trainer = storage_trainer(args, workdir, teachers, size, "off", LOADER_WORK[0], "auto")
    workers = trainer.loaders.num_workers()
    trainer.close()
    return workers


def student_step_rate(args, workdir: Path, teachers: dict[str, Path], size: int) -> float:
    from moma.distill.base import Batch

    trainer = storage_trainer(args, workdir, teachers, size, "memory", LOADER_WORK[0], 0)
    batches = []
    for images, targets, index, *_ in trainer.loaders.train_loader(0):  # (a training sample may add its view)
        batches.append(Batch(images.to(trainer.device), targets.to(trainer.device), index.to(trainer.device)))
        if len(batches) == 2:
            break
    run_steps(trainer, batches, args.warmup)
    seconds = statistics.median(run_steps(trainer, batches, args.steps)[0] / args.steps for _ in range(args.store_rounds))
    return args.batch_size / seconds


def measure_tile_store(args, workdir: Path, teachers: dict[str, Path]) -> list[dict]:
    """Per size and transform: loader tiles/s from files, the tile store and memory (medians)."""
    rows = []
    for size in [int(s) for s in args.store_sizes.split(",") if s.strip()]:
        build_seconds = build_store_once(args, workdir, teachers, size)
        workers = store_workers(args, workdir, teachers, size)
        step = student_step_rate(args, workdir, teachers, size) if args.store_step else None
        for work in LOADER_WORK:
            trainers = {cache: storage_trainer(args, workdir, teachers, size, cache, work, workers)
                        for cache in STORAGES}
            loaders = {cache: trainer.loaders.train_loader(0) for cache, trainer in trainers.items()}
            rates: dict[str, list[float]] = {cache: [] for cache in STORAGES}
            for round_index in range(args.store_rounds):
                order = STORAGES[round_index % 3:] + STORAGES[:round_index % 3]
                for cache in order:
                    on_device = trainers[cache].loaders if work == DEVICE_WORK else None
                    rates[cache].append(loader_rate(loaders[cache], args.loader_batches, on_device))
            for trainer in trainers.values():
                trainer.close()
            row = {"size": size, "work": work, "workers": workers, "build_s": build_seconds,
                   "step": step, "tiles": len(trainers["off"].data.train)}
            row.update({cache: statistics.median(values) for cache, values in rates.items()})
            row["raw"] = rates
            rows.append(row)
            print(f"{size} px, {work}: " + ", ".join(
                f"{cache} {row[cache]:.0f}" for cache in STORAGES) + " tiles/s", flush=True)
    return rows


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({machine()})"


def print_store_report(args, rows: list[dict]) -> None:
    print(f"\ndevice: {device_name()}")
    print(f"training loader, batch {args.batch_size}, {args.loader_batches} batches x {args.store_rounds} rounds "
          f"(medians), {args.threads} torch thread(s) in the main process\n")
    print("| px | loader work per tile | num_workers | files (cache=off) tiles/s | tile store (cache=disk) tiles/s | store / files "
          "| memory tiles/s | store built once in | student step tiles/s (none, device) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        step = "" if row["step"] is None else f"{row['step']:.0f}"
        print(f"| {row['size']} | {row['work']} | {row['workers']} | {row['off']:.0f} | {row['disk']:.0f} | "
              f"{row['disk'] / row['off']:.2f}x | {row['memory']:.0f} | {row['build_s']:.1f} s | {step} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("moma").setLevel(logging.ERROR)
    skip = set(filter(None, args.skip.split(",")))
    settings = [w.strip() for w in args.workers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="moma-throughput-") as tmp:
        workdir = Path(tmp)
        from moma.data.tiles import scan_tiles

        classes = scan_tiles(args.data).classes
        teachers = {"same": save_teacher(workdir / "same.safetensors", args.arch, classes, args.image_size),
                    "other": save_teacher(workdir / "other.safetensors", args.arch,
                                          [f"other{i}" for i in range(len(classes) + 1)], args.image_size)}
        if args.profile:
            profile_variant(args, args.profile, workdir, teachers)
            return
        if args.tile_store:
            print_store_report(args, measure_tile_store(args, workdir, teachers))
            return
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        start = time.perf_counter()
        steps = None if "steps" in skip else measure_steps(args, variants, workdir, teachers)
        loader = None if "loader" in skip else measure_loader(args, workdir, teachers, settings)
        wait = None if "wait" in skip else measure_data_wait(args, workdir, teachers, settings)
        parts = None if "parts" in skip else measure_moma_parts(args, workdir, teachers)
        cache = None if "cache" in skip else measure_cached_teacher(args, workdir, classes)
        if any(part is not None for part in (steps, loader, wait, parts)):
            print_report(args, steps, loader, wait, parts)
        if cache:
            print_cache_report(args, cache)
        print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

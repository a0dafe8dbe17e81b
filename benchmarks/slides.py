"""Slide prediction against the model's own speed, on the CPU (default) or on a GPU (``--gpu``).

CPU, in one run, for each model of ``--models`` (``ARCH:PX``, random weights, 3 classes, tiles of
PX pixels at 0.5 um/px; default a resnet18 at 224 px and a resnet10t at 64 px, whose 3 ms a tile
leave the reading the least room):

* **model**: tiles/s of the model alone on in-memory batches, in PyTorch and in ONNX Runtime (its
  ``moma export --dynamic-batch``), same batch size and threads as below, measured before and
  after the slide runs and averaged;
* **slide**: ``moma predict`` on the small slide, in PyTorch and in ONNX Runtime, with
  ``--workers`` reader processes (and once with ``--workers 0``, reading in the main process, in
  PyTorch): tiles/s over the slide's whole time as its row of the slide table gives it (tissue detection,
  reading, the model, CSV, GeoJSON, heatmap), the ratio slide / model (the goal: 0.8 or more),
  tiles/s of the model loop alone and the share of it spent waiting for data, and the main
  process's CPU time per tile in that loop beside the model's alone: on a machine shared with
  other work, wall-clock rates move with the load, CPU time per tile does not;
* **memory**: peak resident memory of the main process (VmHWM; reader processes hold one slide
  handle and a few batches each), and for the first model the same on the large slide (four
  times the tiles): flat memory means the same peak.

Slides are written here, like a 40x scan: pyramidal TIFF, 0.25 um/px at level 0, levels at
downsample 1, 4 and 16, JPEG-compressed 256 px tiles; the tissue, an ellipse of the shipped H&E
tiles on glass. ``small`` is ``--side`` pixels square, ``large`` twice that side. Every figure
comes from a fresh Python process that times its own work (imports and model loading excluded)
with ``--threads`` torch (and ONNX Runtime) threads.

``--gpu``: one slide of at least 100,000 tissue tiles of 224 px (0.5 um/px at level 0, as a 20x
scan; JPEG 256 px tiles; levels 1, 4, 16, 64), a resnet18 on CUDA: the model's tiles/s alone and
``moma predict``'s, its seconds for the slide against the 60 s goal, and the data wait.

    python benchmarks/slides.py                       # about 10 minutes on 2 busy CPU cores
    python benchmarks/slides.py --side 4096 --models resnet10t:64
    python benchmarks/slides.py --gpu                 # needs CUDA; a 1-2 GB slide in a temporary folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "lc25000_lung"
BLOCK = 256  # TIFF tile side, as scanners write them
CLASSES = ["lung_aca", "lung_n", "lung_scc"]
GPU_TILES = 100_000
GPU_GOAL_S = 60.0


# --------------------------------------------------------------------------- slides
def _pool(count: int = 16) -> list[np.ndarray]:
    """Level-0 blocks of tissue: 4 x 4 shipped 64 px tiles each."""
    from PIL import Image

    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(DEMO.rglob("*.png"))]
    per = BLOCK // tiles[0].shape[0]
    blocks = []
    for k in range(count):
        rows = [np.concatenate([tiles[(k * 31 + r * per + c) % len(tiles)] for c in range(per)], axis=1) for r in range(per)]
        blocks.append(np.concatenate(rows, axis=0))
    return blocks


def _shrunk(blocks: list[np.ndarray], ds: int) -> list[np.ndarray]:
    from PIL import Image

    side = max(1, BLOCK // ds)
    return [np.asarray(Image.fromarray(b).resize((side, side), Image.Resampling.BOX)) for b in blocks]


def _level_blocks(n_blocks: int, ds: int, pool: list[np.ndarray], glass: np.ndarray, tissue):
    """The TIFF tiles of the level at downsample ``ds``, row by row: each covers ds x ds level-0
    blocks, shrunk; ``tissue(row, col)`` says which level-0 blocks hold tissue."""
    small, small_glass = _shrunk(pool, ds), _shrunk([glass], ds)[0]
    part = small_glass.shape[0]
    per_side = -(-n_blocks // ds)
    for top in range(per_side):
        for left in range(per_side):
            if ds == 1:
                yield pool[(top * 7919 + left * 104729) % len(pool)] if tissue(top, left) else glass
                continue
            out = np.empty((BLOCK, BLOCK, 3), dtype=np.uint8)
            for r in range(ds):
                for c in range(ds):
                    row, col = top * ds + r, left * ds + c
                    piece = small[(row * 7919 + col * 104729) % len(small)] if tissue(row, col) else small_glass
                    out[r * part:(r + 1) * part, c * part:(c + 1) * part] = piece
            yield out


def make_slide(path: Path, side: int, mpp: float, downsamples: tuple[int, ...], shape: str) -> Path:
    """A pyramidal JPEG TIFF, ``side`` level-0 pixels square (a multiple of 256); tissue in an
    ellipse, or everywhere but a 512 px margin (``shape='full'``)."""
    import tifffile

    n = side // BLOCK
    centre = (n - 1) / 2

    def tissue(row: int, col: int) -> bool:
        if shape == "full":
            return 2 <= row < n - 2 and 2 <= col < n - 2
        return ((row - centre) / (0.45 * n)) ** 2 + ((col - centre) / (0.45 * n)) ** 2 <= 1

    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(236, 3, (BLOCK, BLOCK, 3)), 0, 255).astype(np.uint8)
    pool = _pool()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, ds in enumerate(downsamples):
            pixels = side // ds
            per_cm = 1e4 / (mpp * ds)
            tif.write(_level_blocks(n, ds, pool, glass, tissue), shape=(pixels, pixels, 3), dtype=np.uint8,
                      tile=(BLOCK, BLOCK), photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1,
                      maxworkers=os.cpu_count())
    return path


# --------------------------------------------------------------------------- models
def make_model(folder: Path, arch: str, px: int) -> tuple[Path, Path]:
    """A checkpoint with random weights (0.5 um/px) and its ONNX export with a dynamic batch."""
    import torch

    from moma.cli import main
    from moma.config import IMAGENET_MEAN, IMAGENET_STD
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    torch.manual_seed(0)
    ckpt, onnx = folder / f"{arch}_{px}.safetensors", folder / f"{arch}_{px}.onnx"
    meta = ModelMetadata(arch, CLASSES, px, list(IMAGENET_MEAN), list(IMAGENET_STD), mpp=0.5)
    save_model_checkpoint(ckpt, create_backbone(arch, len(CLASSES)).state_dict(), meta)
    if main(["export", str(ckpt), "--out", str(onnx), "--dynamic-batch"]) != 0:
        raise SystemExit(f"export of {ckpt} failed")
    return ckpt, onnx


# --------------------------------------------------------------------------- child processes
def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries a forking parent's ru_maxrss into the child across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_model(model_path: str, px: int, batch: int, device: str, seconds: float) -> dict:
    """Tiles/s of the model alone on one random batch, fed again and again (after a warm-up)."""
    import torch

    from moma.engine.inference import load_classifier

    model, _ = load_classifier(model_path, torch.device(device))
    images = torch.randn(batch, 3, px, px, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tiles, start, cpu = 0, 0.0, 0.0
    with torch.no_grad():
        for step in range(10_000):
            model(images).float().softmax(1)
            sync()
            if step == 1:  # two warm-up batches
                start, cpu = time.perf_counter(), time.process_time()
            elif step > 1:
                tiles += batch
                if time.perf_counter() - start > seconds and step >= 5:
                    break
    return {"tiles_per_s": tiles / (time.perf_counter() - start), "cpu_ms": 1e3 * (time.process_time() - cpu) / tiles}


def _timed_stream(record: dict):
    """slide_predict's stream_probs, recording the loop's wall and main-process CPU seconds."""
    import moma.engine.slide_predict as slide_predict

    original = slide_predict.stream_probs

    def timed(model, dataset, *args, **kwargs):
        cpu = time.process_time()
        result = original(model, dataset, *args, **kwargs)
        record.update(loop_s=result.seconds, loop_cpu_s=time.process_time() - cpu)
        return result

    slide_predict.stream_probs = timed


def child_predict(argv: list[str], out: str) -> dict:
    """``moma predict`` timed whole, and the slide's row of its summary."""
    import pandas as pd

    from moma.cli import main

    loop: dict = {}
    _timed_stream(loop)
    start = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"moma {' '.join(argv)} exited with {code}")
    table = next(Path(out) / name for name in ("slides.csv", "summary.csv") if (Path(out) / name).is_file())
    row = pd.read_csv(table).iloc[0]
    tiles = int(row["tiles"])
    return {"wall": wall, "tiles": tiles, "seconds": float(row["seconds"]), "data_wait": float(row["data_wait"]),
            "loop_tiles_per_s": tiles / loop["loop_s"], "loop_cpu_ms": 1e3 * loop["loop_cpu_s"] / tiles,
            "peak_mib": _peak_rss_mib()}


def run_child(kind: str, threads: int, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, threads, *args])], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: {kind} {args}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(spec: str) -> None:
    import torch

    kind, threads, *args = json.loads(spec)
    torch.set_num_threads(threads)
    result = child_model(*args) if kind == "model" else child_predict(*args)
    print(json.dumps(result))


# --------------------------------------------------------------------------- runs
def predict_args(model: Path, slide: Path, out: Path, workers: int, batch: int, device: str) -> list:
    return ["predict", str(model), str(slide), "--out", str(out), "--batch-size", str(batch), "--device", device,
            "--workers", str(workers)]


def cpu_benchmark(args, tmp: Path) -> None:
    import torch

    from moma.engine.slide_stream import auto_workers

    args.workers = auto_workers(torch.device("cpu")) if args.workers < 0 else args.workers
    begin = time.perf_counter()
    slides = {name: make_slide(tmp / f"{name}.tif", side, 0.25, (1, 4, 16), "ellipse")
              for name, side in (("small", args.side), ("large", 2 * args.side))}
    print(f"slides written in {time.perf_counter() - begin:.0f} s", flush=True)
    rows, memory = [], None
    for number, spec in enumerate(args.models):
        arch, px = spec.split(":")
        ckpt, onnx = make_model(tmp, arch, int(px))
        for runtime, model in (("PyTorch", ckpt), ("ONNX Runtime", onnx)):
            def alone() -> dict:
                return run_child("model", args.threads, str(model), int(px), args.batch_size, "cpu", args.model_seconds)

            before, preds = alone(), []
            for workers in [args.workers] + ([0] if runtime == "PyTorch" else []):
                out = tmp / f"pred_{arch}_{px}_{runtime[0]}_{workers}"
                preds.append((workers, run_child("predict", args.threads, predict_args(model, slides["small"], out, workers,
                                                                                       args.batch_size, "cpu"), str(out))))
            after = alone()  # before and after the slides: on a loaded machine the model's own speed drifts
            print(f"{spec} {runtime}: model alone {before['tiles_per_s']:.1f} then {after['tiles_per_s']:.1f} tiles/s",
                  flush=True)
            mean = {key: (before[key] + after[key]) / 2 for key in before}
            for workers, pred in preds:
                rows.append((spec, runtime, workers, mean, pred))
                print(f"  workers {workers}: {pred['tiles']} tiles, {pred['tiles'] / pred['seconds']:.1f} tiles/s, "
                      f"data wait {pred['data_wait']:.1%}", flush=True)
        if number == 0:
            out = tmp / "pred_large"
            memory = run_child("predict", args.threads, predict_args(ckpt, slides["large"], out, args.workers,
                                                                     args.batch_size, "cpu"), str(out))
    _report_cpu(args, rows, memory)


def _report_cpu(args, rows: list, memory: dict) -> None:
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} logical CPUs, load average "
          f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}, Python {platform.python_version()}, {platform.system()}")
    print(f"small slide {args.side} px square, large {2 * args.side} px; {args.threads} model thread(s), batch "
          f"{args.batch_size}\n")
    print("| model | runtime | reader workers | tissue tiles | model alone tiles/s | slide tiles/s | slide / model | "
          "model loop tiles/s | data wait | CPU ms/tile: model alone | CPU ms/tile: main process in the loop | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, runtime, workers, alone, pred in rows:
        slide_rate = pred["tiles"] / pred["seconds"]
        print(f"| {spec} | {runtime} | {workers} | {pred['tiles']} | {alone['tiles_per_s']:.1f} | {slide_rate:.1f} | "
              f"**{slide_rate / alone['tiles_per_s']:.2f}** | {pred['loop_tiles_per_s']:.1f} | {pred['data_wait']:.1%} | "
              f"{alone['cpu_ms']:.2f} | {pred['loop_cpu_ms']:.2f} | {pred['peak_mib']:.0f} |")
    small = next(p for spec, runtime, w, _, p in rows if spec == args.models[0] and runtime == "PyTorch" and w == args.workers)
    print(f"\npeak memory, large / small slide ({args.models[0]}, PyTorch): {memory['peak_mib'] / small['peak_mib']:.3f}x "
          f"({memory['peak_mib']:.0f} / {small['peak_mib']:.0f} MiB) for {memory['tiles'] / small['tiles']:.1f}x the "
          f"tiles; large slide {memory['tiles'] / memory['seconds']:.1f} tiles/s, data wait {memory['data_wait']:.1%}")


def gpu_benchmark(args, tmp: Path) -> int:
    import torch

    from moma.engine.slide_stream import auto_workers

    if not torch.cuda.is_available():
        print("slides.py --gpu: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    # Tissue everywhere but two blocks each side, and one block to spare.
    side = (-(-int(np.ceil(np.sqrt(args.tiles))) * 224 // BLOCK) + 5) * BLOCK
    begin = time.perf_counter()
    slide = make_slide(tmp / "gpu_slide.tif", side, 0.5, (1, 4, 16, 64), "full")
    print(f"slide {side} px square ({slide.stat().st_size / 2**30:.2f} GiB) written in {time.perf_counter() - begin:.0f} s",
          flush=True)
    ckpt, _ = make_model(tmp, "resnet18", 224)
    threads = torch.get_num_threads()
    alone = run_child("model", threads, str(ckpt), 224, args.batch_size, "cuda", args.model_seconds)
    args.workers = auto_workers(torch.device("cuda")) if args.workers < 0 else args.workers
    out = tmp / "gpu_pred"
    pred = run_child("predict", threads, predict_args(ckpt, slide, out, args.workers, args.batch_size, "cuda"), str(out))
    rate = pred["tiles"] / pred["seconds"]
    if pred["tiles"] < args.tiles:
        print(f"slides.py --gpu: {pred['tiles']} tiles predicted, fewer than the {args.tiles} asked for", file=sys.stderr)
        return 1
    met = pred["seconds"] <= GPU_GOAL_S
    print(f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs: resnet18 224 px alone {alone['tiles_per_s']:.0f} tiles/s; "
          f"moma predict {pred['tiles']} tiles in {pred['seconds']:.1f} s ({rate:.0f} tiles/s, slide / model "
          f"{rate / alone['tiles_per_s']:.2f}, data wait {pred['data_wait']:.1%}, command {pred['wall']:.1f} s, "
          f"peak {pred['peak_mib']:.0f} MiB): goal {GPU_GOAL_S:.0f} s for {GPU_TILES} tiles {'met' if met else 'NOT met'}",
          flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=12288, help="level-0 side of the small slide (a multiple of 4096)")
    parser.add_argument("--models", nargs="+", default=["resnet18:224", "resnet10t:64"], help="ARCH:PX, timm names")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads of the model")
    parser.add_argument("--workers", type=int, default=-1, help="reader processes (default: moma predict's own choice)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-seconds", type=float, default=5.0, help="how long the model alone is timed")
    parser.add_argument("--gpu", action="store_true", help="the 100,000-tile slide on CUDA instead")
    parser.add_argument("--tiles", type=int, default=GPU_TILES, help="with --gpu: tissue tiles of the slide")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SLIDES_BENCH_DIR")) as tmp:
        if args.gpu:
            return gpu_benchmark(args, Path(tmp))
        cpu_benchmark(args, Path(tmp))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        sys.exit(main())

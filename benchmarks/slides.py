"""Slide throughput and memory: tiles per second of ``moma tile`` and ``moma predict`` with 0, 1 and
2 worker processes, and the peak memory on a slide and on one four times larger.

The slides are made here: a 40x-like pyramidal TIFF (0.25 um/px at level 0, levels at downsample
1, 4 and 16 as in Aperio scans, zlib-compressed 512 px tiles) whose tissue is an ellipse of the
shipped 64 px H&E tiles on noisy glass. ``small`` is ``--side`` pixels square, ``large`` twice
that side (four times the area and the tissue tiles). Tiles are 224 px at 0.5 um/px, so every
tile is read at level 0 and shrunk 2x, as on a real 40x slide. ``predict`` uses a resnet18 with
random weights (224 px, 0.5 um/px, 3 classes), batch 64, torch's default threads.

Every measurement is a fresh Python process that imports the CLI, then times ``moma.cli.main``
alone (interpreter and torch start-up are not counted in tiles/s) and reports its own peak
resident memory (VmHWM: the main process, which holds the model, the mask and the results;
worker processes only read tiles). Tiling writes into a new folder each time, so nothing is
skipped.

    python benchmarks/slides.py                 # about 4 minutes on 2 CPU cores
    python benchmarks/slides.py --side 3072     # quicker, smaller slides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "lc25000_lung"
CELL = 64  # level-0 pixels per shipped tile in the mosaic
DOWNSAMPLES = (1, 4, 16)
BLOCK = 512  # TIFF tile side


def _demo_tiles() -> list[np.ndarray]:
    from PIL import Image

    files = sorted(DEMO.rglob("*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _level_blocks(side: int, downsample: int, tiles: list[np.ndarray], seed: int):
    """The TIFF tiles of one pyramid level, row by row: the mosaic at 1/downsample scale."""
    from PIL import Image

    cell = CELL // downsample
    small = [np.asarray(Image.fromarray(t).resize((cell, cell), Image.Resampling.BOX)) for t in tiles]
    level_side = side // downsample
    cells_per_side = level_side // cell
    rng = np.random.default_rng(seed)
    centre = (cells_per_side - 1) / 2
    for top in range(0, level_side, BLOCK):
        for left in range(0, level_side, BLOCK):
            block = (rng.integers(230, 240, (BLOCK, BLOCK, 1)) + rng.integers(0, 4, (BLOCK, BLOCK, 3))).astype(np.uint8)
            for r in range(top // cell, min(cells_per_side, (top + BLOCK) // cell)):
                for c in range(left // cell, min(cells_per_side, (left + BLOCK) // cell)):
                    if ((r - centre) / (0.45 * cells_per_side)) ** 2 + ((c - centre) / (0.45 * cells_per_side)) ** 2 > 1:
                        continue  # glass outside the ellipse of tissue
                    tile = small[(r * 7919 + c * 104729) % len(small)]
                    block[r * cell - top:(r + 1) * cell - top, c * cell - left:(c + 1) * cell - left] = tile
            yield block


def make_slide(path: Path, side: int, mpp: float = 0.25) -> Path:
    import tifffile

    tiles = _demo_tiles()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, ds in enumerate(DOWNSAMPLES):
            n = side // ds
            per_cm = 1e4 / (mpp * ds)
            tif.write(_level_blocks(side, ds, tiles, seed=level), shape=(n, n, 3), dtype=np.uint8, tile=(BLOCK, BLOCK),
                      photometric="rgb", compression="zlib", compressionargs={"level": 1},
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1)
    return path


def make_checkpoint(path: Path) -> Path:
    import torch

    from moma.config import IMAGENET_MEAN, IMAGENET_STD
    from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
    from moma.models.backbone import create_backbone

    torch.manual_seed(0)
    model = create_backbone("resnet18", 3)
    meta = ModelMetadata("resnet18", ["lung_aca", "lung_n", "lung_scc"], 224, list(IMAGENET_MEAN), list(IMAGENET_STD), mpp=0.5)
    save_model_checkpoint(path, model.state_dict(), meta)
    return path


def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries a forking parent's ru_maxrss into the child across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(argv: list[str]) -> None:
    """Child mode: time ``moma.cli.main(argv)`` and print a JSON line with seconds and peak memory."""
    import moma.data.tiling  # noqa: F401  (imports are start-up, not tiling or prediction time)
    import moma.engine.slide_predict  # noqa: F401
    from moma.cli import main

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    print(json.dumps({"code": code, "seconds": seconds, "peak_mib": _peak_rss_mib()}))


def measure(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--run-one", *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: moma {' '.join(argv)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tissue_tiles(manifest: Path) -> int:
    return sum(1 for _ in manifest.open()) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6144, help="level-0 side of the small slide (pixels)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        begin = time.perf_counter()
        slides = {"small": make_slide(tmp / "small.tif", args.side), "large": make_slide(tmp / "large.tif", 2 * args.side)}
        ckpt = make_checkpoint(tmp / "student.safetensors")
        print(f"slides written in {time.perf_counter() - begin:.0f} s", flush=True)
        rows = []
        plan = [("small", w) for w in args.workers] + [("large", 0)]
        for name, workers in plan:
            out = tmp / f"tiles_{name}_{workers}"
            tile = measure(["tile", str(slides[name]), "--out", str(out), "--workers", str(workers)])
            n = tissue_tiles(out / "manifest.csv")
            pred = measure(["predict", str(ckpt), str(slides[name]), "--out", str(tmp / f"pred_{name}_{workers}"),
                            "--workers", str(workers), "--batch-size", "64"])
            rows.append((name, workers, n, tile, pred))
            print(f"{name} workers={workers}: {n} tiles, tile {n / tile['seconds']:.1f}/s, predict {n / pred['seconds']:.1f}/s",
                  flush=True)
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, {platform.system()}")
    print(f"slides: small {args.side} px square, large {2 * args.side} px square, 0.25 um/px; tiles 224 px at 0.5 um/px\n")
    print("| slide | tissue tiles | workers | `moma tile` tiles/s | `moma predict` tiles/s | `tile` peak MiB | `predict` peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, workers, n, tile, pred in rows:
        print(f"| {name} | {n} | {workers} | {n / tile['seconds']:.1f} | {n / pred['seconds']:.1f} | "
              f"{tile['peak_mib']:.0f} | {pred['peak_mib']:.0f} |")
    small0 = next(r for r in rows if r[0] == "small" and r[1] == 0)
    large0 = next(r for r in rows if r[0] == "large")
    for command, index in (("tile", 3), ("predict", 4)):
        ratio = large0[index]["peak_mib"] / small0[index]["peak_mib"]
        print(f"\npeak memory of `moma {command}`, large / small slide (0 workers): {ratio:.3f}x "
              f"({large0[2] / small0[2]:.1f}x the tiles)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-one":
        run_one(sys.argv[2:])
    else:
        main()

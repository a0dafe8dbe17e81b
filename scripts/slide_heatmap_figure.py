"""The heatmap of the shipped real slide, for docs/images/cmu1_heatmap.png: a resnet10t trained for
a few epochs on the shipped LC25000 lung tiles (64 px; three classes), then `moma predict` on
data/slides/CMU-1-Small-Region.svs, drawn small (palette PNG).

The lung tiles' resolution is not published, so prediction is told ``--model-mpp 0.5``: tiles of 64 px
read from the slide at its own 0.499 um/px. The model knows three lung classes and the slide is
not lung: the figure shows what slide prediction writes (the class of every tissue tile over the
thumbnail), not a diagnosis.

    python scripts/slide_heatmap_figure.py [--out docs/images/cmu1_heatmap.png] [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from moma.cli import main as moma
from moma.data.slides import Slide
from moma.engine.slide_outputs import plot_class_map
from moma.engine.slide_predict import HEATMAP_MAX_SIDE
from moma.utils.io import atomic_path

ROOT = Path(__file__).resolve().parent.parent
SVS = ROOT / "data" / "slides" / "CMU-1-Small-Region.svs"
DATA = ROOT / "data" / "demo" / "lc25000_lung"
CLASSES = ["lung_aca", "lung_n", "lung_scc"]
MPP = 0.5


def train(folder: Path, epochs: int) -> Path:
    code = moma(["train", "--data", str(DATA), "--arch", "resnet10t", "--image-size", "64", "--epochs", str(epochs),
                 "--out", str(folder), "--name", "lung", "--device", "cpu", "--set", "train.progress=false",
                 "--set", "train.tensorboard=false"])
    if code != 0:
        raise SystemExit("training failed")
    return folder / "lung" / "best.safetensors"


def draw(predictions: Path, out: Path, colours: int) -> None:
    """The predicted classes over the thumbnail at a small size, quantised to a palette."""
    frame = pd.read_csv(predictions)
    with Slide(SVS) as slide:
        ds = max(1.0, max(slide.dimensions) / HEATMAP_MAX_SIDE) * 2  # half the size predict draws
        thumbnail = slide.thumbnail(ds)
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "heatmap.png"
        plot_class_map(thumbnail, ds, frame, CLASSES, full, title=f"{SVS.stem}: {len(frame)} tiles of 64 px at {MPP} um/px",
                       dpi=60)
        with Image.open(full) as image, atomic_path(out) as target:
            image.convert("RGB").quantize(colours).save(target, format="PNG", optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "cmu1_heatmap.png")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--colours", type=int, default=256, help="palette size of the PNG")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = train(Path(tmp) / "runs", args.epochs)
        predicted = Path(tmp) / "predicted"
        if moma(["predict", str(checkpoint), str(SVS), "--out", str(predicted), "--model-mpp", str(MPP), "--device", "cpu"]) != 0:
            raise SystemExit("prediction failed")
        draw(predicted / f"{SVS.stem}.csv", args.out, args.colours)
        summary = pd.read_csv(predicted / "slides.csv").iloc[0]
    fractions = ", ".join(f"{name} {summary[f'fraction_{name}']:.0%}" for name in CLASSES)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB; {summary['tiles']} tiles; {fractions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Build the compact demo dataset shipped in ``data/demo`` from the shared tile datasets.

For each source dataset (``glas_colon``, ``lc25000_lung``, ``monuseg_organ``) every tile is
resized to ``--size`` x ``--size`` pixels (Pillow LANCZOS), converted to RGB and saved as PNG
under ``<dest>/<dataset>/<class>/<file>``. A ``manifest.csv`` is written per dataset with the
columns ``path,label[,group],source_file,...`` where ``path`` is relative to the manifest,
``group`` is the patient id (only where the source has one) and the remaining columns are the
provenance columns of the source manifest.

The output is deterministic: files are processed in sorted order and PNGs carry no time or
other metadata chunks, so running the script twice gives byte-identical files (with the same
Pillow/zlib versions).

Usage (from anywhere)::

    python scripts/make_demo_data.py                       # ../shared/data -> data/demo, 64 px
    python scripts/make_demo_data.py --size 64 --dest data/demo --source ../shared/data

Relative ``--source``/``--dest`` paths are resolved against the repository root (the parent of
this ``scripts/`` folder). Only the tiles and manifests are written; the README, SOURCE.md
copies and datasets.yaml in ``data/demo`` are maintained by hand.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

# dataset folder -> does its source manifest have a patient-level ``group`` column?
DATASETS = {
    "glas_colon": True,
    "lc25000_lung": False,  # LC25000 publishes no patient ids: no group column is written
    "monuseg_organ": True,
}


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p)


def convert_dataset(src_dir: Path, dst_dir: Path, size: int, has_group: bool) -> dict[str, int]:
    with open(src_dir / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        src_cols = list(reader.fieldnames or [])
        rows = sorted(reader, key=lambda r: r["file"])
    if has_group and "group" not in src_cols:
        raise ValueError(f"{src_dir}/manifest.csv has no 'group' column")

    provenance = [c for c in src_cols if c not in ("file", "label", "group")]
    out_cols = ["path", "label"] + (["group"] if has_group else []) + ["source_file"] + provenance

    counts: dict[str, int] = {}
    out_rows = []
    for row in rows:
        src_file = row["file"]
        label = row["label"]
        rel = Path(label) / (Path(src_file).stem + ".png")
        with Image.open(src_dir / src_file) as im:
            tile = im.convert("RGB").resize((size, size), Image.LANCZOS)
        (dst_dir / rel.parent).mkdir(parents=True, exist_ok=True)
        # No pnginfo/exif/icc: Pillow then writes only IHDR, IDAT and IEND (no tIME chunk).
        tile.save(dst_dir / rel, format="PNG", optimize=True)
        out = {"path": rel.as_posix(), "label": label, "source_file": src_file}
        if has_group:
            out["group"] = row["group"]
        out.update({c: row[c] for c in provenance})
        out_rows.append(out)
        counts[label] = counts.get(label, 0) + 1

    with open(dst_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=out_cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="../shared/data",
                    help="folder holding the source datasets (relative to the repo root)")
    ap.add_argument("--dest", default="data/demo",
                    help="output folder (relative to the repo root)")
    ap.add_argument("--size", type=int, default=64, help="output tile size in pixels")
    args = ap.parse_args(argv)

    source, dest = resolve(args.source), resolve(args.dest)
    if not source.is_dir():
        ap.error(f"source folder not found: {source}")
    for name, has_group in DATASETS.items():
        counts = convert_dataset(source / name, dest / name, args.size, has_group)
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{name}: {sum(counts.values())} tiles ({summary}) -> {dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

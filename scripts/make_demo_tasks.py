"""Derived tasks on the shipped demo tiles, written as manifests under data/demo/tasks/ (paths
relative to the manifest; no tile is copied). Used as teacher tasks by configs/compare/curves.yaml.

- ``tissue_source.csv``: which collection a tile comes from, ``colon_glands`` (GlaS, 20x, 2.48 um/px
  at 64 px) or ``nuclei_tcga`` (MoNuSeg, 40x, 0.98 um/px): a coarse task a network can learn across
  patients (magnification, tissue architecture, staining), and unrelated to the lung target.
  Patient ids are kept (prefixed by the collection), so splits stay patient-level.

    python scripts/make_demo_tasks.py
"""

from __future__ import annotations

import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def read_rows(dataset: str) -> list[dict[str, str]]:
    with open(DEMO / dataset / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_tissue_source(out: Path) -> int:
    rows = []
    for dataset, label in (("glas_colon", "colon_glands"), ("monuseg_organ", "nuclei_tcga")):
        for row in read_rows(dataset):
            rows.append({"path": f"../{dataset}/{row['path']}", "label": label, "group": f"{dataset}:{row['group']}"})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main() -> int:
    n = write_tissue_source(DEMO / "tasks" / "tissue_source.csv")
    print(f"data/demo/tasks/tissue_source.csv: {n} tiles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

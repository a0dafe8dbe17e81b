"""Derived tasks on the shipped demo tiles, written as manifests under data/demo/tasks/ (paths
relative to the manifest; no tile is copied). Used as teacher tasks by configs/compare/curves.yaml.

- ``tissue_source.csv``: which collection a tile comes from, ``colon_glands`` (GlaS, 20x, 2.48 um/px
  at 64 px) or ``nuclei_tcga`` (MoNuSeg, 40x, 0.98 um/px): a coarse task a network can learn across
  patients (magnification, tissue architecture, staining), and unrelated to the lung target.
  Patient ids are kept (prefixed by the collection), so splits stay patient-level.
- ``lung_teacher.csv`` / ``lung_students.csv``: the LC25000 lung tiles split once, seeded and
  stratified, into a teacher part (3/8, one fold of a 3-fold split, as ``holdout: 0.375`` of
  configs/compare/paper.yaml) and the students' part; LC25000 has no patient ids, so by tile.
- ``lung_teacher_malignancy.csv``: the teacher part relabelled ``benign`` (lung_n) / ``malignant``
  (lung_aca, lung_scc): a coarser task on the same tiles, for a "relevant task" teacher that has
  never seen a student tile.

    python scripts/make_demo_tasks.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
sys.path.insert(0, str(ROOT))


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


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_lung_parts(out_dir: Path, fraction: float = 0.375, seed: int = 0) -> dict[str, int]:
    import numpy as np

    from moma.compare.holdout import teacher_groups

    rows = read_rows("lc25000_lung")
    paths = np.array([row["path"] for row in rows])
    labels = np.array([row["label"] for row in rows])
    chosen = set(teacher_groups(labels, paths, fraction, seed))
    teacher = [{"path": f"../lc25000_lung/{r['path']}", "label": r["label"]} for r in rows if r["path"] in chosen]
    students = [{"path": f"../lc25000_lung/{r['path']}", "label": r["label"]} for r in rows if r["path"] not in chosen]
    malignancy = [{"path": r["path"], "label": "benign" if r["label"] == "lung_n" else "malignant"} for r in teacher]
    parts = {"lung_teacher.csv": teacher, "lung_students.csv": students, "lung_teacher_malignancy.csv": malignancy}
    for name, part in parts.items():
        write_csv(out_dir / name, part)
    return {name: len(part) for name, part in parts.items()}


def main() -> int:
    out_dir = DEMO / "tasks"
    n = write_tissue_source(out_dir / "tissue_source.csv")
    print(f"data/demo/tasks/tissue_source.csv: {n} tiles")
    for name, count in write_lung_parts(out_dir).items():
        print(f"data/demo/tasks/{name}: {count} tiles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

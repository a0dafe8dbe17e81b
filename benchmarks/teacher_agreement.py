"""How close does each student of a compare folder come to its teacher?

For every finished cell of ``moma compare`` this evaluates the cell's teacher on the cell's own
test split (once per teacher and split) and reports, per setting, method and size, the student's
test macro F1, the teacher's, and the share of test tiles on which student and teacher predict the
same class. A distillation method that works should raise that agreement above what training on
the labels alone (``none``) gives; a method whose agreement stays at ``none``'s level has not
taken the teacher's knowledge in, whatever its score.

    python benchmarks/teacher_agreement.py runs/compare/kd_scratch
    python benchmarks/teacher_agreement.py runs/compare/curves --settings same same_scratch --out agreement.csv

Only teachers trained on the students' classes can be compared this way (the others predict other
classes); such settings are skipped with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import pandas as pd
from sklearn.metrics import f1_score

from moma.config import read_yaml
from moma.engine.checkpoint import read_metadata
from moma.engine.device import resolve_device
from moma.engine.inference import evaluate_checkpoint

PREDICTIONS = "predictions_test_best.csv"


def cell_dirs(compare_dir: Path, settings: list[str] | None):
    """(setting, method, size, run name, folder) of every cell with test predictions."""
    for path in sorted((compare_dir / "cells").glob(f"*/*/*/*/{PREDICTIONS}")):
        run = path.parent
        size, method, setting = run.parent.name, run.parent.parent.name, run.parent.parent.parent.name
        if settings is None or setting in settings:
            yield setting, method, size.removeprefix("size-"), run.name, run


def teacher_predictions(teacher: str, data: str, split_file: Path, cache: dict, device) -> pd.DataFrame:
    """The teacher's test predictions on this split (splits are equal across methods of a fold)."""
    test_rows = pd.read_csv(split_file)
    key = (teacher, hashlib.sha1(test_rows[test_rows["split"] == "test"].to_csv().encode()).hexdigest())
    if key not in cache:
        with tempfile.TemporaryDirectory() as out:
            evaluate_checkpoint(teacher, data, Path(out), device, split_file=str(split_file), split="test",
                                progress=False)
            cache[key] = pd.read_csv(Path(out) / "predictions_eval.csv")
    return cache[key]


def agreement_rows(compare_dir: Path, settings: list[str] | None, device) -> pd.DataFrame:
    cache: dict = {}
    rows, skipped = [], set()
    for setting, method, size, name, run in cell_dirs(compare_dir, settings):
        config = read_yaml(run / "config.yaml")
        teacher = (config.get("distill") or {}).get("teacher")
        if not teacher:
            skipped.add((setting, "no teacher"))
            continue
        student = pd.read_csv(run / PREDICTIONS)
        if set(read_metadata(teacher).class_names) != set(student["label"]):
            skipped.add((setting, "the teacher was trained on other classes"))
            continue
        reference = teacher_predictions(teacher, config["data"]["source"], run / "split.csv", cache, device)
        both = student.merge(reference[["path", "prediction"]], on="path", suffixes=("", "_teacher"))
        rows.append({"setting": setting, "method": method, "size": size, "run": name,
                     "student_macro_f1": f1_score(both["label"], both["prediction"], average="macro"),
                     "teacher_macro_f1": f1_score(both["label"], both["prediction_teacher"], average="macro"),
                     "agreement": float((both["prediction"] == both["prediction_teacher"]).mean())})
    for setting, why in sorted(skipped):
        print(f"skipped setting {setting}: {why}", file=sys.stderr)
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    table = rows.groupby(["setting", "size", "method"], sort=False).agg(
        runs=("run", "count"), student_macro_f1=("student_macro_f1", "mean"),
        teacher_macro_f1=("teacher_macro_f1", "mean"), agreement=("agreement", "mean"),
        agreement_std=("agreement", "std"))
    return table.round(3).reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path, help="a moma compare output folder")
    parser.add_argument("--settings", nargs="*", help="only these settings")
    parser.add_argument("--out", type=Path, help="also write the per-run rows to this CSV")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not (args.compare_dir / "cells").is_dir():
        print(f"error: {args.compare_dir} has no cells/ folder: give a moma compare output folder", file=sys.stderr)
        return 2
    rows = agreement_rows(args.compare_dir, args.settings, resolve_device(args.device))
    if rows.empty:
        print("error: no finished cell with a same-class teacher", file=sys.stderr)
        return 2
    if args.out:
        rows.to_csv(args.out, index=False)
    print(to_markdown(summarise(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README demo: a teacher on some LC25000 lung tiles, then a small learning curve on the others:
a vanilla student, a MoMA student and a KD student that also learns from the fold's other tiles
without their labels, on 2, 8 or all labelled tiles per class (``configs/demo/demo.yaml``).
Re-running it re-uses what is done."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from moma.cli import setup_logging
    from moma.compare import run_compare
    from moma.engine.result import RunResult

    setup_logging(verbose=False)
    start = time.perf_counter()
    config = ROOT / "configs" / "demo" / "demo.yaml"
    try:  # recorded in summary.md as the command to re-run, so keep it free of this machine's paths
        config = config.relative_to(Path.cwd())
    except ValueError:
        pass
    out = run_compare(config, out_dir=Path("runs") / "demo")
    teacher = out / "teachers" / "lung"
    metrics = RunResult.read(teacher).test_metrics("best")
    print()
    print(f"Teacher (247 LC25000 lung tiles, 3 classes), its own test split: accuracy {metrics['accuracy']:.3f}, "
          f"macro F1 {metrics['macro_f1']:.3f} (chance 0.333)")
    print(f"  run folder: {teacher}  (metrics.json, confusion_test_best.png, curves.png)")
    print()
    print((out / "summary.md").read_text())
    print(f"Learning curve (test macro F1 against labelled tiles per class; dashed: with unlabelled tiles): "
          f"{out / 'plots' / 'curve_same.png'}")
    print(f"Report with tables and plots: {out / 'report.html'}")
    print(f"Per-run folders (metrics.json, split.csv with the tiles used, confusion matrices): {out / 'cells'}")
    print(f"Demo finished in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

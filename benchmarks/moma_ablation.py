"""The table of MoMA's design study (docs/moma.md, "Choosing the default") from a finished
`moma compare` folder: per method, macro F1 on validation (what the choice uses) and on test (read
only to report), mean ± std over folds x seeds, and the contrastive diagnostics of every epoch.

    moma compare configs/compare/moma_ablation.yaml
    python benchmarks/moma_ablation.py runs/compare/moma_ablation [--setting same]

Diagnostics (from each run's metrics.json history): L_NCE as a share of its chance level ln(K+1),
lowest and highest epoch mean; the lowest epoch's in-batch retrieval as a multiple of chance (1/N);
the last epoch's mean pairwise cosine of queries and of positive keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def run_rows(folder: Path, setting: str, batch_size: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for metrics_path in sorted((folder / "cells" / setting).glob("*/*/metrics.json")):
        method = metrics_path.parent.parent.name
        results = json.loads(metrics_path.read_text())
        row = {"cell": metrics_path.parent.name, "val": results["best"]["val"]["macro_f1"],
               "test": results["best"]["test"]["macro_f1"]}
        history = results.get("history") or []
        if history and "train_nce" in history[0]:
            shares = [h["train_nce"] / h["train_nce_chance"] for h in history]
            row.update(share_min=min(shares), share_max=max(shares),
                       retrieval_min=min(h["train_nce_retrieval"] for h in history) * batch_size,
                       query_cos=history[-1]["train_nce_query_cos"], key_cos=history[-1]["train_nce_key_cos"])
        rows.setdefault(method, []).append(row)
    return rows


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--setting", default="same")
    parser.add_argument("--batch-size", type=int, default=32, help="the students' batch (retrieval chance is 1/batch)")
    args = parser.parse_args(argv)
    rows = run_rows(args.folder, args.setting, args.batch_size)
    baseline = {r["cell"]: r["val"] for r in rows.get("none", [])}  # paired by fold and seed
    print("| method | runs | val macro F1 | test macro F1 | Δ val vs none | L_NCE / chance, min–max over epochs "
          "| retrieval, worst epoch (x chance) | query cos | key cos |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, runs in sorted(rows.items(), key=lambda kv: -statistics.mean(r["val"] for r in kv[1])):
        delta = [r["val"] - baseline[r["cell"]] for r in runs if r["cell"] in baseline] if method != "none" else []
        diag = ["", "", "", ""]
        if "share_min" in runs[0]:
            diag = [f"{min(r['share_min'] for r in runs):.2g}–{max(r['share_max'] for r in runs):.2g}",
                    f"{min(r['retrieval_min'] for r in runs):.1f}",
                    f"{statistics.mean(r['query_cos'] for r in runs):.3f}",
                    f"{statistics.mean(r['key_cos'] for r in runs):.3f}"]
        print(f"| `{method}` | {len(runs)} | {mean_std([r['val'] for r in runs])} | {mean_std([r['test'] for r in runs])} "
              f"| {mean_std(delta)} | " + " | ".join(diag) + " |")


if __name__ == "__main__":
    main()

"""The report's tables: each built once from the results and the summary as a `Table`, and rendered
to Markdown and HTML alike."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moma.compare.config import CompareConfig
from moma.compare.stats import average_ranks, verdict
from moma.compare.status import DONE, FAILED, NOT_APPLICABLE, failure_rows
from moma.compare.teachers import TeacherInfo
from moma.metrics import PAIRED_METRICS, PRIMARY_METRIC, TABLE_METRICS, metric_label

PAIRED_COLUMNS = [f"best_{m}" for m in PAIRED_METRICS]
CONTRAST_COLUMNS = ["diag_nce", "diag_nce_chance", "diag_nce_retrieval", "diag_nce_query_cos", "diag_nce_key_cos",
                    "diag_nce_query_norm"]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[tuple[str, bool]]]  # (text, bold)
    title: str = ""
    notes: list[str] = field(default_factory=list)


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def _p(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.2g}"


def _ci(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "—"
    if not np.isfinite(low):
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _best_flags(values: pd.Series, higher: bool = True) -> list[bool]:
    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    if finite.empty:
        return [False] * len(values)
    target = finite.max() if higher else finite.min()
    return [bool(np.isfinite(v) and np.isclose(v, target)) for v in values.to_numpy(dtype=float)]


def _status_counts(results: pd.DataFrame, setting: str, method: str) -> tuple[int, int, int, str]:
    rows = results[(results["setting"] == setting) & (results["method"] == method)]
    counts = rows["status"].value_counts()
    note = rows.loc[rows["status"] == NOT_APPLICABLE, "message"]
    return int(counts.get(DONE, 0)), int(counts.get(FAILED, 0)), len(rows), note.iloc[0] if len(note) else ""


def metrics_table(results: pd.DataFrame, ranked: pd.DataFrame, setting: str) -> Table:
    part = ranked[ranked["setting"] == setting].reset_index(drop=True)
    flags = {m: _best_flags(part[f"{m}_mean"]) for m in TABLE_METRICS}
    rank_flags = _best_flags(part["rank"], higher=False)
    rows, notes = [], []
    for i, row in part.iterrows():
        done, failed, total, na = _status_counts(results, setting, row["method"])
        if na:
            rows.append([(row["method"], False), ("n/a", False)] + [("n/a", False)] * len(TABLE_METRICS) + [("—", False)])
            notes.append(f"{row['method']}: not applicable — {na}")
            continue
        runs = f"{done}/{total}" + (f" ({failed} failed)" if failed else "")
        cells = [(_mean_std(row[f"{m}_mean"], row[f"{m}_std"]), flags[m][i]) for m in TABLE_METRICS]
        rank = "—" if not np.isfinite(row["rank"]) else f"{row['rank']:g}"
        rows.append([(row["method"], False), (runs, False)] + cells + [(rank, rank_flags[i])])
    headers = ["method", "runs"] + [metric_label(m) for m in TABLE_METRICS] + [f"rank ({metric_label(PRIMARY_METRIC)})"]
    return Table(headers, rows, notes=notes)


def average_rank_table(ranked: pd.DataFrame) -> Table:
    table = average_ranks(ranked)
    flags = _best_flags(table["average_rank"], higher=False)
    rows = [[(r.method, False), (f"{r.average_rank:.2f}", flags[i]), (str(r.settings), False)]
            for i, r in enumerate(table.itertuples())]
    return Table(["method", "average rank", "settings ranked in"], rows,
                 title="Average rank over settings (by mean macro F1; 1 = best)")


def paired_table(paired: pd.DataFrame, setting: str) -> Table:
    part = paired[paired["setting"] == setting]
    rows = []
    for r in part.to_dict("records"):
        deltas = [f"delta_{column}" for column in PAIRED_COLUMNS]
        rows.append([(r["method"], False), (str(r["pairs"]), False)]
                    + [cell for d in deltas for cell in ((_ci(r[d], r[f"{d}_ci_low"], r[f"{d}_ci_high"]), False),
                                                         (_p(r[f"{d}_p"]), False))])
    headers = [h for m in PAIRED_METRICS for h in (f"Δ {metric_label(m)} [95% CI]", "Wilcoxon p")]
    return Table(["method", "pairs"] + headers, rows)


def plain_words(paired: pd.DataFrame, setting: str, baseline: str) -> str:
    """One sentence per setting; 'beats' only where the 95% CI of the paired difference excludes 0."""
    part = paired[paired["setting"] == setting]
    clauses = []
    for r in part.to_dict("records"):
        words = verdict(r["delta_best_macro_f1_ci_low"], r["delta_best_macro_f1_ci_high"], r["pairs"])
        if r["pairs"] == 0:
            continue
        detail = f"macro F1 {r['delta_best_macro_f1']:+.3f}"
        if np.isfinite(r["delta_best_macro_f1_ci_low"]):
            detail += (f", 95% CI {r['delta_best_macro_f1_ci_low']:+.3f} to {r['delta_best_macro_f1_ci_high']:+.3f}, "
                       f"Wilcoxon p = {_p(r['delta_best_macro_f1_p'])}")
        clauses.append(f"{r['method']} {words} {baseline} ({detail}, {r['pairs']} paired runs)")
    return f"{setting}: " + ("; ".join(clauses) if clauses else f"no method has paired runs with {baseline} yet") + "."


def _on_gpu(results: pd.DataFrame, setting: str, method: str) -> bool:
    rows = results[(results["setting"] == setting) & (results["method"] == method) & (results["status"] == DONE)]
    return "device" in rows and len(rows) > 0 and rows["device"].astype(str).str.startswith("cuda").all()


def cost_table(summary: pd.DataFrame, results: pd.DataFrame, setting: str) -> Table:
    part = summary[(summary["setting"] == setting) & (summary["n"] > 0)]
    rows = []
    for r in part.to_dict("records"):
        memory = _fmt(r["peak_memory_mb_mean"], 0) if _on_gpu(results, setting, r["method"]) else "—"
        rows.append([(r["method"], False), (_fmt(r["train_seconds_mean"], 1), False),
                     (_fmt(r["images_per_second_mean"], 1), False), (_fmt(r["data_wait_ms_mean"], 1), False),
                     (_fmt(r["forward_backward_ms_mean"], 1), False), (_fmt(r["distill_extras_ms_mean"], 1), False),
                     (memory, False), (_fmt(r["extra_parameters_mean"], 0), False)])
    return Table(["method", "train s", "images/s", "data wait ms/step", "fwd+bwd ms/step", "distill extras ms/step",
                  "peak GPU memory MB", "extra parameters"], rows)


def external_table(summary: pd.DataFrame, setting: str) -> Table:
    part = summary[(summary["setting"] == setting) & (summary["n"] > 0)].reset_index(drop=True)
    flags = {m: _best_flags(part[f"ext_{m}_mean"]) for m in TABLE_METRICS}
    rows = [[(r["method"], False)] + [(_mean_std(r[f"ext_{m}_mean"], r[f"ext_{m}_std"]), flags[m][i]) for m in TABLE_METRICS]
            for i, r in part.iterrows()]
    return Table(["method"] + [metric_label(m) for m in TABLE_METRICS], rows)


def failure_table(results: pd.DataFrame) -> Table:
    rows = [[(f"{r.setting}/{r.method}/fold{r.fold}-seed{r.seed}", False), (r.status, False), (r.message, False)]
            for r in failure_rows(results).itertuples()]
    return Table(["cell", "status", "message"], rows)


def teacher_table(cfg: CompareConfig, teachers: dict[str, TeacherInfo]) -> Table:
    """Each teacher's own held-out test metrics against chance, and whether it clears the margin."""
    margin = cfg.min_teacher_margin
    rows = []
    for name, info in teachers.items():
        spec = cfg.teachers[name]
        source = spec.checkpoint or (cfg.training_tree(spec.sections()).get("data") or {}).get("source") or ""
        settings = ", ".join(s for s, setting in cfg.settings.items() if setting.teacher == name)
        test = info.test or {}
        f1 = float(test.get("macro_f1", float("nan")))
        chance = info.chance if info.chance is not None else float("nan")
        if info.error:
            verdict_text = "failed"
        elif not test:
            verdict_text = "unknown (a checkpoint without its run folder)" if spec.checkpoint else "unknown (no test split)"
        elif margin is None:
            verdict_text = "—"
        else:
            verdict_text = "weak teacher" if info.weak else "competent"
        rows.append([(name, False), (str(source), False), (settings, False), (str(len(info.classes or [])), False),
                     (_fmt(float(test.get("accuracy", float("nan")))), False), (_fmt(f1), False), (_fmt(chance), False),
                     (_ci(f1 - chance, float("nan"), float("nan")) if np.isfinite(f1 - chance) else "—", False),
                     (verdict_text, info.weak)])
    notes = [f"competent = test macro F1 ≥ chance + {margin:g} (min_teacher_margin)"] if margin is not None else []
    return Table(["teacher", "data", "settings", "classes", "test accuracy", "test macro F1", "chance (1/classes)",
                  "macro F1 − chance", "verdict"], rows, notes=notes)


def label_savings_table(cfg: CompareConfig, paired: pd.DataFrame, settings: list[str], sizes: list[str]) -> Table:
    """Per setting and method: the smallest size at which the 95% CI of Δ macro F1 against the
    baseline lies above 0 (with that Δ), or 'none'."""
    methods = [m for m in cfg.methods if m != cfg.baseline]
    rows = []
    for setting in settings:
        row = [(setting, False)]
        for method in methods:
            part = paired[(paired["setting"] == setting) & (paired["method"] == method)] if len(paired) else paired
            if part is None or part.empty:
                row.append(("n/a", False))
                continue
            text = "none"
            for size in sizes:
                hit = part[(part["size"] == size) & (part["delta_best_macro_f1_ci_low"] > 0)]
                if len(hit):
                    text = f"{size} ({hit['delta_best_macro_f1'].iloc[0]:+.3f})"
                    break
            row.append((text, text != "none"))
        rows.append(row)
    return Table(["setting"] + methods, rows, title="Smallest size at which a method beats the baseline "
                 "(95% CI of Δ macro F1 above 0; Δ in brackets)")


def contrastive_table(results: pd.DataFrame, setting: str) -> Table:
    """MoMA's diagnostics (docs/moma.md, "Which MoMA you get"), last epoch, mean over the runs of
    each method that logged them: is its contrastive term still carrying information?"""
    part = results[(results["setting"] == setting) & results["diag_nce"].notna()]
    rows = []
    for method, runs in part.groupby("method", sort=False):
        share = (runs["diag_nce"] / runs["diag_nce_chance"]).mean()
        rows.append([(method, False), (str(len(runs)), False), (_fmt(runs["val_macro_f1"].mean()), False),
                     (_fmt(runs["diag_nce"].mean()), False), (f"{share:.1%}", share < 0.01 or share > 0.95),
                     (_fmt(runs["diag_nce_retrieval"].mean()), False), (_fmt(runs["diag_nce_query_cos"].mean()), False),
                     (_fmt(runs["diag_nce_key_cos"].mean()), False), (_fmt(runs["diag_nce_query_norm"].mean(), 2), False)])
    return Table(["method", "runs", "val macro F1", "L_NCE", "L_NCE / ln(K+1)", "in-batch retrieval",
                  "query cosine", "key cosine", "query norm"], rows)


def to_markdown(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold else text

    lines = ([f"**{table.title}**", ""] if table.title else [])
    lines.append("| " + " | ".join(table.headers) + " |")
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(cell(t, b) for t, b in row) + " |" for row in table.rows]
    if table.notes:
        lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines)


def to_html(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = html.escape(text)
        return f"<td><strong>{text}</strong></td>" if bold else f"<td>{text}</td>"

    parts = [f"<p><strong>{html.escape(table.title)}</strong></p>"] if table.title else []
    parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(cell(t, b) for t, b in row) + "</tr>" for row in table.rows]
    parts.append("</tbody></table>")
    if table.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(parts)

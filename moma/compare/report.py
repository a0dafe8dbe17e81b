"""The report of a grid: ``summary.csv``, ``summary.md``, PNG plots and a self-contained
``report.html`` (tables and the plots embedded as base64, so the one file can be mailed or
archived). The tables are built once and rendered to Markdown and HTML alike."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moma.compare.config import ALL, POOL_SEPARATOR, CompareConfig  # noqa: E402
from moma.compare.results import COST_COLUMNS  # noqa: E402
from moma.compare.status import DONE, FAILED, NOT_APPLICABLE, STATUSES, failure_rows  # noqa: E402
from moma.compare.teachers import TeacherInfo  # noqa: E402
from moma.config import build_config  # noqa: E402
from moma.compare.stats import (  # noqa: E402
    add_ranks,
    average_ranks,
    compare_with_baseline,
    group_keys,
    summarize,
    t_interval,
    verdict,
)
from moma.engine.layout import TEST_BEST_TAG, report_file  # noqa: E402
from moma.engine.plots import plot_confusion, plt, save_figure  # noqa: E402
from moma.metrics import PAIRED_METRICS, PRIMARY_METRIC, TABLE_METRICS, metric_label, metric_names  # noqa: E402
from moma.utils.io import atomic_write_text  # noqa: E402

GRID_SUMMARY_NAME, GRID_SUMMARY_MD_NAME = "summary.csv", "summary.md"  # per setting x method; a run's per-epoch table is history.csv
RANK_BY = f"{PRIMARY_METRIC}_mean"
PAIRED_COLUMNS = [f"best_{m}" for m in PAIRED_METRICS]
SIZE_COLUMNS = ["train_tiles", "train_tiles_per_class", "optimizer_steps"]


# ---------------------------------------------------------------------- tables
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


# ---------------------------------------------------------------------- plots
def _colours(methods: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_bars(summary: pd.DataFrame, settings: list[str], methods: list[str], path: Path) -> None:
    """Mean ± std of the paired metrics (macro F1 and accuracy), one panel per setting."""
    colours = _colours(methods)
    fig, axes = plt.subplots(len(PAIRED_METRICS), len(settings), figsize=(1.2 + 3.4 * len(settings), 6.4), squeeze=False, sharey="row")
    for col, setting in enumerate(settings):
        part = summary[summary["setting"] == setting].set_index("method").reindex(methods)
        x = np.arange(len(methods))
        for row, metric in enumerate(PAIRED_METRICS):
            ax = axes[row][col]
            means = part[f"{metric}_mean"].to_numpy(dtype=float)
            ax.bar(x, np.nan_to_num(means), yerr=part[f"{metric}_std"].fillna(0.0).to_numpy(), capsize=4,
                   color=[colours[m] for m in methods])
            for i in np.flatnonzero(~np.isfinite(means)):
                ax.text(x[i], 0.02, "n/a", ha="center", va="bottom", fontsize=9, color="#666")
            ax.set_xticks(x, methods, rotation=30, ha="right")
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(setting)
            if col == 0:
                ax.set_ylabel(f"test {metric_label(metric)} (mean ± std)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_time_scatter(results: pd.DataFrame, methods: list[str], settings: list[str], path: Path) -> None:
    """Test accuracy against training time, one point per finished cell."""
    colours = _colours(methods)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    done = results[results["status"] == DONE]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s_index, setting in enumerate(settings):
        for method in methods:
            part = done[(done["setting"] == setting) & (done["method"] == method)]
            if len(part):
                ax.scatter(part["train_seconds"], part["best_accuracy"], color=colours[method],
                           marker=markers[s_index % len(markers)], alpha=0.8, label=f"{setting} / {method}")
    ax.set_xlabel("training time per run (s)")
    ax.set_ylabel("test accuracy (best-by-validation model)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def summed_confusion(out: Path, results: pd.DataFrame, setting: str, method: str) -> tuple[np.ndarray, list[str]] | None:
    """The test confusion matrices of a method's finished cells, summed over folds x seeds."""
    rows = results[(results["setting"] == setting) & (results["method"] == method) & (results["status"] == DONE)]
    total, names = None, None
    for run_dir in rows["run_dir"]:
        path = out / run_dir / report_file("confusion_csv", TEST_BEST_TAG)
        if not path.is_file():
            continue
        frame = pd.read_csv(path, index_col=0)
        total = frame.to_numpy() if total is None else total + frame.to_numpy()
        names = [c.removeprefix("pred_") for c in frame.columns]
    return None if total is None else (total, names)


def curve_points(results: pd.DataFrame, setting: str, method: str, metric: str = "best_macro_f1") -> pd.DataFrame:
    """Per size of one setting: x = mean labelled training tiles per class used (the same subsets for
    every method), and the method's mean and 95% CI half-width of ``metric``."""
    done = results[(results["setting"] == setting) & (results["status"] == "done")]
    rows = []
    for size, part in done.groupby("size", sort=False):
        x = float(part["train_tiles_per_class"].mean())
        values = part.loc[part["method"] == method, metric].to_numpy(dtype=float)
        mean, half = t_interval(values[np.isfinite(values)])
        if np.isfinite(x) and np.isfinite(mean):
            rows.append({"size": size, "x": x, "mean": mean, "half": half})
    return pd.DataFrame(rows, columns=["size", "x", "mean", "half"]).sort_values("x")


def curve_style(method: str, colours: dict[str, tuple]) -> dict:
    """A method entry's line: the colour of its method; dashed, and named so, with an unlabelled pool."""
    base, _, pool = method.partition(POOL_SEPARATOR)
    if not pool:
        return {"color": colours[base], "label": method, "linestyle": "-"}
    return {"color": colours[base], "label": f"{base} with unlabelled tiles ({pool})", "linestyle": "--"}


def plot_learning_curve(results: pd.DataFrame, setting: str, methods: list[str], path: Path, title: str) -> bool:
    """Test macro F1 against labelled tiles per class (log x), mean and 95% CI band per method; a
    method run with an unlabelled pool is drawn dashed in its method's colour."""
    colours = _colours(list(dict.fromkeys(m.partition(POOL_SEPARATOR)[0] for m in methods)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    ticks: set[float] = set()
    for method in methods:
        points = curve_points(results, setting, method)
        if points.empty:
            continue
        drawn = True
        ticks.update(points["x"].round(1))
        x, mean, half = points["x"].to_numpy(), points["mean"].to_numpy(), points["half"].to_numpy()
        style = curve_style(method, colours)
        ax.plot(x, mean, marker="o", **style)
        band = np.isfinite(half)
        if band.any():
            ax.fill_between(x[band], (mean - half)[band], (mean + half)[band], color=style["color"], alpha=0.15)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("labelled training tiles per class (log scale)")
    ax.set_ylabel("test macro F1 (mean, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def learning_curve_images(ctx: "ReportContext", results: pd.DataFrame) -> list[tuple[str, Path]]:
    plots = ctx.out / "plots"
    plots.mkdir(exist_ok=True)
    images = []
    for setting in ctx.cfg.settings:
        path = plots / f"curve_{setting}.png"
        title = _setting_heading(ctx.cfg, setting, ctx.teachers)
        if plot_learning_curve(results, setting, ctx.cfg.methods_of(setting), path, title):
            images.append((f"{setting}: test macro F1 against labelled tiles per class (mean and 95% CI)", path))
    return images


# ---------------------------------------------------------------------- the report
@dataclass
class ReportContext:
    cfg: CompareConfig
    out: Path
    command: str
    date: str
    machine: dict[str, str]
    wall_seconds: float
    trained: int
    config_yaml: str
    teachers: dict[str, TeacherInfo] = field(default_factory=dict)


@dataclass
class Figure:
    path: Path
    caption: str


def build_summary(cfg: CompareConfig, results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary frame (one row per setting x method) and the paired comparison frame."""
    names = metric_names()
    columns = [f"best_{m}" for m in names] + [f"last_{m}" for m in names]
    columns += [f"ext_{m}" for m in names if f"ext_{m}" in results] + COST_COLUMNS
    columns += [c for c in SIZE_COLUMNS if c in results]
    summary = summarize(results, columns)
    summary.columns = [c.removeprefix("best_") for c in summary.columns]
    ranked = add_ranks(summary, RANK_BY)
    averages = average_ranks(ranked).rename(columns={"settings": "ranked_settings"})
    ranked = ranked.merge(averages, on="method", how="left")
    paired = compare_with_baseline(results, cfg.baseline, PAIRED_COLUMNS) if cfg.baseline else pd.DataFrame()
    if len(paired):
        ranked = ranked.merge(paired.drop(columns=["baseline"]), on=group_keys(ranked) + ["method"], how="left")
    return ranked, paired


def _setting_heading(cfg: CompareConfig, setting: str, teachers: dict[str, TeacherInfo] | None = None) -> str:
    spec = cfg.settings[setting]
    teacher = f"teacher {spec.teacher}" if spec.teacher else "no teacher"
    text = f"{setting} ({teacher})"
    if teachers and spec.teacher in teachers and teachers[spec.teacher].weak:
        text += " — weak teacher"
    return text + (f" — {spec.description}" if spec.description else "")


def size_words(cfg: CompareConfig, size: str) -> str:
    if size == ALL:
        return "all training tiles of the fold"
    if cfg.train_per_class is not None:
        return f"{size} labelled tiles per class"
    return f"{float(size):.0%} of each class's training tiles"


def _at(frame: pd.DataFrame, size: str) -> pd.DataFrame:
    return frame[frame["size"] == size] if "size" in frame.columns else frame


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


CONTRAST_COLUMNS = ["diag_nce", "diag_nce_chance", "diag_nce_retrieval", "diag_nce_query_cos", "diag_nce_key_cos",
                    "diag_nce_query_norm"]


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


def _sections(ctx: ReportContext, results: pd.DataFrame, ranked: pd.DataFrame, paired: pd.DataFrame):
    """(heading level, heading, list of Tables / str paragraphs) in report order."""
    cfg = ctx.cfg
    settings = list(cfg.settings)
    sizes = cfg.sizes() or [ALL]
    curve = cfg.sizes() is not None
    runs = f"{cfg.folds} fold{'s' if cfg.folds > 1 else ''} x {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}"
    if ctx.teachers:
        weak = [name for name, info in ctx.teachers.items() if info.weak]
        yield 2, "Teachers", [
            "Each teacher's own test split (data it never trained on; by patient where its data has patient "
            "ids), best-by-validation model." + (f" Weak: {', '.join(weak)}; the settings using them are marked "
                                                 "'weak teacher' and test transfer from a network that learnt little "
                                                 "that generalises." if weak else ""),
            teacher_table(cfg, ctx.teachers)]
    if curve:
        blocks: list = [f"Test macro F1 of the best-by-validation model against the labelled training tiles per class "
                        f"actually used (log scale; mean over {runs}, band = 95% t-interval). Every method of a fold "
                        "and seed learns from the same subset; validation and test sets are the fold's, whole."]
        blocks += [Figure(path, caption) for caption, path in learning_curve_images(ctx, results)]
        if cfg.baseline and len(paired):
            blocks.append(label_savings_table(cfg, paired, settings, sizes))
        yield 2, "Learning curves", blocks
    yield 2, "Test metrics", [
        f"Test split of each fold, model with the best validation {build_config(cfg.base).train.select_metric}; "
        f"mean ± std over {runs}; best value per column in bold; 'runs' = finished / planned cells."]
    for setting in settings:
        heading = _setting_heading(cfg, setting, ctx.teachers)
        if not curve:
            yield 3, heading, [metrics_table(results, ranked, setting)]
            continue
        yield 3, heading, []
        for size in sizes:
            yield 4, f"{setting}: {size_words(cfg, size)}", [metrics_table(_at(results, size), _at(ranked, size), setting)]
    yield 2, "Ranks", [average_rank_table(ranked)] + (["Ranks are taken per setting and size."] if curve else [])
    if cfg.baseline and len(paired):
        yield 2, f"Paired comparison with the vanilla student ({cfg.baseline})", [
            "Difference method − baseline on the same folds and seeds: mean with its 95% confidence interval "
            "(t-distribution over the paired differences) and the two-sided Wilcoxon signed-rank p-value. "
            "'beats' only where the interval excludes 0."]
        for setting in settings:
            if setting not in set(paired["setting"]):
                continue
            for size in sizes:
                part = _at(paired, size)
                if setting in set(part["setting"]):
                    title = f"{setting}: {size_words(cfg, size)}" if curve else setting
                    yield 3, title, [paired_table(part, setting), plain_words(part, setting, cfg.baseline)]
    if set(CONTRAST_COLUMNS) <= set(results.columns) and results["diag_nce"].notna().any():
        yield 2, "Contrastive term", [
            "Last training epoch, mean over runs (history.csv of each run has every epoch). L_NCE near 0 % of "
            "its chance level ln(K+1) is a shortcut, near 100 % keys without per-sample signal (both in bold); "
            "in-batch retrieval: share of queries whose best positive key in the batch is their own (chance "
            "1/batch); cosines: mean pairwise cosine within a batch (1 = one vector)."
            + (f" Runs with {size_words(cfg, sizes[-1])}." if curve else "")]
        last = _at(results, sizes[-1])
        for setting in settings:
            if last[(last["setting"] == setting)]["diag_nce"].notna().any():
                yield 3, setting, [contrastive_table(last, setting)]
    if any(c.startswith("ext_") for c in results.columns):
        yield 2, "External test", ["The same best-by-validation models on each setting's external data."]
        for setting in settings:
            if cfg.settings[setting].external_test is not None:
                yield 3, f"{setting}: {cfg.settings[setting].external_test.source}", [external_table(ranked, setting)]
    yield 2, "Cost", ["Means per run; step times from the training loop (data wait, forward + backward, the "
                      "method's own extra work); peak GPU memory is CUDA's allocated peak of each run. CPU runs "
                      "show no memory figure: they share the grid's process, whose peak RSS (in results.csv) is "
                      "not any one run's." + (f" Runs with {size_words(cfg, sizes[-1])}." if curve else "")]
    for setting in settings:
        yield 3, setting, [cost_table(_at(ranked, sizes[-1]), _at(results, sizes[-1]), setting)]
    failed = failure_table(results)
    if failed.rows:
        yield 2, "Failures", ["Every traceback is in the cell folder's error.txt; a re-run retries these cells.", failed]


def _header_lines(ctx: ReportContext, results: pd.DataFrame) -> list[tuple[str, str]]:
    counts = results["status"].value_counts()
    status = ", ".join(f"{int(counts.get(s, 0))} {s.replace('_', ' ')}" for s in STATUSES)
    machine = ctx.machine
    return [
        ("command", ctx.command),
        ("date", ctx.date),
        ("machine", f"{machine['platform']}; {machine['cpus']} CPUs; torch {machine['torch']}; device {machine['device']}"),
        ("cells", f"{len(results)} ({status})"),
        ("this invocation", f"{ctx.trained} runs trained in {ctx.wall_seconds:.0f} s wall time"),
        ("folder", str(ctx.out)),
    ]


def render_markdown(ctx: ReportContext, results: pd.DataFrame, ranked: pd.DataFrame, paired: pd.DataFrame,
                    images: list[tuple[str, Path]]) -> str:
    lines = [f"# Comparison: {ctx.cfg.name}", ""]
    lines += [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in _header_lines(ctx, results)]
    for level, heading, blocks in _sections(ctx, results, ranked, paired):
        lines += ["", "#" * level + " " + heading]
        for block in blocks:
            if isinstance(block, Figure):
                lines += ["", f"![{block.caption}]({block.path.relative_to(ctx.out).as_posix()})"]
            else:
                lines += ["", to_markdown(block) if isinstance(block, Table) else block]
    lines += ["", "## Plots", ""] + [f"![{caption}]({path.relative_to(ctx.out).as_posix()})" for caption, path in images]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f0f3f7; } td:first-child, th:first-child { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; font-size: 14px; }
dt { font-weight: 600; } dd { margin: 0; } code, pre { background: #f6f8fa; }
pre { padding: 0.8em; overflow-x: auto; font-size: 12px; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; } figcaption { font-size: 13px; color: #555; }
"""


def _embedded(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(ctx: ReportContext, results: pd.DataFrame, ranked: pd.DataFrame, paired: pd.DataFrame,
                images: list[tuple[str, Path]]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Comparison: {html.escape(ctx.cfg.name)}"
             f"</title><style>{CSS}</style></head><body>", f"<h1>Comparison: {html.escape(ctx.cfg.name)}</h1>", "<dl>"]
    for key, value in _header_lines(ctx, results):
        shown = f"<code>{html.escape(value)}</code>" if key == "command" else html.escape(value)
        parts.append(f"<dt>{html.escape(key)}</dt><dd>{shown}</dd>")
    parts.append("</dl>")
    parts.append(f"<details><summary>compare config</summary><pre>{html.escape(ctx.config_yaml)}</pre></details>")
    for level, heading, blocks in _sections(ctx, results, ranked, paired):
        parts.append(f"<h{level}>{html.escape(heading)}</h{level}>")
        for block in blocks:
            if isinstance(block, Figure):
                parts.append(_embedded(block.path, block.caption))
            else:
                parts.append(to_html(block) if isinstance(block, Table) else f"<p>{html.escape(block)}</p>")
    parts.append("<h2>Plots</h2>")
    parts += [_embedded(path, caption) for caption, path in images]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def make_plots(ctx: ReportContext, results: pd.DataFrame, ranked: pd.DataFrame) -> list[tuple[str, Path]]:
    cfg, plots = ctx.cfg, ctx.out / "plots"
    plots.mkdir(exist_ok=True)
    settings, methods = list(cfg.settings), list(cfg.methods)
    largest = (cfg.sizes() or [ALL])[-1]  # one size per bar chart and confusion matrix: the largest
    results, ranked = _at(results, largest), _at(ranked, largest)
    images = []
    if (ranked["n"] > 0).any():
        plot_bars(ranked, settings, methods, plots / "bars.png")
        images.append(("test macro F1 and accuracy per setting (mean ± std over folds x seeds)", plots / "bars.png"))
    for setting in settings:
        part = ranked[(ranked["setting"] == setting) & (ranked["n"] > 0)]
        if part.empty:
            continue
        best = part.sort_values(RANK_BY, ascending=False, kind="stable")["method"].iloc[0]
        shown = [best] + ([cfg.baseline] if cfg.baseline and cfg.baseline != best and cfg.baseline in set(part["method"]) else [])
        for method in shown:
            summed = summed_confusion(ctx.out, results, setting, method)
            if summed is None:
                continue
            role = "best method" if method == best else "vanilla student"
            path = plots / f"confusion_{setting}_{method}.png"
            plot_confusion(summed[0], summed[1], path, title=f"{setting}: {method} ({role})")
            images.append((f"{setting}: test confusion matrix of {method} ({role}), summed over folds x seeds", path))
    if (results["status"] == DONE).any():
        plot_time_scatter(results, methods, settings, plots / "accuracy_vs_time.png")
        images.append(("test accuracy vs training time, one point per run", plots / "accuracy_vs_time.png"))
    return images


def write_grid_report(ctx: ReportContext, results: pd.DataFrame) -> pd.DataFrame:
    """Write summary.csv, summary.md, plots/ and report.html; returns the summary frame."""
    ranked, paired = build_summary(ctx.cfg, results)
    atomic_write_text(ctx.out / GRID_SUMMARY_NAME, ranked.to_csv(index=False, float_format="%.6g"))
    images = make_plots(ctx, results, ranked)
    atomic_write_text(ctx.out / GRID_SUMMARY_MD_NAME, render_markdown(ctx, results, ranked, paired, images))
    atomic_write_text(ctx.out / "report.html", render_html(ctx, results, ranked, paired, images))
    return ranked

"""The report of a grid: ``summary.csv``, ``summary.md``, PNG plots and a self-contained
``report.html`` (tables and the plots embedded as base64, so the one file can be mailed or
archived). The tables (`report_tables`) are built once and rendered to Markdown and HTML alike;
the plots are drawn by `report_plots`."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from moma.compare.config import ALL, CompareConfig
from moma.compare.report_plots import plot_bars, plot_learning_curve, plot_time_scatter, summed_confusion
from moma.compare.report_tables import (
    CONTRAST_COLUMNS,
    PAIRED_COLUMNS,
    Table,
    average_rank_table,
    contrastive_table,
    cost_table,
    external_table,
    failure_table,
    label_savings_table,
    metrics_table,
    paired_table,
    plain_words,
    teacher_table,
    to_html,
    to_markdown,
)
from moma.compare.results import COST_COLUMNS
from moma.compare.stats import add_ranks, average_ranks, compare_with_baseline, group_keys, summarize
from moma.compare.status import DONE, STATUSES
from moma.compare.teachers import TeacherInfo
from moma.config import build_config
from moma.engine.plots import plot_confusion
from moma.metrics import PRIMARY_METRIC, metric_names
from moma.utils.io import atomic_write_text

GRID_SUMMARY_NAME, GRID_SUMMARY_MD_NAME = "summary.csv", "summary.md"  # per setting x method; a run's per-epoch table is history.csv
RANK_BY = f"{PRIMARY_METRIC}_mean"
SIZE_COLUMNS = ["train_tiles", "train_tiles_per_class", "optimizer_steps"]


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


def learning_curve_images(ctx: ReportContext, results: pd.DataFrame) -> list[tuple[str, Path]]:
    plots = ctx.out / "plots"
    plots.mkdir(exist_ok=True)
    images = []
    for setting in ctx.cfg.settings:
        path = plots / f"curve_{setting}.png"
        title = _setting_heading(ctx.cfg, setting, ctx.teachers)
        if plot_learning_curve(results, setting, ctx.cfg.methods_of(setting), path, title):
            images.append((f"{setting}: test macro F1 against labelled tiles per class (mean and 95% CI)", path))
    return images


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

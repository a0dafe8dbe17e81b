"""``moma compare CONFIG``: the paper's experiment as one command.

Transfer settings x methods x folds x seeds, each run in its own folder of one compare folder,
then ``results.csv`` (one row per run), ``summary.csv``/``summary.md`` (mean ± std, ranks, paired
tests against the vanilla student), PNG plots and a self-contained ``report.html``. Re-running the
same command completes only the missing runs. See :mod:`moma.compare.config` for the YAML.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
from datetime import datetime
from pathlib import Path

import yaml

from moma.compare.config import CompareConfig, load_compare_config
from moma.compare.grid import Grid, GridRun
from moma.compare.grid_log import grid_logging
from moma.compare.locks import exclusive, lock_path
from moma.compare.plan import COMPARE_CONFIG_NAME, choose_out_dir, parse_shard, shard_cells
from moma.compare.report import ReportContext, write_grid_report
from moma.compare.results import RESULTS_NAME, build_results, failures
from moma.compare.status import DONE, FAILED, NOT_APPLICABLE, PENDING
from moma.compare.teachers import prepare_teachers
from moma.errors import ConfigError
from moma.utils.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["CompareConfig", "load_compare_config", "report_only", "run_compare"]


def machine_info(device_spec: str) -> dict[str, str]:
    import torch

    from moma.engine.device import resolve_device

    try:
        device = resolve_device(device_spec)
        shown = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    except Exception as exc:  # noqa: BLE001 - the header must not fail the report
        shown = f"unknown ({exc})"
    return {"platform": platform.platform(), "cpus": str(os.cpu_count()), "torch": torch.__version__, "device": shown}


def command_line(config_path, overrides, out_dir, resume, shard: str | None = None, report_only: bool = False) -> str:
    words = ["moma", "compare", str(config_path)]
    for text in overrides or []:
        words += ["--set", text]
    if out_dir:
        words += ["--out", str(out_dir)]
    if not resume:
        words.append("--fresh")
    if shard:
        words += ["--shard", shard]
    if report_only:
        words.append("--report-only")
    return shlex.join(words)


def write_outputs(cfg: CompareConfig, out: Path, run: GridRun, command: str, grid: Grid | None = None) -> None:
    """results.csv, failures.csv and (unless interrupted) the report, under a lock: shards that
    finish together write one after the other, each from every cell folder finished so far."""
    with exclusive(lock_path(out, "report")):
        if grid is not None:
            grid.fill_from_folders(run)
        results = build_results(cfg, out, run)
        atomic_write_text(out / RESULTS_NAME, results.to_csv(index=False, float_format="%.6g"))
        atomic_write_text(out / "failures.csv", failures(results).to_csv(index=False))
        if run.interrupted:
            return
        from moma.config import build_config

        ctx = ReportContext(cfg, out, command, datetime.now().astimezone().isoformat(timespec="seconds"),
                            machine_info(build_config(cfg.base).run.device), run.seconds, run.trained,
                            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                            teachers=grid.teachers if grid is not None else {})
        write_grid_report(ctx, results)


def report_only(config_path: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None) -> Path:
    """Tables, plots and report.html of whatever cells of the folder are finished; trains nothing
    (e.g. while shards are still running, or after the last one ended)."""
    cfg = load_compare_config(config_path, overrides)
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name
    if not (out / COMPARE_CONFIG_NAME).is_file():
        raise ConfigError(f"{out} is not a compare folder (no compare.yaml): run the grid first, or name it with --out")
    grid = Grid(cfg, out)
    run = GridRun(grid.cells())
    grid.check_existing_runs(run.cells)
    with grid_logging(out):
        grid.teachers = prepare_teachers(grid, train=False)
        grid.classify(run)
        write_outputs(cfg, out, run, command_line(config_path, overrides, out_dir, True, report_only=True), grid)
        counts = {s: sum(o.status == s for o in run.outcomes.values()) for s in (DONE, FAILED, NOT_APPLICABLE, PENDING)}
        log.info("report of %d done, %d failed, %d not applicable, %d pending cells: %s", counts[DONE], counts[FAILED],
                 counts[NOT_APPLICABLE], counts[PENDING], out / "report.html")
    return out


def run_compare(config_path: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None,
                resume: bool = True, shard: str | None = None) -> Path:
    """Run (or complete) the grid of a compare config; returns the compare folder.

    ``resume`` (the default) reuses the folder and trains only missing cells; ``resume=False``
    starts a new folder (``<name>-2``, ...) when the folder is taken, never overwriting one.
    ``shard="K/N"`` trains only the K-th of N disjoint shares of the cells into the same folder
    (N processes may run at once; see docs/compare.md); its report covers every finished cell."""
    cfg = load_compare_config(config_path, overrides)
    share = parse_shard(shard) if shard else None
    if share is not None and not resume:
        raise ConfigError("--shard and --fresh do not go together: the shards must share one folder (name it with --out)")
    out = choose_out_dir(cfg, out_dir, resume)
    command = command_line(config_path, overrides, out_dir, resume, shard)
    grid = Grid(cfg, out)
    run = GridRun(grid.cells())
    if share is not None:
        run.shard = shard_cells(run.cells, *share)
    grid.check_existing_runs(run.cells)
    atomic_write_text(out / COMPARE_CONFIG_NAME, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with grid_logging(out):
        log.info("compare folder: %s%s", out, f" (shard {shard})" if shard else "")
        try:
            grid.run(run)
        except KeyboardInterrupt:
            write_outputs(cfg, out, run, command, grid)  # results.csv with the pending cells
            raise
        write_outputs(cfg, out, run, command, grid)
        counts = {s: sum(o.status == s for o in run.outcomes.values()) for s in (DONE, FAILED, NOT_APPLICABLE)}
        log.info("%d done, %d failed, %d not applicable; %d runs trained in %.0f s. Report: %s", counts[DONE],
                 counts[FAILED], counts[NOT_APPLICABLE], run.trained, run.seconds, out / "report.html")
    return out

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
from moma.compare.grid import COMPARE_CONFIG_NAME, Grid, GridRun, choose_out_dir, grid_logging
from moma.compare.report import ReportContext, write_report
from moma.compare.results import build_results, failures
from moma.compare.status import DONE, FAILED, NOT_APPLICABLE
from moma.utils.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["CompareConfig", "load_compare_config", "run_compare"]


def machine_info(device_spec: str) -> dict[str, str]:
    import torch

    from moma.engine.device import resolve_device

    try:
        device = resolve_device(device_spec)
        shown = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    except Exception as exc:  # noqa: BLE001 - the header must not fail the report
        shown = f"unknown ({exc})"
    return {"platform": platform.platform(), "cpus": str(os.cpu_count()), "torch": torch.__version__, "device": shown}


def command_line(config_path, overrides, out_dir, resume) -> str:
    words = ["moma", "compare", str(config_path)]
    for text in overrides or []:
        words += ["--set", text]
    if out_dir:
        words += ["--out", str(out_dir)]
    if not resume:
        words.append("--fresh")
    return shlex.join(words)


def write_outputs(cfg: CompareConfig, out: Path, run: GridRun, command: str) -> None:
    results = build_results(cfg, out, run)
    atomic_write_text(out / "results.csv", results.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "failures.csv", failures(results).to_csv(index=False))
    if run.interrupted:
        return
    from moma.config import build_config

    ctx = ReportContext(cfg, out, command, datetime.now().astimezone().isoformat(timespec="seconds"),
                        machine_info(build_config(cfg.base).run.device), run.seconds, run.trained,
                        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_report(ctx, results)


def run_compare(config_path: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None,
                resume: bool = True) -> Path:
    """Run (or complete) the grid of a compare config; returns the compare folder.

    ``resume`` (the default) reuses the folder and trains only missing cells; ``resume=False``
    starts a new folder (``<name>-2``, ...) when the folder is taken, never overwriting one."""
    cfg = load_compare_config(config_path, overrides)
    out = choose_out_dir(cfg, out_dir, resume)
    command = command_line(config_path, overrides, out_dir, resume)
    grid = Grid(cfg, out)
    run = GridRun(grid.cells())
    grid.check_existing_runs(run.cells)
    atomic_write_text(out / COMPARE_CONFIG_NAME, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with grid_logging(out):
        log.info("compare folder: %s", out)
        try:
            grid.run(run)
        except KeyboardInterrupt:
            write_outputs(cfg, out, run, command)  # results.csv with the pending cells
            raise
        write_outputs(cfg, out, run, command)
        counts = {s: sum(o.status == s for o in run.outcomes.values()) for s in (DONE, FAILED, NOT_APPLICABLE)}
        log.info("%d done, %d failed, %d not applicable; %d runs trained in %.0f s. Report: %s", counts[DONE],
                 counts[FAILED], counts[NOT_APPLICABLE], run.trained, run.seconds, out / "report.html")
    return out

"""Running the grid: teachers once, then every setting x method x fold x seed cell.

Every run has a fixed folder in the compare folder, so a re-run of the same command skips what
is done (``metrics.json``), resumes what was interrupted (``state.pt``) and trains only the rest::

    OUT/compare.yaml                 the compare config as resolved (rewritten on every run)
    OUT/teachers/<teacher>/          teacher run folders
    OUT/data/<teacher>-{teacher,student}.csv   patient holdout manifests
    OUT/cells/<setting>/<method>/fold<k>-seed<s>/   one training run per cell
    OUT/results.csv, failures.csv, summary.csv, summary.md, report.html, plots/

A cell that raises is logged in one line (its traceback goes to the cell's ``error.txt``) and
recorded as failed; the grid goes on. A method that cannot work in a setting (logit matching with a
teacher of other classes, or a teacher-based method without a teacher) is recorded as
``not_applicable`` and is neither trained nor counted as a failure.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from moma.compare.config import REST, CompareConfig
from moma.compare.locks import exclusive, lock_path
from moma.compare.plan import Cell, GridPlan, absolute_path
from moma.compare.status import DONE, FAILED, NOT_APPLICABLE, PENDING
from moma.compare.teachers import TeacherInfo, prepare_holdouts, prepare_teachers
from moma.compare.training import train_or_resume
from moma.config import Config
from moma.engine.layout import BEST_NAME, EVAL_TAG, METRICS_NAME, report_file

log = logging.getLogger(__name__)

EXTERNAL_DIR = "external"
ERROR_NAME = "error.txt"  # a failed cell's traceback


@dataclass
class Outcome:
    status: str
    message: str = ""


@dataclass
class GridRun:
    """What one invocation did: the status of every cell, and its wall time."""

    cells: list[Cell]
    outcomes: dict[Cell, Outcome] = field(default_factory=dict)
    trained: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    shard: set[Cell] | None = None  # the cells this process may train (None: all)


class Grid(GridPlan):
    """The plan's teachers and cells, trained (or skipped, or resumed) in the compare folder."""

    def __init__(self, cfg: CompareConfig, out: Path):
        super().__init__(cfg, out)
        self.teachers: dict[str, TeacherInfo] = {}
        self._target_classes: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ applicability
    def target_classes(self, cell: Cell) -> list[str]:
        from moma.data.tiles import scan_tiles

        if cell.setting not in self._target_classes:
            data = self.cell_config(cell).data
            self._target_classes[cell.setting] = scan_tiles(data.source, data.classes, data.group_column).classes
        return self._target_classes[cell.setting]

    def not_applicable_reason(self, cell: Cell) -> str | None:
        from moma.distill import get_method
        from moma.distill.registry import not_applicable_reason

        method_cls = get_method(self.cfg.registered_name(cell.method))
        if self.cfg.pool_source(cell.method) == REST and self.cfg.size_keys(cell.size) == {}:
            return "with every labelled tile in training, no tile is left for the 'rest' pool"
        teacher_name = self.cfg.settings[cell.setting].teacher
        if teacher_name is None:
            return not_applicable_reason(method_cls, None)
        teacher = self.teachers.get(teacher_name)
        if teacher is None or teacher.classes is None:
            return None  # a failed teacher fails its cells instead
        needs_classes = method_cls.needs_teacher_classes
        return not_applicable_reason(method_cls, teacher.classes, self.target_classes(cell) if needs_classes else None)

    # ------------------------------------------------------------------ cells
    def external_test(self, cell: Cell, cfg: Config) -> None:
        """Evaluate the cell's best model on the setting's external data, once."""
        from moma.engine.device import resolve_device
        from moma.engine.inference import evaluate_checkpoint

        spec = self.cfg.settings[cell.setting].external_test
        out = self.out / cell.rel_dir / EXTERNAL_DIR
        if spec is None or (out / report_file("metrics", EVAL_TAG)).is_file():
            return
        evaluate_checkpoint(self.out / cell.rel_dir / BEST_NAME, absolute_path(spec.source), out,
                            resolve_device(cfg.run.device), mpp=spec.mpp, batch_size=spec.batch_size, progress=False)

    def run_cell(self, cell: Cell) -> tuple[Outcome, bool]:
        """Train (or skip, or resume) one cell; returns its outcome and whether anything was trained."""
        teacher_name = self.cfg.settings[cell.setting].teacher
        teacher = self.teachers.get(teacher_name) if teacher_name else None
        if teacher is not None and teacher.error:
            return Outcome(FAILED, teacher.error), False
        run_dir = self.out / cell.rel_dir
        try:
            cfg = self.cell_config(cell)
            start = time.perf_counter()
            done = train_or_resume(cfg, run_dir, self.cfg.keep_training_state)
            if done != "skipped":
                log.info("cell %s %s in %.0f s", cell.label, done, time.perf_counter() - start, extra={"file_only": True})
        except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the grid
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("cell %s failed: %s", cell.label, message)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ERROR_NAME).write_text(traceback.format_exc())
            return Outcome(FAILED, message), False
        try:
            self.external_test(cell, cfg)
        except Exception as exc:  # noqa: BLE001
            message = f"external test: {type(exc).__name__}: {exc}".splitlines()[0]
            log.error("cell %s: %s", cell.label, message)
            return Outcome(DONE, message), done != "skipped"
        return Outcome(DONE), done != "skipped"

    def run(self, run: GridRun) -> GridRun:
        """Teachers, then every cell of ``run.cells``; ``run`` is filled in as cells finish, so a
        caller still has the partial record after an interruption. Call
        :meth:`check_existing_runs` first."""
        cells = run.cells
        start = time.perf_counter()
        bar = None
        try:
            prepare_holdouts(self)
            self.teachers = prepare_teachers(self)
            self.classify(run)
            todo = [c for c in cells if c not in run.outcomes and (run.shard is None or c in run.shard)]
            finished = sum((self.out / c.rel_dir / METRICS_NAME).is_file() for c in todo)
            log.info("%d cells%s: %d finished before, %d not applicable, %d to run", len(cells),
                     f" ({len(run.shard)} in this shard)" if run.shard is not None else "", finished,
                     sum(o.status == NOT_APPLICABLE for o in run.outcomes.values()), len(todo) - finished)
            bar = tqdm(total=len(todo), initial=finished, desc="compare", unit="cell", dynamic_ncols=True)
            for cell in todo:
                was_done = (self.out / cell.rel_dir / METRICS_NAME).is_file()
                bar.set_postfix_str(cell.label)
                with exclusive(lock_path(self.out, *cell.rel_dir.parts), wait=False) as claimed:
                    if not claimed:
                        log.info("cell %s is being trained by another process: left to it", cell.label)
                        continue
                    outcome, trained = self.run_cell(cell)
                run.outcomes[cell] = outcome
                run.trained += trained
                if not was_done:
                    bar.update(1)
        except KeyboardInterrupt:
            run.interrupted = True
            log.warning("interrupted: re-run the same command to train only the missing cells")
            raise
        finally:
            if bar is not None:
                bar.close()
            run.seconds = time.perf_counter() - start
            self.fill_from_folders(run)
        return run

    def classify(self, run: GridRun) -> None:
        """Record the cells that are not applicable (or whose applicability cannot be decided)."""
        for cell in run.cells:
            if cell in run.outcomes:
                continue
            try:
                reason = self.not_applicable_reason(cell)
            except Exception as exc:  # noqa: BLE001 - e.g. unreadable target data: the cell fails
                run.outcomes[cell] = Outcome(FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0])
                log.error("cell %s failed: %s", cell.label, run.outcomes[cell].message)
                continue
            if reason:
                run.outcomes[cell] = Outcome(NOT_APPLICABLE, reason)

    def fill_from_folders(self, run: GridRun) -> None:
        """Cells this process did not run (another shard's, or all of them for a report-only
        invocation): done, failed or pending as their folders say."""
        for cell in run.cells:
            if cell not in run.outcomes:
                run.outcomes[cell] = folder_outcome(self.out / cell.rel_dir)


def folder_outcome(run_dir: Path) -> Outcome:
    if (run_dir / METRICS_NAME).is_file():
        return Outcome(DONE)
    error = run_dir / ERROR_NAME
    if error.is_file():
        lines = [line for line in error.read_text().splitlines() if line.strip()]
        return Outcome(FAILED, lines[-1] if lines else "failed")
    return Outcome(PENDING)

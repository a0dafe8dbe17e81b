"""The grid's teachers: trained (or found) once before any cell, and each judged on its own
held-out test split against chance."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from moma.compare.holdout import write_holdout_manifests
from moma.compare.locks import exclusive, lock_path
from moma.compare.plan import GridPlan
from moma.compare.training import train_or_resume
from moma.config import build_config
from moma.engine.layout import METRICS_NAME
from moma.engine.result import RunResult

log = logging.getLogger(__name__)


@dataclass
class TeacherInfo:
    checkpoint: Path | None = None
    classes: list[str] | None = None
    error: str | None = None
    test: dict[str, float] | None = None  # its own held-out test metrics (a trained teacher)
    weak: bool = False  # below chance + min_teacher_margin

    @property
    def chance(self) -> float | None:
        return 1.0 / len(self.classes) if self.classes else None


def prepare_holdouts(plan: GridPlan) -> None:
    """The patient holdout manifests of every used teacher that holds out patients (under a lock)."""
    with exclusive(lock_path(plan.out, "data")):
        for name in plan.used_teachers():
            spec = plan.cfg.teachers[name]
            if spec.holdout is None:
                continue
            tree = plan.cfg.training_tree(spec.sections())
            data = build_config(tree, f"teachers.{name}").data
            teacher_csv, _ = plan.holdout_paths(name)
            write_holdout_manifests(data.source, teacher_csv.parent, name, spec.holdout, spec.holdout_seed,
                                    data.classes, data.group_column, spec.holdout_unit)


def prepare_teachers(plan: GridPlan, train: bool = True) -> dict[str, TeacherInfo]:
    """Train (or find) every used teacher. Concurrent shards take a lock per teacher: the first
    trains it, the others wait and then find it finished. ``train=False`` only reads what is on
    disk (a teacher not trained yet is recorded as an error)."""
    teachers: dict[str, TeacherInfo] = {}
    for name in plan.used_teachers():
        spec = plan.cfg.teachers[name]
        try:
            if train and not spec.checkpoint:
                with exclusive(lock_path(plan.out, "teacher", name)):
                    start = time.perf_counter()
                    done = train_or_resume(plan.teacher_config(name), plan.out / "teachers" / name,
                                           plan.cfg.keep_training_state)
                if done != "skipped":
                    log.info("teacher %s %s in %.0f s", name, done, time.perf_counter() - start)
            info = _teacher_info(plan, name)
        except Exception as exc:  # noqa: BLE001 - a failed teacher fails its settings, not the grid
            what = "failed" if train else "is not available (not trained yet?)"
            info = TeacherInfo(checkpoint=plan.teacher_checkpoint(name),
                               error=f"teacher '{name}' {what}: {type(exc).__name__}: {exc}")
            (log.error if train else log.warning)("%s", info.error)
        teachers[name] = info
    _judge_teachers(plan, teachers)
    return teachers


def _teacher_info(plan: GridPlan, name: str) -> TeacherInfo:
    from moma.engine.checkpoint import read_metadata

    info = TeacherInfo(checkpoint=plan.teacher_checkpoint(name))
    info.classes = read_metadata(info.checkpoint).class_names
    # A given checkpoint still has held-out metrics when it sits in its own run folder.
    run_dir = info.checkpoint if info.checkpoint.is_dir() else info.checkpoint.parent
    if (run_dir / METRICS_NAME).is_file():
        best = RunResult.read(run_dir).best
        info.test = best.test if best else None
    return info


def _judge_teachers(plan: GridPlan, teachers: dict[str, TeacherInfo]) -> None:
    """Mark (and warn about) teachers whose own held-out macro F1 is below chance + the margin."""
    margin = plan.cfg.min_teacher_margin
    for name, info in teachers.items():
        if margin is None or info.test is None or info.chance is None:
            continue
        f1 = float(info.test.get("macro_f1", float("nan")))
        info.weak = not f1 >= info.chance + margin
        if info.weak:
            settings = [s for s, spec in plan.cfg.settings.items() if spec.teacher == name]
            log.warning("teacher %s: test macro F1 %.3f on its own held-out split is below chance %.3f + "
                        "min_teacher_margin %.2f; settings %s are marked 'weak teacher'", name, f1, info.chance,
                        margin, ", ".join(settings))

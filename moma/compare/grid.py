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
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from tqdm import tqdm

from moma.compare.config import REST, CompareConfig
from moma.compare.holdout import write_holdout_manifests
from moma.compare.locks import exclusive, lock_path
from moma.compare.status import DONE, FAILED, NOT_APPLICABLE, PENDING
from moma.config import Config, build_config
from moma.engine.result import RunResult
from moma.engine.layout import BEST_NAME, CONFIG_NAME, EVAL_TAG, LAST_NAME, METRICS_NAME, STATE_NAME, report_file
from moma.engine.runs import create_run_dir
from moma.errors import ConfigError

log = logging.getLogger(__name__)

EXTERNAL_DIR = "external"
COMPARE_CONFIG_NAME = "compare.yaml"
ERROR_NAME = "error.txt"  # a failed cell's traceback
# Keys that change how a run executes, not what it computes: ignored when a re-run checks that a
# finished cell was trained with the config it would get now.
VOLATILE_KEYS = {("run", "name"), ("run", "output_dir"), ("run", "device"), ("train", "progress"),
                 ("train", "tensorboard"), ("train", "profile"), ("data", "num_workers"), ("data", "cache")}


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str  # the entry name under ``methods``
    fold: int
    seed: int
    size: str | None = None  # a size of the learning curve ('8', '0.25', 'all'); None: no size axis

    @property
    def rel_dir(self) -> Path:
        size = () if self.size is None else (f"size-{self.size}",)
        return Path("cells", self.setting, self.method, *size, f"fold{self.fold}-seed{self.seed}")

    @property
    def label(self) -> str:
        return self.rel_dir.relative_to("cells").as_posix()


@dataclass
class Outcome:
    status: str
    message: str = ""


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


@dataclass
class GridRun:
    """What one invocation did: the status of every cell, and its wall time."""

    cells: list[Cell]
    outcomes: dict[Cell, Outcome] = field(default_factory=dict)
    trained: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    shard: set[Cell] | None = None  # the cells this process may train (None: all)


def parse_shard(text: str) -> tuple[int, int]:
    """``'K/N'`` (1 <= K <= N) -> (K, N)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. --shard 1/4") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text!r}: K must be between 1 and N")
    return k, n


def shard_cells(cells: list[Cell], k: int, n: int) -> set[Cell]:
    """Shard K of N: every N-th cell of the grid's fixed order, starting at the K-th. The shares are
    disjoint, cover the grid and each holds a similar mix of sizes, settings and methods."""
    return set(cells[k - 1::n])


def choose_out_dir(cfg: CompareConfig, out_dir: str | Path | None, resume: bool) -> Path:
    """The compare folder: the given or default one when resuming; a new ``<name>-N`` with fresh."""
    base = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name
    occupied = base.is_dir() and any(base.iterdir())
    if occupied and not (base / COMPARE_CONFIG_NAME).is_file():
        if resume:
            raise ConfigError(f"{base} is not empty and is not a compare folder (no compare.yaml); choose another --out")
    if not occupied or resume:
        base.mkdir(parents=True, exist_ok=True)
        return base
    return create_run_dir(base.parent, base.name)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """Paths in a training tree resolved against the current folder, so every run (and every
    re-run from another folder) names the same files."""
    for section, key in (("data", "source"), ("data", "split_file"), ("model", "weights"), ("distill", "teacher")):
        node = tree.get(section) or {}
        if node.get(key):
            node[key] = _absolute(node[key])
    init = (tree.get("distill") or {}).get("student_init")
    if init and init not in ("auto", "teacher", "scratch"):
        tree["distill"]["student_init"] = _absolute(init)
    return tree


def _flatten(tree: dict[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    flat: dict[tuple, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + (key,) != ("distill", "params"):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def config_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key (other than VOLATILE_KEYS) whose value differs. A key the
    stored config lacks counts only if its new value is not the default (a field added to the
    schema since), and a key the new config lacks (a field removed since) not at all."""
    old, new = _flatten(stored), _flatten(wanted)
    defaults = _flatten(Config().to_dict())

    def differs(key: tuple) -> bool:
        if key[:2] in VOLATILE_KEYS or key not in new:
            return False
        if key not in old:
            return new[key] != defaults.get(key, object())
        return old[key] != new[key]

    keys = sorted(set(old) | set(new), key=lambda k: ".".join(map(str, k)))
    return [f"{'.'.join(map(str, k))}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if differs(k)]


def _check_same_config(run_dir: Path, cfg: Config, what: str) -> None:
    stored_path = run_dir / CONFIG_NAME
    if not stored_path.is_file():
        return
    stored = yaml.safe_load(stored_path.read_text()) or {}
    changed = config_differences(stored, cfg.to_dict())
    if changed:
        raise ConfigError(
            f"{what} in {run_dir} was trained with another config ({'; '.join(changed[:3])}"
            f"{'; ...' if len(changed) > 3 else ''}); start a new compare folder with --fresh (or --out)"
        )


def _clear_unfinished(run_dir: Path) -> None:
    """Remove a run folder that holds neither a finished result nor a resumable state (a run that
    failed before its first epoch ended): nothing in it can be reused."""
    if run_dir.is_dir() and not (run_dir / METRICS_NAME).exists() and not (run_dir / STATE_NAME).exists():
        shutil.rmtree(run_dir)


def train_or_resume(cfg: Config, run_dir: Path, keep_state: bool = True) -> str:
    """Train into ``run_dir`` unless finished; continue it if interrupted. Returns what was done.
    Without ``keep_state`` the training state and the last-epoch weights of a run that finishes
    here are deleted (its metrics are in metrics.json; best.safetensors stays)."""
    from moma.engine.runs import run_training

    if (run_dir / METRICS_NAME).is_file():
        return "skipped"
    _reset_peak_memory()
    try:
        if (run_dir / STATE_NAME).is_file():
            run_training(cfg, resume_dir=run_dir)
            done = "resumed"
        else:
            _clear_unfinished(run_dir)
            run_training(cfg, run_dir=run_dir)
            done = "trained"
    finally:
        _release_memory()
    if not keep_state and (run_dir / METRICS_NAME).is_file():
        (run_dir / STATE_NAME).unlink(missing_ok=True)
        (run_dir / LAST_NAME).unlink(missing_ok=True)
    return done


def _reset_peak_memory() -> None:
    """Runs share the grid's process: without a reset, CUDA's peak would be the grid's so far."""
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ConsoleFilter(logging.Filter):
    """Keeps the console to the grid's own lines: the runs' per-epoch chatter goes to their
    train.log only, and a warning the runs repeat (e.g. a re-initialised classifier in every cell
    of a setting) is shown once."""

    INNER = ("moma.engine", "moma.data", "moma.models", "moma.distill")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if not record.name.startswith(self.INNER) or record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING:
            return False
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextmanager
def grid_logging(out: Path) -> Iterator[None]:
    root = logging.getLogger()
    console_filter = ConsoleFilter()
    consoles = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        handler.addFilter(console_filter)
    file_handler = logging.FileHandler(out / "compare.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("moma.compare"))
    root.addHandler(file_handler)
    compare_log = logging.getLogger("moma.compare")  # the grid's own lines are shown at any root level
    previous_level = compare_log.level
    if compare_log.getEffectiveLevel() > logging.INFO:
        compare_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        compare_log.setLevel(previous_level)
        root.removeHandler(file_handler)
        file_handler.close()
        for handler in consoles:
            handler.removeFilter(console_filter)


class Grid:
    def __init__(self, cfg: CompareConfig, out: Path):
        self.cfg = cfg
        self.out = out
        self.teachers: dict[str, TeacherInfo] = {}
        self._target_classes: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ cells and their configs
    def cells(self) -> list[Cell]:
        """Seeds and folds outermost: a grid stopped half-way still holds complete, paired folds."""
        folds = range(self.cfg.folds)
        sizes = self.cfg.sizes() or [None]
        return [Cell(s, m, k, seed, size) for seed in self.cfg.seeds for k in folds for size in sizes
                for s in self.cfg.settings for m in self.cfg.methods_of(s) if self.cfg.runs_at(s, m, size)]

    def used_teachers(self) -> list[str]:
        names = {s.teacher for s in self.cfg.settings.values() if s.teacher is not None}
        return [name for name in self.cfg.teachers if name in names]

    def teacher_checkpoint(self, name: str) -> Path:
        spec = self.cfg.teachers[name]
        if spec.checkpoint:
            return Path(_absolute(spec.checkpoint))
        return (self.out / "teachers" / name / BEST_NAME).resolve()

    def _holdout_paths(self, name: str) -> tuple[Path, Path]:
        data = self.out.resolve() / "data"
        return data / f"{name}-teacher.csv", data / f"{name}-student.csv"

    def teacher_config(self, name: str) -> Config:
        spec = self.cfg.teachers[name]
        tree = self.cfg.training_tree(spec.sections())
        tree["distill"] = {"method": "none"}
        tree.setdefault("train", {})["progress"] = False
        tree.setdefault("run", {}).update(name=name, output_dir=str(self.out / "teachers"))
        tree = _absolute_paths(tree)
        if spec.holdout is not None:
            tree["data"]["source"] = str(self._holdout_paths(name)[0])
        return build_config(tree, f"teachers.{name}")

    def _holdout_teacher_source(self, name: str) -> str | None:
        tree = self.cfg.training_tree(self.cfg.teachers[name].sections())
        return _absolute((tree.get("data") or {}).get("source"))

    def cell_config(self, cell: Cell) -> Config:
        cfg = self.cfg
        setting = cfg.settings[cell.setting]
        grid_keys: dict[str, Any] = {
            "run": {"seed": cell.seed, "name": cell.rel_dir.name, "output_dir": str(self.out / cell.rel_dir.parent)},
            "distill": {"method": cfg.registered_name(cell.method), **cfg.methods[cell.method].distill_overrides()},
            "train": {"progress": False},
        }
        if cfg.folds > 1:
            grid_keys["data"] = {"num_folds": cfg.folds, "fold": cell.fold, "split_seed": cfg.split_seed}
        else:
            grid_keys["data"] = {"split_seed": cfg.split_seed}
        grid_keys["data"].update(cfg.size_keys(cell.size))
        pool = cfg.pool_source(cell.method)
        if pool is not None:
            grid_keys["data"]["unlabelled"] = [pool if pool == REST else _absolute(pool)]
        tree = _absolute_paths(cfg.training_tree(setting.sections(), grid_keys))
        if setting.teacher is not None:
            tree["distill"]["teacher"] = str(self.teacher_checkpoint(setting.teacher))
        holdout = self._holdout_for(tree["data"].get("source"))
        if holdout is not None:
            tree["data"]["source"] = str(self._holdout_paths(holdout)[1])
        return build_config(tree, f"settings.{cell.setting} x methods.{cell.method}")

    def _holdout_for(self, source: str | None) -> str | None:
        """The teacher that holds out patients of ``source``, if any. Every setting whose target is
        that data then trains and tests on the other patients only, whatever its own teacher, so
        all settings share one target (as in the paper) and no student sees the teacher's patients."""
        names = [name for name in self.used_teachers() if self.cfg.teachers[name].holdout is not None
                 and source is not None and self._holdout_teacher_source(name) == source]
        if len(names) > 1:
            raise ConfigError(f"teachers {', '.join(names)} both hold out patients of {source}; keep one")
        return names[0] if names else None

    def check_existing_runs(self, cells: list[Cell]) -> None:
        """Refuse to mix results of another config into this folder (checked before any training)."""
        for name in self.used_teachers():
            if not self.cfg.teachers[name].checkpoint:
                _check_same_config(self.out / "teachers" / name, self.teacher_config(name), f"teacher '{name}'")
        for cell in cells:
            _check_same_config(self.out / cell.rel_dir, self.cell_config(cell), f"cell {cell.label}")

    # ------------------------------------------------------------------ teachers
    def prepare_holdouts(self) -> None:
        with exclusive(lock_path(self.out, "data")):
            self._write_holdouts()

    def _write_holdouts(self) -> None:
        for name in self.used_teachers():
            spec = self.cfg.teachers[name]
            if spec.holdout is None:
                continue
            tree = self.cfg.training_tree(spec.sections())
            data = build_config(tree, f"teachers.{name}").data
            teacher_csv, _ = self._holdout_paths(name)
            write_holdout_manifests(data.source, teacher_csv.parent, name, spec.holdout, spec.holdout_seed,
                                    data.classes, data.group_column, spec.holdout_unit)

    def prepare_teachers(self, train: bool = True) -> None:
        """Train (or find) every used teacher. Concurrent shards take a lock per teacher: the first
        trains it, the others wait and then find it finished. ``train=False`` only reads what is on
        disk (a teacher not trained yet is recorded as an error)."""
        for name in self.used_teachers():
            spec = self.cfg.teachers[name]
            try:
                if train and not spec.checkpoint:
                    with exclusive(lock_path(self.out, "teacher", name)):
                        start = time.perf_counter()
                        done = train_or_resume(self.teacher_config(name), self.out / "teachers" / name,
                                               self.cfg.keep_training_state)
                    if done != "skipped":
                        log.info("teacher %s %s in %.0f s", name, done, time.perf_counter() - start)
                info = self._teacher_info(name)
            except Exception as exc:  # noqa: BLE001 - a failed teacher fails its settings, not the grid
                what = "failed" if train else "is not available (not trained yet?)"
                info = TeacherInfo(checkpoint=self.teacher_checkpoint(name),
                                   error=f"teacher '{name}' {what}: {type(exc).__name__}: {exc}")
                (log.error if train else log.warning)("%s", info.error)
            self.teachers[name] = info
        self._judge_teachers()

    def _teacher_info(self, name: str) -> TeacherInfo:
        from moma.engine.checkpoint import read_metadata

        info = TeacherInfo(checkpoint=self.teacher_checkpoint(name))
        info.classes = read_metadata(info.checkpoint).class_names
        # A given checkpoint still has held-out metrics when it sits in its own run folder.
        run_dir = info.checkpoint if info.checkpoint.is_dir() else info.checkpoint.parent
        if (run_dir / METRICS_NAME).is_file():
            best = RunResult.read(run_dir).best
            info.test = best.test if best else None
        return info

    def _judge_teachers(self) -> None:
        """Mark (and warn about) teachers whose own held-out macro F1 is below chance + the margin."""
        margin = self.cfg.min_teacher_margin
        for name, info in self.teachers.items():
            if margin is None or info.test is None or info.chance is None:
                continue
            f1 = float(info.test.get("macro_f1", float("nan")))
            info.weak = not f1 >= info.chance + margin
            if info.weak:
                settings = [s for s, spec in self.cfg.settings.items() if spec.teacher == name]
                log.warning("teacher %s: test macro F1 %.3f on its own held-out split is below chance %.3f + "
                            "min_teacher_margin %.2f; settings %s are marked 'weak teacher'", name, f1, info.chance,
                            margin, ", ".join(settings))

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
        evaluate_checkpoint(self.out / cell.rel_dir / BEST_NAME, _absolute(spec.source), out, resolve_device(cfg.run.device),
                            mpp=spec.mpp, batch_size=spec.batch_size, progress=False)

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
            self.prepare_holdouts()
            self.prepare_teachers()
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
    error = run_dir / "error.txt"
    if error.is_file():
        lines = [line for line in error.read_text().splitlines() if line.strip()]
        return Outcome(FAILED, lines[-1] if lines else "failed")
    return Outcome(PENDING)

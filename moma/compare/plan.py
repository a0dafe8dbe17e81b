"""The grid's plan: its cells in their fixed order, the shards, the compare folder, and the training
config of every teacher and cell (with the check that a re-run would train them the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moma.compare.config import REST, CompareConfig
from moma.config import Config, build_config
from moma.engine.layout import BEST_NAME, CONFIG_NAME
from moma.engine.runs import create_run_dir
from moma.engine.teacher_cache import DEFAULT_DIR as TEACHER_CACHE_DIR
from moma.errors import ConfigError

COMPARE_CONFIG_NAME = "compare.yaml"
# Keys that change how a run executes, not what it computes: ignored when a re-run checks that a
# finished cell was trained with the config it would get now.
VOLATILE_KEYS = {("run", "name"), ("run", "output_dir"), ("run", "device"), ("train", "progress"),
                 ("train", "tensorboard"), ("train", "profile"), ("data", "num_workers"), ("data", "cache"),
                 ("data", "tile_store_dir")}


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


def absolute_path(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """Paths in a training tree resolved against the current folder, so every run (and every
    re-run from another folder) names the same files."""
    for section, key in (("data", "source"), ("data", "split_file"), ("model", "weights"), ("distill", "teacher")):
        node = tree.get(section) or {}
        if node.get(key):
            node[key] = absolute_path(node[key])
    init = (tree.get("distill") or {}).get("student_init")
    if init and init not in ("auto", "teacher", "scratch"):
        tree["distill"]["student_init"] = absolute_path(init)
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


class GridPlan:
    """What the grid trains and how: its cells, its teachers and the config of each run, in ``out``."""

    def __init__(self, cfg: CompareConfig, out: Path):
        self.cfg = cfg
        self.out = out

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
            return Path(absolute_path(spec.checkpoint))
        return (self.out / "teachers" / name / BEST_NAME).resolve()

    def holdout_paths(self, name: str) -> tuple[Path, Path]:
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
            tree["data"]["source"] = str(self.holdout_paths(name)[0])
        return build_config(tree, f"teachers.{name}")

    def _holdout_teacher_source(self, name: str) -> str | None:
        tree = self.cfg.training_tree(self.cfg.teachers[name].sections())
        return absolute_path((tree.get("data") or {}).get("source"))

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
            grid_keys["data"]["unlabelled"] = [pool if pool == REST else absolute_path(pool)]
        tree = _absolute_paths(cfg.training_tree(setting.sections(), grid_keys))
        if setting.teacher is not None:
            tree["distill"]["teacher"] = str(self.teacher_checkpoint(setting.teacher))
        if tree["distill"].get("teacher_cache") not in (None, False, "off") and not tree["distill"].get("teacher_cache_dir"):
            tree["distill"]["teacher_cache_dir"] = str(self.out / TEACHER_CACHE_DIR)  # one cache for every cell
        holdout = self._holdout_for(tree["data"].get("source"))
        if holdout is not None:
            tree["data"]["source"] = str(self.holdout_paths(holdout)[1])
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

"""The compare config: one YAML file describes the paper's whole experiment.

::

    name: smoke                       # folder runs/compare/<name>
    base: {...}                       # a training config (moma.config.Config) shared by every run
    teachers:                         # trained once per compare folder, or an existing checkpoint
      lung: {data: {source: data/demo/lc25000_lung}}
      glas: {data: {source: data/demo/glas_colon}, holdout: 0.5}
      imagenet: {checkpoint: weights/effnet_b0.safetensors}
    settings:                         # transfer settings: a teacher and a target data set
      relevant: {teacher: lung, data: {source: data/demo/glas_colon}}
                                      # optional per setting: sizes_of: {kd: [8, all]} (an entry at fewer sizes)
    methods: [none, kd, moma]         # or name -> {method, params, ce_weight, kl_weight, kl_temperature}
    folds: 2                          # grouped k-fold on the target's patients
    seeds: [0]
    train_per_class: [8, 32, all]     # optional: a learning curve (or train_fraction: [0.1, 0.5, all])
    unlabelled: {rest: rest}          # optional: unlabelled pools; every method that can use one also runs
                                      # with it as '<method>+<pool>' (e.g. kd+rest); 'rest' = the fold's
                                      # training tiles outside the labelled subset, labels hidden
    min_teacher_margin: 0.15          # optional: a teacher's test macro F1 must beat chance by this much

Layering of one cell's training config: ``base`` <- the setting's sections <- the method's
distillation keys <- the grid (seed, fold, method, teacher). Every section forbids unknown keys, and
the keys the grid sets cannot be set by hand (no silent overrides). A method entry may only change
the distillation section, so within a setting only the method differs between runs.

A teacher with ``holdout`` is trained on a seeded, patient-grouped part of its data; every setting
whose target is that data source (whatever its teacher) trains and tests its students on the other
patients only: the paper's same-task setting with a teacher the students never saw, and one target
shared by all settings.

The module is near 400 lines because it is the one schema of the compare file: every rule a user
can break across its sections (grid keys, sizes, pools, holdouts, method entries) is checked here,
so that each error names its key before any training starts.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moma.config import apply_override, build_config, parse_override, read_yaml
from moma.errors import ConfigError
from moma.utils.validation import validation_message

SECTIONS = ("run", "data", "augment", "model", "optim", "train", "distill")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Keys the grid sets for every run; setting them in the config would be silently ignored.
GRID_KEYS = {
    ("run", "seed"): "seeds",
    ("data", "num_folds"): "folds",
    ("data", "fold"): "folds",
    ("data", "split_seed"): "split_seed",
    ("distill", "method"): "methods",
    ("distill", "teacher"): "a setting's teacher",
    ("data", "train_per_class"): "train_per_class (the compare's list of sizes)",
    ("data", "train_fraction"): "train_fraction (the compare's list of sizes)",
    ("data", "unlabelled"): "unlabelled (the compare's pools; methods run with them as '<method>+<pool>')",
}
POOL_SEPARATOR = "+"  # a method entry run with an unlabelled pool: '<method>+<pool>'
REST = "rest"  # the pool of the fold's training tiles outside the labelled subset
ALL = "all"  # a size of the learning curve: the whole training part of the fold


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SectionOverrides(Strict):
    """Partial training-config sections, merged over ``base``."""

    run: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    augment: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    optim: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    distill: dict[str, Any] = Field(default_factory=dict)

    def sections(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name) for name in SECTIONS if getattr(self, name)}


class TeacherSpec(SectionOverrides):
    checkpoint: str | None = Field(None, description="an existing teacher (.safetensors or run folder): nothing is trained")
    holdout: float | None = Field(None, gt=0.0, lt=1.0,
                                  description="train on this fraction of the data's patients; students get the rest")
    holdout_seed: int = 0
    holdout_unit: Literal["patient", "tile"] = Field(
        "patient", description="hold out whole patients (the data's group column), or single tiles for data "
                               "without patient ids (LC25000): then the teacher may share patients with the students")

    @model_validator(mode="after")
    def _checkpoint_or_training(self) -> "TeacherSpec":
        if self.checkpoint and (self.sections() or self.holdout is not None):
            raise ValueError("a teacher is either 'checkpoint: <file>' or training overrides, not both")
        if self.distill:
            raise ValueError("teachers are trained without distillation: remove their 'distill' section")
        return self


class ExternalTest(Strict):
    source: str = Field(description="labelled tiles (folder or manifest) with the target's classes")
    mpp: float | None = Field(None, gt=0)
    batch_size: int = Field(128, ge=1)


Size = Annotated[float, Field(gt=0.0)] | Literal["all"]


def size_label(value: float | str) -> str:
    """A size as the grid names it: 8 -> '8', 0.25 -> '0.25', 'all' -> 'all'."""
    return value if value == ALL else f"{value:g}"


class SettingSpec(SectionOverrides):
    teacher: str | None = Field(None, description="a name under teachers; none = students without a teacher")
    description: str = ""
    methods: list[str] | None = Field(None, description="run only these of the compare's methods here")
    sizes_of: dict[str, list[Size]] = Field(
        default_factory=dict, description="run these entries (a method or '<method>+<pool>') only at these of the "
        "compare's sizes here (default: at every size); for a learning curve whose dense points are spent on the "
        "methods that lead")
    external_test: ExternalTest | None = None


class MethodSpec(Strict):
    """A method entry; only the distillation section may differ between the methods of a setting."""

    method: str | None = Field(None, description="registered method name; default: the entry's name")
    params: dict[str, Any] = Field(default_factory=dict)
    ce_weight: float | None = Field(None, ge=0.0)
    kl_weight: float | None = Field(None, ge=0.0)
    kl_temperature: float | None = Field(None, gt=0.0, description="T of the shared KL term")
    unlabelled: str | None = Field(None, description="set by the grid: the pool this entry runs with")

    @model_validator(mode="before")
    @classmethod
    def _renamed_temperature(cls, value: Any) -> Any:
        if isinstance(value, dict) and "temperature" in value:
            raise ValueError("'temperature' is now 'kl_temperature' (the shared KL term's T); a method's own "
                             "temperature goes under params (e.g. dkd: params.temperature)")
        return value

    def distill_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params} if self.params else {}
        for key in ("ce_weight", "kl_weight", "kl_temperature"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class CompareConfig(Strict):
    name: str = "compare"
    output_dir: str = "runs/compare"
    base: dict[str, Any] = Field(default_factory=dict)
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    settings: dict[str, SettingSpec]
    methods: dict[str, MethodSpec]
    baseline: str | None = Field("none", description="the method every other one is compared with, pairwise "
                                 "(null: no pairwise comparison)")
    folds: int = Field(2, ge=1, description="K of the grouped k-fold; 1 = one train/val/test split")
    seeds: list[int] = Field(default_factory=lambda: [0])
    split_seed: int = Field(0, description="seed of the fold assignment: the same folds for every method and seed")
    train_per_class: list[Annotated[int, Field(ge=1)] | Literal["all"]] | None = Field(
        None, description="learning curve: train every cell on this many labelled tiles per class of its fold's "
        "training part (seeded by the cell's seed, whole patients where there are patient ids; 'all' = no "
        "subsampling); val and test stay whole")
    train_fraction: list[Annotated[float, Field(gt=0.0, le=1.0)] | Literal["all"]] | None = Field(
        None, description="like train_per_class, as fractions of each class's training tiles")
    unlabelled: dict[str, str] = Field(
        default_factory=dict, description="unlabelled pools, name -> 'rest' (the fold's training tiles outside the "
        "labelled subset, labels hidden) or a folder/manifest of tiles; each method that can use a pool also runs "
        "with it, as the entry '<method>+<pool>'")
    unlabelled_methods: list[str] | None = Field(
        None, description="the methods that also run with each pool (default: every method that can use one)")
    min_teacher_margin: float | None = Field(
        None, ge=0.0, le=1.0, description="a trained teacher whose test macro F1 (on its own held-out split) is "
        "below chance (1 / classes) + this margin is reported as a 'weak teacher', with a warning")
    keep_training_state: bool = Field(False, description="keep state.pt and last.safetensors of finished cells "
                                      "(state.pt is only needed to resume an unfinished run; both are the largest files)")

    @field_validator("methods", mode="before")
    @classmethod
    def _list_of_names(cls, value: Any) -> Any:
        return methods_as_mapping(value)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return value

    @field_validator("train_per_class", "train_fraction")
    @classmethod
    def _distinct_sizes(cls, value: list | None) -> list | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("a non-empty list of distinct sizes (numbers, or 'all')")
        return value

    @model_validator(mode="after")
    def _names_and_references(self) -> "CompareConfig":
        if self.train_per_class is not None and self.train_fraction is not None:
            raise ValueError("set train_per_class or train_fraction, not both")
        if not self.settings or not self.methods:
            raise ValueError("needs at least one setting and one method")
        for kind, names in (("name", [self.name]), ("teacher", self.teachers), ("setting", self.settings),
                            ("method", self.methods)):
            for name in names:
                if not NAME_PATTERN.match(name):
                    raise ValueError(f"{kind} name {name!r}: use letters, digits, '_', '-', '.' (it names a folder)")
        for name in self.unlabelled:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"unlabelled pool name {name!r}: use letters, digits, '_', '-', '.'")
        for label, spec in self.methods.items():
            if spec.unlabelled is not None and spec.unlabelled not in self.unlabelled:
                raise ValueError(f"methods.{label}.unlabelled: '{spec.unlabelled}' is not under unlabelled")
        self._add_pool_entries()
        for name, setting in self.settings.items():
            if setting.teacher is not None and setting.teacher not in self.teachers:
                raise ValueError(f"settings.{name}.teacher: '{setting.teacher}' is not under teachers "
                                 f"({', '.join(self.teachers) or 'none defined'})")
            unknown = [m for m in setting.methods or [] if m not in self.methods]
            if unknown:
                raise ValueError(f"settings.{name}.methods: {', '.join(unknown)} not under methods")
            self._check_sizes_of(name)
        return self

    def _check_sizes_of(self, setting: str) -> None:
        sizes_of = self.settings[setting].sizes_of
        if not sizes_of:
            return
        where = f"settings.{setting}.sizes_of"
        if self.sizes() is None:
            raise ValueError(f"{where}: needs the compare's train_per_class or train_fraction list")
        curve = set(self.sizes())
        entries = self.methods_of(setting)
        for entry, wanted in sizes_of.items():
            if entry not in entries:
                raise ValueError(f"{where}.{entry}: not an entry of this setting ({', '.join(entries)})")
            stray = [size_label(v) for v in wanted if size_label(v) not in curve]
            if stray or not wanted:
                raise ValueError(f"{where}.{entry}: {', '.join(stray) or 'an empty list'}: use sizes of the "
                                 f"compare's list ({', '.join(self.sizes())})")

    def _add_pool_entries(self) -> None:
        """An entry '<method>+<pool>' for every pool and every method that can learn from unlabelled
        tiles (or those of ``unlabelled_methods``); pool entries come after the labels-only ones."""
        from moma.distill.registry import get_method

        if not self.unlabelled:
            return
        chosen = self.unlabelled_methods
        unknown = [m for m in chosen or [] if m not in self.methods]
        if unknown:
            raise ValueError(f"unlabelled_methods: {', '.join(unknown)} not under methods")
        plain = [label for label, spec in self.methods.items() if spec.unlabelled is None]
        for pool in self.unlabelled:
            for label in plain:
                wanted = label in chosen if chosen is not None else True
                name = f"{label}{POOL_SEPARATOR}{pool}"
                try:
                    usable = get_method(self.registered_name(label)).uses_unlabelled
                except ConfigError:
                    usable = False  # an unknown method is reported by the training-config check
                if wanted and usable and name not in self.methods:
                    self.methods[name] = self.methods[label].model_copy(update={"unlabelled": pool})

    def pool_source(self, label: str) -> str | None:
        """The pool a method entry runs with ('rest' or a path), None for a labels-only entry."""
        pool = self.methods[label].unlabelled
        return None if pool is None else self.unlabelled[pool]

    # ------------------------------------------------------------------ derived
    def sizes(self) -> list[str] | None:
        """The learning curve's sizes as labels ('8', '0.25', 'all'), smallest first; None: no axis."""
        values = self.train_per_class if self.train_per_class is not None else self.train_fraction
        if values is None:
            return None
        numbers = sorted(v for v in values if v != ALL)
        return [size_label(v) for v in numbers] + ([ALL] if ALL in values else [])

    def runs_at(self, setting: str, method: str, size: str | None) -> bool:
        """Whether the entry ``method`` of ``setting`` has a cell at ``size`` (settings.*.sizes_of)."""
        wanted = self.settings[setting].sizes_of.get(method)
        return size is None or wanted is None or size in {size_label(v) for v in wanted}

    def size_keys(self, size: str | None) -> dict[str, Any]:
        """The data keys a cell of ``size`` gets."""
        if size is None or size == ALL:
            return {}
        if self.train_per_class is not None:
            return {"train_per_class": int(size)}
        return {"train_fraction": float(size)}

    def registered_name(self, label: str) -> str:
        spec = self.methods[label]
        if spec.method:
            return spec.method.lower()
        return label.split(POOL_SEPARATOR)[0].lower() if spec.unlabelled else label.lower()

    def methods_of(self, setting: str) -> list[str]:
        chosen = self.settings[setting].methods
        return [m for m in self.methods if chosen is None or m in chosen]

    def training_tree(self, *layers: dict[str, Any]) -> dict[str, Any]:
        """``base`` with the given partial configs merged over it, in order."""
        tree = copy.deepcopy(self.base)
        for layer in layers:
            deep_merge(tree, layer)
        return tree


def methods_as_mapping(value: Any) -> Any:
    """``[none, kd]`` -> ``{none: {}, kd: {}}``; a mapping with empty entries is kept as is."""
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise ValueError("methods: a list of method names, or a mapping name -> options")
        if len(set(value)) != len(value):
            raise ValueError("methods: a name is listed twice")
        return {name: {} for name in value}
    if isinstance(value, dict):
        return {name: ({} if options is None else options) for name, options in value.items()}
    return value


def deep_merge(target: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Merge ``layer`` into ``target`` in place: mappings merge key by key, anything else replaces."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _check_grid_keys(tree: dict[str, Any], where: str, origin: str) -> None:
    for (section, key), instead in GRID_KEYS.items():
        if key in (tree.get(section) or {}):
            raise ConfigError(f"{origin}: {where}{section}.{key} is set by the grid; use '{instead}' instead")


def _check_training_configs(cfg: CompareConfig, origin: str) -> None:
    """Validate every merged training config now, so a typo fails before hours of training."""
    from moma.distill import get_method

    _check_grid_keys(cfg.base, "base.", origin)
    build_config(cfg.training_tree(), f"{origin}: base")
    for name, teacher in cfg.teachers.items():
        if not teacher.checkpoint:
            build_config(cfg.training_tree(teacher.sections()), f"{origin}: teachers.{name}")
    for name, setting in cfg.settings.items():
        _check_grid_keys(setting.sections(), f"settings.{name}.", origin)
        build_config(cfg.training_tree(setting.sections()), f"{origin}: settings.{name}")
    for label, spec in cfg.methods.items():
        try:
            method_cls = get_method(cfg.registered_name(label))
        except ConfigError as exc:
            raise ConfigError(f"{origin}: methods.{label}: {exc}") from None
        try:
            method_cls.parse_params(spec.params)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: methods.{label}: {exc}") from None
    if cfg.baseline is not None and cfg.baseline not in cfg.methods:
        raise ConfigError(f"{origin}: baseline '{cfg.baseline}' is not under methods ({', '.join(cfg.methods)}); "
                          "add it or set baseline: null")


def build_compare_config(tree: dict[str, Any], origin: str = "compare config") -> CompareConfig:
    try:
        cfg = CompareConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {validation_message(exc, noun='compare key')}") from None
    _check_training_configs(cfg, origin)
    return cfg


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """YAML file <- ``key=value`` overrides (dotted keys, e.g. ``base.optim.epochs=3``), validated."""
    tree = read_yaml(path)
    if "methods" in tree:
        try:
            tree["methods"] = methods_as_mapping(tree["methods"])
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(tree, key_path, value)
    origin = str(path) + (" + --set" if overrides else "")
    return build_compare_config(tree, origin)

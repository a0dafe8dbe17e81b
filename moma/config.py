"""Typed, validated run configuration.

Layering follows timm's ``train.py``: defaults defined here <- a YAML file (``yaml.safe_load``)
<- ``--set section.key=value`` overrides on the command line. Every section forbids unknown keys,
so a typo is an error that names the key instead of a silently ignored setting. The resolved
configuration is written to every run folder as ``config.yaml``.

Paths in a config are resolved against the current working directory, as with timm and most
command-line tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moma.errors import ConfigError
from moma.metrics import PRIMARY_METRIC, metric_names
from moma.utils.validation import validation_message

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    deterministic: bool = True


class StainNormConfig(Section):
    method: Literal["macenko", "reinhard"] = Field(
        "macenko", description="macenko (stain vectors in optical density, Macenko 2009) or reinhard (LAB mean/std, "
        "Reinhard 2001); both through torchstain")
    reference: str = Field(description="the reference tile whose stain every tile is matched to; its fitted "
                           "parameters are stored in the checkpoint, so prediction does not need the file")

    @field_validator("reference")
    @classmethod
    def _reference_exists(cls, value: str) -> str:
        if not Path(value).is_file():
            raise ValueError(f"reference tile {value} not found")
        return value


class DataConfig(Section):
    source: str | None = Field(
        None, description="a folder of class sub-folders, or a CSV manifest (path,label[,split][,group])"
    )
    image_size: int = Field(64, ge=8, le=4096)
    mpp: float | None = Field(None, gt=0, description="microns per pixel of the tiles, if known")
    classes: list[str] | None = Field(None, description="class order; default: sorted labels")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int | None = Field(None, description="seed of the split; default: run.seed")
    group_column: str | None = Field("group", description="manifest column kept on one side of a split")
    split_file: str | None = Field(None, description="a saved split.csv to reuse instead of splitting")
    num_folds: int | None = Field(None, ge=2, description="grouped k-fold: number of folds")
    fold: int | None = Field(None, ge=0, description="grouped k-fold: which fold is the test set")
    train_per_class: int | None = Field(
        None, ge=1, description="learn from a seeded, class-stratified subset of the train split: this many tiles "
        "per class (whole patients where there is a group column); val and test are unchanged")
    train_fraction: float | None = Field(None, gt=0.0, le=1.0, description="like train_per_class, as a fraction "
                                         "of each class's training tiles")
    subsample_seed: int | None = Field(None, description="seed of the training subset; default: run.seed")
    unlabelled: list[str] = Field(
        default_factory=list, description="unlabelled tiles for the distillation terms (cross-entropy never sees "
        "them): folders of tiles, manifest CSVs, `moma tile` output folders, or 'rest' (the training tiles outside "
        "the labelled subset, labels hidden)")
    allow_group_overlap: bool = Field(False, description="let the unlabelled pool share patients/slides with "
                                      "validation and test (refused by default)")
    strong_augment: bool = Field(False, description="two views: the teacher sees a weak view (flips, 90-degree "
                                 "rotations) and the student a strong one (the same plus RandAugment and stain jitter, "
                                 "and augment.strong_* if set); off: both see the training augmentation's one view")
    stain_normalize: StainNormConfig | None = Field(
        None, description="match every tile's stain to a reference tile before augmentation: {method, reference}; "
        "recorded in the checkpoint and ONNX export, and applied by predict and evaluate (None = off)")
    skip_bad: bool = False
    cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="where decoded tiles are kept. memory: every labelled tile decoded once per run, in "
        "memory; disk: every tile decoded once into a uint8 tile store on disk under tile_store_dir, reused by later "
        "runs and every grid cell (the unlabelled pool too); off: decoded on every read; auto: memory while the "
        "decoded labelled tiles fit a quarter of the machine's memory, else disk while they fit half the free disk "
        "space there, else off (the decision is logged). true/false (earlier configs) mean memory/off")
    tile_store_dir: str | None = Field(
        None, description="where data.cache=disk keeps its tile stores (one per data source and image size); "
        "default: $XDG_CACHE_HOME/moma/tile_store, else ~/.cache/moma/tile_store")
    num_workers: int | Literal["auto"] = "auto"
    augment_on: Literal["loader", "device"] = Field(
        "loader", description="where training tiles are augmented. loader: per tile in the loader's workers (CPU); "
        "device: the loader only stain-normalises and flips/rotates the uint8 tile, and the stain jitter and "
        "normalisation run per batch on the training device (GPU runs; no RandAugment, strong colour jitter or blur)")

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # configs saved before memory/disk/off: true kept tiles in memory
            return "memory" if value else "off"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("unlabelled", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        if (self.fold is None) != (self.num_folds is None):
            raise ValueError("data.fold and data.num_folds must be set together")
        if self.fold is not None and self.num_folds is not None and self.fold >= self.num_folds:
            raise ValueError(f"data.fold={self.fold} must be below data.num_folds={self.num_folds}")
        if self.train_per_class is not None and self.train_fraction is not None:
            raise ValueError("set data.train_per_class or data.train_fraction, not both")
        return self


class AugmentConfig(Section):
    hflip: bool = True
    vflip: bool = True
    rot90: bool = Field(True, description="random 90-degree rotations: histology has no 'up'")
    randaugment: bool = True
    ra_num_ops: int = Field(2, ge=0, le=10)
    ra_magnitude: int = Field(10, ge=0, le=30)
    stain_jitter: float = Field(0.0, ge=0.0, le=0.5, description="HED colour jitter strength (0 = off)")
    strong_stain_jitter: float = Field(0.0, ge=0.0, le=0.5, description="data.strong_augment: extra HED jitter of "
                                       "the student's strong view (0 = off)")
    strong_color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="data.strong_augment: brightness, contrast "
                                       "and saturation jitter of the strong view, hue a quarter of it (0 = off)")
    strong_blur: float = Field(0.0, ge=0.0, le=1.0, description="data.strong_augment: probability of a Gaussian "
                               "blur (sigma 0.1 to 1.5) in the strong view (0 = off)")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class ModelConfig(Section):
    arch: str = "efficientnet_b0"
    weights: str | None = Field(None, description="local file with initial weights (safetensors or .pt)")
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0, description="None = the timm default")


class OptimConfig(Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float | None = Field(None, gt=0, description="absolute learning rate; overrides lr_base")
    lr_base: float = Field(0.05, gt=0, description="learning rate for a global batch of lr_base_size")
    lr_base_size: int = Field(
        128, ge=1, description="run_moma.sh: lr 0.05 with 64 images per GPU on 2 GPUs, gradients averaged (global 128)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(64, ge=1, description="per process")
    epochs: int = Field(50, ge=1)
    total_steps: int | None = Field(
        None, ge=1, description="exactly this many optimiser steps whatever the size of the training set, in "
        "`epochs` rounds (each ends with validation and a checkpoint) that pass over the tiles as often as needed; "
        "None = `epochs` passes over the training tiles")
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    min_lr: float = Field(5e-5, ge=0.0)
    step_epochs: list[int] = Field(default_factory=lambda: [30, 40])
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _rounds_have_steps(self) -> "OptimConfig":
        if self.total_steps is not None and self.total_steps < self.epochs:
            raise ValueError(f"optim.total_steps={self.total_steps} is below optim.epochs={self.epochs}: every "
                             "round (epoch) needs a step; lower optim.epochs")
        return self

    def effective_lr(self, global_batch: int) -> float:
        """Linear scaling rule (Goyal et al. 2017): lr_base is quoted for lr_base_size images."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * global_batch / self.lr_base_size


class TrainConfig(Section):
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="auto = bf16 on CUDA, off on CPU")
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    select_metric: str = Field(PRIMARY_METRIC, description="validation metric that picks the best epoch "
                               "(a name of moma.metrics.metric_names())")
    progress: bool = True
    profile: bool = False
    tensorboard: bool = True
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap for smoke runs")

    @field_validator("select_metric")
    @classmethod
    def _registered_metric(cls, value: str) -> str:
        # Checked when a config is read, not at import: a plugin may register its metric after this
        # module is imported.
        if value not in metric_names():
            raise ValueError(f"unknown metric '{value}'; choose one of: {', '.join(metric_names())}")
        return value


class DistillConfig(Section):
    method: str = "none"
    teacher: str | None = Field(None, description="teacher checkpoint (.safetensors) or its run folder")
    student_init: str = Field(
        "auto",
        description="auto | teacher | scratch | a weights file. auto = teacher when teacher and student "
        "share the architecture, else scratch",
    )
    ce_weight: float | None = Field(None, ge=0.0, description="None = the method's default")
    kl_weight: float | None = Field(None, ge=0.0, description="None = the method's default")
    kl_temperature: float = Field(4.0, gt=0.0, description="T of the shared KL term to the teacher's softened logits "
                                  "(a method's own temperature, e.g. DKD's, is under params)")
    unlabelled_ratio: int = Field(
        3, ge=1, description="with data.unlabelled: unlabelled tiles per labelled tile in each step (FixMatch's mu; "
        "7 in FixMatch, 3 here to keep a CPU step affordable)")
    params: dict[str, Any] = Field(default_factory=dict, description="method hyper-parameters")
    teacher_cache: str = Field(
        "off", description="off: the teacher runs every step; auto: its outputs per tile and flip/rotation view are "
        "computed once into a cache (found or made under teacher_cache_dir) and read instead, where the method and "
        "augmentation allow it (a frozen teacher seeing a pure view); or a folder (`moma embed` output, made there "
        "if missing)")
    teacher_cache_dir: str | None = Field(
        None, description="where teacher_cache=auto keeps its caches; default: teacher_cache/ beside run.output_dir "
        "(moma compare: one inside the compare folder)")

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _cache_setting(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads a bare off / on as a bool
            return "auto" if value else "off"
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value:
            raise ValueError("distill.teacher_cache is empty: give off, auto or a folder")
        return value.lower() if value.lower() in ("off", "auto") else value


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _device_augmentation_can_do_it(self) -> "Config":
        if self.data.augment_on != "device":
            return self
        if self.augment.randaugment and self.augment.ra_num_ops > 0:
            raise ValueError("data.augment_on=device does not run RandAugment: set augment.randaugment=false "
                             "or data.augment_on=loader")
        if self.data.strong_augment and (self.augment.strong_color_jitter > 0 or self.augment.strong_blur > 0):
            raise ValueError("data.augment_on=device does not run augment.strong_color_jitter or strong_blur: set "
                             "them to 0 or data.augment_on=loader")
        return self

    @field_validator("distill")
    @classmethod
    def _lower_method(cls, value: DistillConfig) -> DistillConfig:
        value.method = value.method.lower()
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value) with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.01")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; a number is what the user meant
            value = float(value)
        except ValueError:
            pass
    return path, value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return data


# Keys that were renamed: the old name is an error that says the new one (not "check its spelling").
RENAMED_KEYS = {("distill", "temperature"): "distill.kl_temperature (the shared KL term's T; a method's own "
                                            "temperature is under distill.params)"}


def check_renamed_keys(tree: dict[str, Any], origin: str) -> None:
    for (section, key), instead in RENAMED_KEYS.items():
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(f"{origin}: config key '{section}.{key}' is now {instead}")


def build_config(tree: dict[str, Any], origin: str = "config") -> Config:
    check_renamed_keys(tree, origin)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        hint = "check its spelling; `moma config` prints every key"
        raise ConfigError(f"{origin}: {validation_message(exc, hint)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated."""
    tree = read_yaml(path) if path else {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(tree, key_path, value)
    origin = str(path) if path else "config"
    if overrides:
        origin += " + --set"
    return build_config(tree, origin)

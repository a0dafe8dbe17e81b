"""Turning a :class:`~moma.config.Config` into data sets, networks and a distillation task."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from moma.config import Config
from moma.data.dataset import TileDataset, cache_budget, choose_storage, reset_size_warning
from moma.data.splits import apply_split, check_no_leakage, kfold_split, load_split, split_table
from moma.data.stain_norm import StainNormalizer, StainReference, fit_reference
from moma.data.subsample import subsample_train
from moma.data.tile_store import disk_budget, open_table_store, resolve_store_dir
from moma.data.tiles import TileTable, scan_tiles
from moma.data.transforms import build_eval_transform, build_student_transform
from moma.data.unlabelled import UnlabelledDataset, check_pool_leakage, open_pool_stores, scan_pool
from moma.distill.base import UNLABELLED, DistillMethod, MethodContext, MethodParams
from moma.distill.registry import applicable_methods, get_method, not_applicable_reason
from moma.distill.task import DistillationTask, InputAdapter
from moma.engine.checkpoint import ModelMetadata, load_model_checkpoint
from moma.errors import CheckpointError, ConfigError
from moma.models.backbone import create_backbone, load_backbone_weights, read_state_dict, same_architecture
from moma.models.taps import FeatureTap, TapOutputs, num_stages
from moma.models.vit_layouts import imported_build

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    table: TileTable
    split: pd.DataFrame
    train: TileDataset
    val: TileDataset
    test: TileDataset
    unlabelled: UnlabelledDataset | None = None  # the pool for the distillation terms (data.unlabelled)
    stain: StainReference | None = None  # the fitted stain normalisation (data.stain_normalize), for the checkpoint

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def num_unlabelled(self) -> int:
        return 0 if self.unlabelled is None else len(self.unlabelled)


def make_split(cfg: Config, table: TileTable, saved_split: Path | None = None) -> pd.DataFrame:
    """The run's split: a saved one when resuming (already subsampled), else the given or a fresh
    patient-level one, with its training part subsampled when data.train_per_class/fraction ask."""
    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.run.seed
    if saved_split is not None and saved_split.is_file():
        split = load_split(saved_split)
        check_no_leakage(split)
        return split
    if cfg.data.split_file:
        split = load_split(cfg.data.split_file)
    elif cfg.data.num_folds is not None:
        split = kfold_split(table, cfg.data.num_folds, cfg.data.fold, cfg.data.val_fraction, seed)
    else:
        split = split_table(table, cfg.data.val_fraction, cfg.data.test_fraction, seed)
    if cfg.data.train_per_class is not None or cfg.data.train_fraction is not None:
        subsample_seed = cfg.data.subsample_seed if cfg.data.subsample_seed is not None else cfg.run.seed
        split = subsample_train(split, subsample_seed, cfg.data.train_per_class, cfg.data.train_fraction)
    check_no_leakage(split)
    return split


def build_data(cfg: Config, saved_split: Path | None = None, progress: bool = False) -> DataBundle:
    table = scan_tiles(cfg.data.source, cfg.data.classes, cfg.data.group_column)
    split = make_split(cfg, table, saved_split)
    parts = apply_split(table, split)
    if len(parts["test"]) == 0:
        log.warning("the test split is empty: only validation metrics will be reported")
    reset_size_warning()
    labelled = sum(len(part) for part in parts.values())
    store_dir = resolve_store_dir(cfg.data.tile_store_dir)
    storage = choose_storage(cfg.data.cache, labelled, cfg.data.image_size, cache_budget(), disk_budget(store_dir),
                             store_tiles=len(table))  # the store holds every tile of the source
    store = open_table_store(table, cfg.data.image_size, store_dir, progress) if storage == "disk" else None
    common = dict(image_size=cfg.data.image_size, cache=storage == "memory", store=store, skip_bad=cfg.data.skip_bad,
                  progress=progress)
    stain = fit_stain(cfg)
    normalizer = None if stain is None else StainNormalizer(stain)
    train_transform = build_student_transform(cfg.augment, cfg.data.strong_augment, normalizer, cfg.data.augment_on)
    train = TileDataset(parts["train"], transform=train_transform, description="train tiles", **common)
    evaluation = build_eval_transform(cfg.augment, normalizer)
    val = TileDataset(parts["val"], transform=evaluation, description="val tiles", **common)
    test = TileDataset(parts["test"], transform=evaluation, description="test tiles", **common) if len(parts["test"]) else None
    pool = None
    if cfg.data.unlabelled:
        held_out = TileTable(table.source, pd.concat([parts["val"].frame, parts["test"].frame], ignore_index=True),
                             table.classes)
        pool_table = scan_pool(cfg.data.unlabelled, table, split, cfg.data.group_column)
        check_pool_leakage(pool_table, held_out, cfg.data.allow_group_overlap)
        pool_stores = [] if store is None else open_pool_stores(
            pool_table.paths, pool_table.sources, store, cfg.data.image_size, store_dir, progress)
        pool = UnlabelledDataset(pool_table, cfg.data.image_size, train_transform, pool_stores)
        log.info("unlabelled pool: %d tiles from %s; %d per step beside %d labelled (distill.unlabelled_ratio=%d)",
                 len(pool), ", ".join(cfg.data.unlabelled), cfg.distill.unlabelled_ratio * cfg.optim.batch_size,
                 cfg.optim.batch_size, cfg.distill.unlabelled_ratio)
    return DataBundle(table, split, train, val, test, pool, stain)


def fit_stain(cfg: Config) -> StainReference | None:
    """The stain normalisation fitted on data.stain_normalize.reference, or None when it is off."""
    options = cfg.data.stain_normalize
    if options is None:
        return None
    stain = fit_reference(options.method, options.reference)
    log.info("stain normalisation: %s to %s", options.method, options.reference)
    return stain


@dataclass
class Teacher:
    tap: FeatureTap
    meta: ModelMetadata
    state: dict[str, torch.Tensor]


def load_teacher(path: str | Path) -> Teacher:
    state, meta = load_model_checkpoint(path)
    if meta.head is not None:
        raise CheckpointError(f"teacher {path}: a student with a '{meta.head['method']}' head cannot serve as a teacher")
    model = create_backbone(meta.arch, meta.num_classes, **imported_build(meta))
    load_backbone_weights(model, state, f"teacher {path}")
    model.eval()
    return Teacher(FeatureTap(model), meta, state)


def _check_same_architecture(cfg: Config, method_cls: type[DistillMethod], teacher: Teacher) -> None:
    student = create_backbone(cfg.model.arch, teacher.meta.num_classes)
    if not same_architecture(student, teacher.tap.model):
        raise ConfigError(
            f"distill.method '{method_cls.name}' needs a teacher of the student's architecture (teacher: "
            f"{teacher.meta.arch}, student: {cfg.model.arch}); set model.arch={teacher.meta.arch} or choose another method"
        )


def _check_teacher_init(cfg: Config, teacher: Teacher | None) -> None:
    if teacher is None:
        raise ConfigError("distill.student_init=teacher needs distill.teacher")
    if teacher.meta.arch != cfg.model.arch:
        raise ConfigError(
            f"distill.student_init=teacher: teacher is {teacher.meta.arch}, student is {cfg.model.arch}; "
            "use student_init=scratch or the same model.arch"
        )


TEACHER_INIT = "teacher weights"  # the start of build_student's note when the student starts as the teacher


def student_weights_file(cfg: Config) -> str | None:
    """The weights file the student starts from, if it starts from one."""
    init = cfg.distill.student_init
    if init == "auto":
        return cfg.model.weights
    return None if init in ("teacher", "scratch") else init


def build_student(cfg: Config, num_classes: int, teacher: Teacher | None,
                  weights: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, str]:
    """The student network and a description of where its initial weights came from. ``weights``:
    the contents of :func:`student_weights_file` (read here when not given)."""
    model = create_backbone(cfg.model.arch, num_classes, cfg.model.drop_rate)
    weights_file = student_weights_file(cfg)
    if weights_file:
        weights = weights if weights is not None else read_state_dict(weights_file)
        dropped = load_backbone_weights(model, weights, f"weights file {weights_file}")
        return model, f"weights file {weights_file}" + (" (classifier re-initialised)" if dropped else "")
    init = cfg.distill.student_init
    if init == "auto":
        init = "teacher" if teacher is not None and teacher.meta.arch == cfg.model.arch else "scratch"
    if init == "scratch":
        return model, "random initialisation"
    dropped = load_backbone_weights(model, teacher.state, "teacher checkpoint")
    return model, TEACHER_INIT + (" (classifier re-initialised)" if dropped else "")


def _probe(tap: FeatureTap, image_size: int, device: torch.device) -> TapOutputs:
    """Outputs of a dummy batch with every stage tapped (for connector shapes)."""
    stages, was_training = tap.stages, tap.training
    tap.set_stages(tuple(range(num_stages(tap.model))))
    tap.eval()
    with torch.no_grad():
        out = tap(torch.zeros(2, 3, image_size, image_size, device=device))
    tap.set_stages(stages)
    tap.train(was_training)
    return out


def _teacher_class_order(teacher_classes: list[str], classes: list[str]) -> list[int] | None:
    if teacher_classes == classes:
        return None
    return [teacher_classes.index(name) for name in classes]


def check_resolution(cfg: Config, meta: ModelMetadata, origin: str) -> None:
    """Warn when tiles differ in size, microns per pixel or stain normalisation from what a model was trained on."""
    trained = (meta.stain_norm or {}).get("method", "none")
    wanted = cfg.data.stain_normalize.method if cfg.data.stain_normalize else "none"
    if trained != wanted:
        log.warning("%s was trained with stain normalisation %s, this run uses %s", origin, trained, wanted)
    if meta.mpp_differs(cfg.data.mpp):
        log.warning("%s was trained at %.3g um/px but data.mpp is %.3g um/px: features may not transfer", origin, meta.mpp, cfg.data.mpp)
    if meta.image_size != cfg.data.image_size:
        log.warning("%s was trained on %d px tiles, this run uses %d px", origin, meta.image_size, cfg.data.image_size)


@dataclass
class DistillSetup:
    """The distillation side of a run, read and checked before any data is: the method, its
    parameters and the teacher (its checkpoint loaded and its weights fitted to its architecture)."""

    method_cls: type[DistillMethod]
    params: MethodParams
    teacher: Teacher | None
    student_weights: dict[str, torch.Tensor] | None = None  # from a weights file (model.weights, student_init)


def resolve_method(cfg: Config) -> tuple[type[DistillMethod], MethodParams]:
    """The configured method and its validated ``distill.params`` (what ``moma config`` checks)."""
    method_cls = get_method(cfg.distill.method)
    return method_cls, method_cls.parse_params(cfg.distill.params)


def prepare_distillation(cfg: Config) -> DistillSetup:
    """Everything about the distillation that can be checked without the data, so that a bad
    method, parameter or teacher fails before any tile is read."""
    method_cls, params = resolve_method(cfg)
    teacher = load_teacher(cfg.distill.teacher) if cfg.distill.teacher else None
    teacher_classes = None if teacher is None else teacher.meta.class_names
    reason = not_applicable_reason(method_cls, teacher_classes)
    if reason:  # without the data: a missing teacher, or a features-only one for a logit method
        fix = ("set distill.teacher (or --teacher) to a checkpoint" if teacher is None
               else f"methods that can use this teacher: {', '.join(applicable_methods(teacher_classes))}")
        raise ConfigError(f"distill.method {reason}; {fix}")
    if teacher is not None:
        check_resolution(cfg, teacher.meta, f"teacher {cfg.distill.teacher}")
        if method_cls.requires_same_architecture(params):
            _check_same_architecture(cfg, method_cls, teacher)
    if cfg.distill.student_init == "teacher":
        _check_teacher_init(cfg, teacher)
    _check_views_and_pool(cfg, method_cls)
    weights_file = student_weights_file(cfg)
    weights = read_state_dict(weights_file) if weights_file else None
    return DistillSetup(method_cls, params, teacher, weights)


def _check_views_and_pool(cfg: Config, method_cls: type[DistillMethod]) -> None:
    if cfg.data.unlabelled and not method_cls.uses_unlabelled:
        raise ConfigError(f"distill.method '{method_cls.name}' has no term that can learn from unlabelled tiles; "
                          "remove data.unlabelled (--unlabelled) or choose a method that uses them (see `moma methods`)")
    if method_cls.needs_strong_view and not cfg.data.strong_augment:
        raise ConfigError(f"distill.method '{method_cls.name}' compares a weak and a strong view of each tile; "
                          "set data.strong_augment=true")


def build_task(cfg: Config, classes: list[str], num_train: int, device: torch.device,
               train_targets: torch.Tensor | None = None, setup: DistillSetup | None = None,
               total_steps: int | None = None, num_unlabelled: int = 0) -> tuple[DistillationTask, dict]:
    """The distillation task for this config, on ``device``; also a dict describing the setup.
    ``train_targets``: the class index of each training row (methods that sample by class use it).
    ``setup``: from :func:`prepare_distillation` (called here when not given).
    ``total_steps``: optimiser steps of the run (methods with schedules tied to it use it).
    ``num_unlabelled``: tiles in the unlabelled pool; their batch indices follow the ``num_train`` labelled rows."""
    setup = setup if setup is not None else prepare_distillation(cfg)
    method_cls, params, teacher = setup.method_cls, setup.params, setup.teacher
    same_labels = teacher is not None and sorted(teacher.meta.class_names) == sorted(classes)
    teacher_classes = None if teacher is None else teacher.meta.class_names
    reason = not_applicable_reason(method_cls, teacher_classes, classes)
    if reason:
        usable = ", ".join(applicable_methods(teacher_classes, classes))
        raise ConfigError(f"distill.method {reason}. Methods that work across label sets: {usable}")
    student_model, init_note = build_student(cfg, len(classes), teacher, setup.student_weights)
    student = FeatureTap(student_model).to(device)
    teacher_tap = teacher.tap.to(device) if (teacher is not None and method_cls.requires_teacher) else None
    class_order = _teacher_class_order(teacher.meta.class_names, classes) if same_labels else None
    kl_weight = _resolve_kl_weight(cfg, method_cls, same_labels, teacher_tap is not None)
    ctx = MethodContext(
        student=student,
        teacher=teacher_tap,
        student_probe=_probe(student, cfg.data.image_size, device),
        teacher_probe=_probe(teacher_tap, cfg.data.image_size, device) if teacher_tap is not None else None,
        num_classes=len(classes),
        teacher_num_classes=teacher.meta.num_classes if teacher is not None else None,
        num_train_samples=num_train + num_unlabelled,
        same_label_space=same_labels,
        kl_weight=kl_weight,
        batch_size=cfg.optim.batch_size * (1 + cfg.distill.unlabelled_ratio if num_unlabelled else 1),
        train_targets=_row_targets(train_targets, num_unlabelled),
        num_unlabelled=num_unlabelled,
        teacher_class_order=class_order,
        total_steps=total_steps,
        student_from_teacher=init_note.startswith(TEACHER_INIT),
    )
    method = method_cls(params, ctx).to(device)
    student.set_stages(method.student_stages)
    if teacher_tap is not None:
        teacher_tap.set_stages(method.teacher_stages)
    ce_weight = cfg.distill.ce_weight if cfg.distill.ce_weight is not None else method_cls.default_ce_weight
    adapter = None
    if teacher_tap is not None:
        adapter = InputAdapter(cfg.augment.mean, cfg.augment.std, teacher.meta.mean, teacher.meta.std).to(device)
        if not adapter.identity:
            log.info("teacher was trained with other normalisation statistics: its input is re-normalised")
    task = DistillationTask(
        student, teacher_tap, method, ce_weight=ce_weight, kl_weight=kl_weight, kl_temperature=cfg.distill.kl_temperature,
        label_smoothing=cfg.optim.label_smoothing, teacher_input=adapter,
        teacher_class_order=class_order,
    ).to(device)
    info = {
        "method": method_cls.name,
        "student_init": init_note,
        "same_label_space": same_labels,
        "loss_weights": task.loss_weights(),
        "extra_parameters": method.extra_parameters(),
        "teacher": None if teacher is None else {"path": str(cfg.distill.teacher), "arch": teacher.meta.arch,
                                                 "classes": teacher.meta.class_names, "mpp": teacher.meta.mpp},
    }
    return task, info


def _row_targets(train_targets: torch.Tensor | None, num_unlabelled: int) -> torch.Tensor | None:
    """The class of every batch-index row: the labelled tiles', then UNLABELLED for the pool."""
    if train_targets is None or not num_unlabelled:
        return train_targets
    pool = torch.full((num_unlabelled,), UNLABELLED, dtype=torch.long)
    return torch.cat([torch.as_tensor(train_targets, dtype=torch.long), pool])


def _resolve_kl_weight(cfg: Config, method_cls, same_labels: bool, has_teacher: bool) -> float:
    if not has_teacher:
        return 0.0
    if cfg.distill.kl_weight is not None:
        if cfg.distill.kl_weight > 0 and not same_labels:
            raise ConfigError(
                "distill.kl_weight > 0 needs a teacher trained on the same classes as the data; "
                "leave it unset (it is switched off automatically) or use such a teacher"
            )
        return cfg.distill.kl_weight
    if method_cls.default_kl_weight > 0 and not same_labels:
        log.info("teacher and data have different label sets: the KL term to the teacher's logits is switched off")
        return 0.0
    return method_cls.default_kl_weight

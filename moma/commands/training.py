"""The commands that train or describe training: ``moma train``, ``moma distill``, ``moma config``,
``moma methods`` and ``moma compare``.

A run's config comes from a YAML file with ``--set section.key=value`` overrides and a few shortcut
flags (the tables below), or on ``--resume`` from the run folder's own ``config.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from moma.errors import ConfigError

if TYPE_CHECKING:
    from moma.config import Config
    from moma.engine.result import RunResult

# shortcut flag -> config key. One spelling per concept across sub-commands: --out is where a
# command writes (here the folder that receives the run folder), --workers the reader processes.
SHORTCUTS = {
    "data": "data.source",
    "arch": "model.arch",
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "image_size": "data.image_size",
    "seed": "run.seed",
    "name": "run.name",
    "out": "run.output_dir",
    "workers": "data.num_workers",
    "device": "run.device",
}
# Only `moma distill` (and `moma config`) take these: `moma train` trains without distillation.
DISTILL_SHORTCUTS = {
    "method": "distill.method",
    "teacher": "distill.teacher",
}
ALL_SHORTCUTS = {**SHORTCUTS, **DISTILL_SHORTCUTS}
# Shortcuts that may change when a run is resumed: how long it trains and where it runs. The others
# change what the saved state was computed with (or name another run folder) and are refused.
RESUME_SHORTCUTS = ("epochs", "device")


def shortcut_overrides(args) -> list[str]:
    """The ``key=value`` overrides the shortcut flags given stand for."""
    overrides = [f"{key}={getattr(args, f'short_{flag}')}" for flag, key in ALL_SHORTCUTS.items()
                 if getattr(args, f"short_{flag}", None) is not None]
    if getattr(args, "skip_bad", False):
        overrides.append("data.skip_bad=true")
    if getattr(args, "profile", False):
        overrides.append("train.profile=true")
    if getattr(args, "unlabelled", None):
        overrides.append("data.unlabelled=" + json.dumps(args.unlabelled))  # JSON is YAML: paths stay strings
    if getattr(args, "allow_group_overlap", False):
        overrides.append("data.allow_group_overlap=true")
    return overrides


def _config_from_args(args) -> Config:
    from moma.config import load_config

    return load_config(args.config, shortcut_overrides(args) + args.overrides)


def _resume_config(args) -> Config:
    """The run folder's own config, with the shortcuts that make sense on resume applied."""
    from moma.config import load_config
    from moma.engine.layout import CONFIG_NAME

    run_dir = Path(args.resume)
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (no {CONFIG_NAME})")
    refused = [f"--{flag.replace('_', '-')}" for flag in ALL_SHORTCUTS
               if flag not in RESUME_SHORTCUTS and getattr(args, f"short_{flag}", None) is not None]
    if args.config is not None:
        refused.insert(0, f"config file {args.config}")
    if refused:
        allowed = ", ".join(f"--{flag.replace('_', '-')}" for flag in RESUME_SHORTCUTS)
        raise ConfigError(f"--resume continues {run_dir} with its own {CONFIG_NAME}; {', '.join(refused)} cannot change "
                          f"on resume (allowed: {allowed}, --profile, --skip-bad, --set KEY=VALUE)")
    return load_config(run_dir / CONFIG_NAME, shortcut_overrides(args) + args.overrides)


def _print_results(result: RunResult) -> None:
    from moma.engine.layout import CURVES_NAME, METRICS_NAME, TEST_BEST_TAG, report_file
    from moma.metrics import metric_label, metric_names

    run_dir = Path(result.run_dir)
    lines = [f"run folder: {run_dir}", f"best epoch (by val {result.select_metric}): {result.best_epoch}"]
    for tag in ("best", "last"):
        scores = getattr(result, tag)
        if scores and scores.test:
            test = result.test_metrics(tag)
            lines.append("test ({} model): {}".format(
                tag, "  ".join(f"{metric_label(m)} {test[m]:.4f}" for m in metric_names())))
    if result.skipped_tiles:
        lines.append(f"skipped {result.skipped_tiles} unreadable tile(s) (see train.log)")
    lines += [f"metrics: {run_dir / METRICS_NAME}", f"confusion matrix: {run_dir / report_file('confusion_png', TEST_BEST_TAG)}",
              f"curves: {run_dir / CURVES_NAME}"]
    print("\n".join(lines))


def cmd_train(args, distill: bool = False) -> int:
    from moma.engine.runs import run_training

    if args.resume:
        results = run_training(_resume_config(args), resume_dir=Path(args.resume))
    else:
        cfg = _config_from_args(args)
        if not distill and cfg.distill.method != "none":
            raise ConfigError(f"`moma train` trains without distillation; use `moma distill` for method '{cfg.distill.method}'")
        results = run_training(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        _print_results(results)
    return 0


def cmd_config(args) -> int:
    from moma.engine.builder import resolve_method

    cfg = _config_from_args(args)
    resolve_method(cfg)  # distill.method and distill.params are checked as a run would
    print(cfg.to_yaml(), end="")
    return 0


def cmd_methods(args) -> int:
    from moma.distill import all_methods
    from moma.distill.registry import method_defaults, methods_markdown

    methods = all_methods()
    if args.markdown:
        print(methods_markdown(methods))
        return 0
    width = max(len(name) for name in methods)
    for name, cls in methods.items():
        print(f"{name:<{width}}  {cls.summary}")
        print(f"{'':<{width}}  ref: {cls.reference}")
        if args.defaults:
            print(f"{'':<{width}}  defaults: {method_defaults(cls)}")
    return 0


def cmd_compare(args) -> int:
    from moma.compare import report_only, run_compare

    if args.report_only:
        if args.shard or args.fresh:
            raise ConfigError("--report-only trains nothing: drop --shard/--fresh")
        report_only(args.config, args.overrides, out_dir=args.out)
    else:
        run_compare(args.config, args.overrides, out_dir=args.out, resume=not args.fresh, shard=args.shard)
    return 0

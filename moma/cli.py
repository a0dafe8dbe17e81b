"""The ``moma`` command line.

Every sub-command reads a YAML config (``configs/``) with ``--set section.key=value`` overrides and
a few shortcut flags. Errors a user can fix print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from moma import __version__
from moma.errors import ConfigError, DataError, MomaError

if TYPE_CHECKING:
    from moma.engine.result import RunResult

log = logging.getLogger("moma")

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


class TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(verbose: bool) -> None:
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("PIL", "matplotlib", "timm", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_config_args(parser: argparse.ArgumentParser, distill: bool = False) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=0.01 (repeatable)")
    group = parser.add_argument_group("shortcuts (each sets one config key)")
    for flag, key in (ALL_SHORTCUTS if distill else SHORTCUTS).items():
        group.add_argument(f"--{flag.replace('_', '-')}", dest=f"short_{flag}", default=None, metavar="VALUE",
                           help=f"= --set {key}=VALUE")
    group.add_argument("--skip-bad", action="store_true", help="skip unreadable tiles and report how many (= --set data.skip_bad=true)")
    group.add_argument("--profile", action="store_true",
                       help="log per epoch the share of step time spent waiting for data (= --set train.profile=true)")


def _shortcut_overrides(args) -> list[str]:
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


def _config_from_args(args) -> "Config":  # noqa: F821
    from moma.config import load_config

    return load_config(args.config, _shortcut_overrides(args) + args.overrides)


def _resume_config(args) -> "Config":  # noqa: F821
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
    return load_config(run_dir / CONFIG_NAME, _shortcut_overrides(args) + args.overrides)


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


def cmd_evaluate(args) -> int:
    from moma.engine.device import resolve_device
    from moma.engine.inference import evaluate_checkpoint
    from moma.metrics import summary

    out = _evaluation_folder(args.checkpoint, args.out)
    metrics = evaluate_checkpoint(args.checkpoint, args.data, out, resolve_device(args.device), split_file=args.split_file,
                                  split=args.split, mpp=args.data_mpp, batch_size=args.batch_size, skip_bad=args.skip_bad)
    print(json.dumps(summary(metrics), indent=2))
    print(f"reports written to {out}")
    return 0


def _evaluation_folder(checkpoint: str, out: str | None) -> Path:
    """A folder no earlier evaluation wrote: --out if new or empty, else ``evaluation`` (then
    ``evaluation-2``, ...) in the run folder of the checkpoint."""
    from moma.engine.runs import create_run_dir

    if out:
        folder = Path(out)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ConfigError(f"--out {folder} exists and is not empty; choose a new folder (nothing is overwritten)")
        return folder
    source = Path(checkpoint).resolve()
    return create_run_dir(source if source.is_dir() else source.parent, "evaluation")


def cmd_predict(args) -> int:
    from moma.engine.device import resolve_device
    from moma.engine.inference import predict_folder

    if args.slides or _is_slide_input(args.folder):
        return cmd_predict_slides(args)
    out = Path(args.out or "predictions.csv")
    _refuse_existing_file(out)
    frame = predict_folder(args.checkpoint, args.folder, out, resolve_device(args.device), batch_size=args.batch_size,
                           skip_bad=args.skip_bad)
    print(f"{len(frame)} tiles predicted -> {out}")
    print(frame["prediction"].value_counts().to_string())
    return 0


def _refuse_existing_file(path: Path) -> None:
    if path.exists():
        raise ConfigError(f"--out {path} already exists; choose another --out (nothing is overwritten)")


def _refuse_foreign_folder(folder: Path, marker: str, what: str) -> None:
    """A re-run may continue its own earlier output (it holds ``marker``), never fill another folder."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; choose a folder for --out")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ConfigError(f"--out {folder} is not empty and holds no earlier {what} ({marker}); choose another --out")


def _is_slide_input(path: str) -> bool:
    from moma.data.slides import folder_has_slides

    item = Path(path)
    return folder_has_slides(item) if item.is_dir() else item.is_file()  # a file is never a folder of tiles


def cmd_predict_slides(args) -> int:
    from moma.data.slides import collect_slides, slide_id
    from moma.engine.device import resolve_device
    from moma.engine.slide_cohort import PARAMS_NAME
    from moma.engine.slide_predict import DONE, SLIDES_NAME, SlidePredictOptions, predict_slides

    slides = collect_slides([args.folder, *args.slides])
    out = Path(args.out or "slide_predictions")
    _refuse_foreign_folder(out, PARAMS_NAME, "slide predictions")
    options = SlidePredictOptions(batch_size=args.batch_size, workers=args.workers, slide_mpp=args.slide_mpp, mpp=args.model_mpp,
                                  allow_upsampling=args.allow_upsampling, min_tissue=args.min_tissue,
                                  heatmap_class=args.heatmap_class)
    summary = predict_slides(args.checkpoint, slides, out, resolve_device(args.device), options)
    print(summary.drop(columns=["path", "reason"]).to_string(index=False))
    current = summary[summary["slide"].isin([slide_id(path) for path in slides])]
    done = current[current["status"] == DONE]
    if done.empty:
        reason = current["reason"].iloc[-1] if len(current) else "no slides"
        raise DataError(f"no slide could be predicted ({reason}); the reasons are in {out / SLIDES_NAME}")
    skipped = len(current) - len(done)
    print(f"{len(done)} slide(s) predicted -> {out} (per slide: CSV, heatmap PNG, GeoJSON for QuPath; {SLIDES_NAME})"
          + (f"; {skipped} skipped, reasons in {SLIDES_NAME}" if skipped else ""))
    return 0


def cmd_tile(args) -> int:
    from moma.data.slides import collect_slides
    from moma.data.tiling import TILING_PARAMS, TilingOptions, tile_slides

    _refuse_foreign_folder(Path(args.out), TILING_PARAMS, "`moma tile` output")
    slides = collect_slides(args.inputs)
    if args.annotations and not Path(args.annotations).is_dir():
        raise ConfigError(f"--annotations {args.annotations}: not a folder (expected <slide id>.geojson files)")
    options = TilingOptions(tile_size=args.tile_size, mpp=args.tile_mpp, min_tissue=args.min_tissue,
                            annotations=Path(args.annotations) if args.annotations else None, label_by=args.label_by,
                            min_overlap=args.min_overlap, unlabelled=args.unlabelled, label=args.label,
                            slide_mpp=args.slide_mpp, allow_upsampling=args.allow_upsampling, workers=args.workers)
    summary = tile_slides(slides, Path(args.out), options)
    print(f"{summary.slides} slide(s): {summary.tiles} tiles ({summary.written} written, {summary.skipped_existing} "
          f"already there) -> {summary.manifest}")
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _add_slide_args(parser: argparse.ArgumentParser, predicting: bool = False) -> None:
    parser.add_argument("--slide-mpp", type=_positive(float), metavar="UM",
                        help="level-0 microns per pixel, for slides whose metadata lacks it")
    parser.add_argument("--allow-upsampling", action="store_true",
                        help="read a slide scanned more than 10 %% coarser than the tiles' microns per pixel by "
                             "enlarging it (refused by default)")
    parser.add_argument("--min-tissue", type=_fraction, default=0.5, metavar="FRACTION",
                        help="keep tiles at least this much covered by tissue (default 0.5)")
    if predicting:
        parser.add_argument("--workers", type=_count, default=None,
                            help="processes reading tiles while the model runs (default: a quarter of the CPU cores, "
                                 "at least 1; with a GPU the cores but one, at most 8; 0 reads in the main process)")
    else:
        parser.add_argument("--workers", type=_count, default=0, help="worker processes reading the slide (default 0: none)")


def cmd_info(args) -> int:
    from moma.engine.checkpoint import read_metadata

    meta = read_metadata(args.checkpoint)
    shown = {k: v for k, v in meta.__dict__.items() if k != "config"}
    if args.config:
        shown["config"] = meta.config
    print(json.dumps(shown, indent=2, default=str))
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


def cmd_config(args) -> int:
    from moma.engine.builder import resolve_method

    cfg = _config_from_args(args)
    resolve_method(cfg)  # distill.method and distill.params are checked as a run would
    print(cfg.to_yaml(), end="")
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


def cmd_import_teacher(args) -> int:
    from moma.engine.teacher_import import import_teacher, parse_floats

    _refuse_existing_file(Path(args.out))
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    meta = import_teacher(args.source, args.out, arch=args.arch, class_names=classes, features_only=args.features_only,
                          image_size=args.image_size, mpp=args.model_mpp, mean=parse_floats(args.mean, "--mean"),
                          std=parse_floats(args.std, "--std"), embedding=args.embedding, layout=args.layout)
    kind = f"{meta.num_classes} classes ({', '.join(meta.class_names)})" if meta.class_names else "features only"
    known = f"{meta.config['foundation']} ({meta.config['source']}), " if "foundation" in meta.config else ""
    recipe = meta.config.get("embedding")
    embedding = f", embedding {recipe} ({meta.config.get('embedding_dim', '?')} wide)" if recipe else ""
    print(f"teacher {known}{meta.arch}, {kind}{embedding}, {meta.image_size} px, mean {meta.mean}, std {meta.std} "
          f"-> {args.out}")
    return 0


def cmd_embed(args) -> int:
    from moma.engine.teacher_cache_write import embed_sources

    done = embed_sources(args.teacher, args.data, out=args.out, image_size=args.image_size, views=args.views,
                         view_seed=args.view_seed, stain_method=args.stain_method, stain_reference=args.stain_reference,
                         device=args.device, batch_size=args.batch_size, workers=args.workers,
                         shard_tiles=args.shard_tiles, progress=True)
    kept = f", {done['shards_kept']} kept from an earlier run" if done["shards_kept"] else ""
    logits = f"{done['logits_width']} logits + " if done["logits_width"] else ""
    print(f"teacher cache {done['folder']}: {done['tiles']} tiles x {done['views_per_tile']} views, {logits}"
          f"{done['embedding_width']}-wide embedding each; {done['shards_computed']} shard(s) computed in "
          f"{done['seconds']:.0f} s{kept}. Use it with --set distill.teacher_cache={done['folder']}")
    return 0


def cmd_export(args) -> int:
    from moma.engine.export import export_onnx

    _refuse_existing_file(Path(args.out))
    report = export_onnx(args.checkpoint, args.out, opset=args.opset, dynamic_batch=args.dynamic_batch)
    print(f"{report['arch']} ({report['classes']} classes, input {report['input_shape']}) -> {args.out}; "
          f"max |delta prob| vs PyTorch on a test batch: {report['max_prob_diff']:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moma", description="Knowledge distillation for histopathology tile classifiers (MoMA and baselines).")
    parser.add_argument("--version", action="version", version=f"moma-distill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="supervised training (a teacher, or a student without distillation)")
    _add_config_args(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in its folder")
    train.set_defaults(func=lambda a: cmd_train(a, distill=False))

    distill = sub.add_parser("distill", help="train a student with a distillation method (--method, --teacher)")
    _add_config_args(distill, distill=True)
    pool = distill.add_argument_group("unlabelled tiles (the distillation terms see them, cross-entropy does not)")
    pool.add_argument("--unlabelled", action="append", default=[], metavar="SOURCE",
                      help="a folder of tiles, a manifest CSV, `moma tile` output, or 'rest' (repeatable; "
                           "= --set data.unlabelled=[...])")
    pool.add_argument("--allow-group-overlap", action="store_true",
                      help="let the pool share patients/slides with validation and test (= data.allow_group_overlap)")
    distill.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in its folder")
    distill.set_defaults(func=lambda a: cmd_train(a, distill=True))

    evaluate = sub.add_parser("evaluate", help="metrics of a checkpoint on labelled tiles")
    evaluate.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    evaluate.add_argument("data", help="folder of class sub-folders or manifest CSV")
    evaluate.add_argument("--split-file", help="evaluate one split of this split.csv (e.g. a run's)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--data-mpp", type=_positive(float), metavar="UM",
                          help="microns per pixel of the data (checked against the model's)")
    evaluate.add_argument("--out", help="a new output folder (default: evaluation, evaluation-2, ... in the run folder)")
    evaluate.add_argument("--batch-size", type=int, default=128)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip unreadable tiles (and say how many)")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="predict every tile in a folder (a CSV), or whole slides (CSV, heatmap, GeoJSON)")
    predict.add_argument("checkpoint", help="a .safetensors checkpoint, a run folder or an exported .onnx file")
    predict.add_argument("folder", metavar="FOLDER_OR_SLIDE", help="a folder of tiles, or slides / folders of slides")
    predict.add_argument("slides", nargs="*", metavar="SLIDE", help="more slides or folders of slides")
    predict.add_argument("--out", help="CSV for tiles (default predictions.csv); folder for slides (default slide_predictions)")
    predict.add_argument("--batch-size", type=int, default=128)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--skip-bad", action="store_true")
    slides = predict.add_argument_group("slides (tile size and mpp come from the checkpoint)")
    slides.add_argument("--model-mpp", type=_positive(float), metavar="UM",
                        help="microns per pixel of the model's training tiles, if the checkpoint lacks it")
    slides.add_argument("--heatmap-class", metavar="CLASS", help="also draw the probability of this class")
    _add_slide_args(slides, predicting=True)
    predict.set_defaults(func=cmd_predict)

    imported = sub.add_parser("import-teacher", help="turn an external model (timm/torchvision weights, a timm or "
                                                     "transformers hub folder) into a teacher checkpoint")
    imported.add_argument("source", help="weights file (.safetensors/.pth/.pt/.bin) or a Hugging Face hub folder (config.json + weights)")
    imported.add_argument("--arch", help="timm model name (read from config.json for a folder)")
    imported.add_argument("--layout", metavar="NAME", help="a published foundation model (uni, uni2-h, virchow2, "
                          "h-optimus-0): its card's timm arguments and embedding, for a bare weights file; a folder "
                          "is recognised from its config.json")
    imported.add_argument("--embedding", metavar="RECIPE", help="a vision transformer's embedding: class, mean-patch "
                          "or class+mean-patch (class token and mean patch token concatenated); default: the card's")
    labels = imported.add_mutually_exclusive_group()
    labels.add_argument("--classes", help="class names in the classifier's output order, comma-separated")
    labels.add_argument("--features-only", action="store_true",
                        help="drop the classifier: a teacher for feature methods (moma, crd, fitnet, ...)")
    imported.add_argument("--image-size", type=int, help="tile size in pixels the teacher expects (default: its config)")
    imported.add_argument("--model-mpp", type=_positive(float), metavar="UM",
                          help="microns per pixel of the teacher's training tiles")
    imported.add_argument("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406 (default: its config)")
    imported.add_argument("--std", help="normalisation std, e.g. 0.229,0.224,0.225 (default: its config)")
    imported.add_argument("--out", required=True, help="teacher checkpoint to write (.safetensors)")
    imported.set_defaults(func=cmd_import_teacher)

    embed = sub.add_parser("embed", help="compute a frozen teacher's outputs once per tile and flip/rotation view "
                                         "(a teacher cache for distill.teacher_cache)")
    embed.add_argument("teacher", help="teacher checkpoint (.safetensors) or its run folder")
    embed.add_argument("data", nargs="+", metavar="DATA", help="tile folders, manifest CSVs or `moma tile` output: "
                       "the labelled data and the unlabelled pool the runs will use")
    embed.add_argument("--out", help="cache folder (default: teacher_cache/<teacher arch>-<fingerprint>); re-running "
                       "the same command completes an interrupted cache")
    embed.add_argument("--image-size", type=_positive(int), help="tile size in pixels, as data.image_size of the "
                       "runs (default: the teacher's)")
    embed.add_argument("--views", default="all", help="all: the 8 flip/rotation views of every tile; N: N views per "
                       "tile drawn once (seeded), training then draws from those")
    embed.add_argument("--view-seed", type=int, default=0, help="seed of the views drawn with --views N")
    embed.add_argument("--stain-reference", metavar="TILE", help="stain-normalise to this tile first, as "
                       "data.stain_normalize.reference of the runs")
    embed.add_argument("--stain-method", choices=["macenko", "reinhard"], default="macenko")
    embed.add_argument("--batch-size", type=_positive(int), default=64)
    embed.add_argument("--workers", type=_count, default=0, help="reader processes")
    embed.add_argument("--shard-tiles", type=_positive(int), default=1024, help="tiles per shard file")
    embed.add_argument("--device", default="auto")
    embed.set_defaults(func=cmd_embed)

    export = sub.add_parser("export", help="export a student checkpoint for deployment (ONNX)")
    export.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder")
    export.add_argument("--format", default="onnx", choices=["onnx"])
    export.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    export.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch of 1)")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.set_defaults(func=cmd_export)
    tile = sub.add_parser("tile", help="cut slides into PNG tiles of tissue with a manifest.csv (group = slide)")
    tile.add_argument("inputs", nargs="+", metavar="SLIDE_OR_FOLDER")
    tile.add_argument("--out", required=True, help="output folder (re-running skips the tiles already there)")
    tile.add_argument("--tile-size", type=_positive(int), default=224, help="tile side in pixels (default 224)")
    tile.add_argument("--tile-mpp", type=_positive(float), default=0.5, metavar="UM",
                      help="microns per pixel of the tiles written (default 0.5)")
    tile.add_argument("--annotations", metavar="DIR", help="folder of QuPath GeoJSON files <slide id>.geojson giving tile labels")
    tile.add_argument("--label-by", choices=["centre", "overlap"], default="centre",
                      help="a tile takes the class of the region holding its centre, or covering most of it")
    tile.add_argument("--min-overlap", type=_fraction, default=0.5, help="with --label-by overlap: least covered fraction")
    tile.add_argument("--unlabelled", metavar="NAME", help="label tiles outside every annotation NAME (default: skip them)")
    tile.add_argument("--label", default="unlabelled", help="label of every tile when there are no annotations")
    _add_slide_args(tile)
    tile.set_defaults(func=cmd_tile)

    info = sub.add_parser("info", help="show a checkpoint's metadata")
    info.add_argument("checkpoint")
    info.add_argument("--config", action="store_true", help="also print the training config")
    info.set_defaults(func=cmd_info)

    methods = sub.add_parser("methods", help="list the distillation methods")
    methods.add_argument("--defaults", action="store_true", help="also show default loss weights and parameters")
    methods.add_argument("--markdown", action="store_true", help="print a markdown table (docs/methods.md)")
    methods.set_defaults(func=cmd_methods)

    config = sub.add_parser("config", help="print the effective config (defaults <- file <- overrides)")
    _add_config_args(config, distill=True)
    config.set_defaults(func=cmd_config)

    compare = sub.add_parser("compare", help="run the paper's experiment grid: settings x methods x folds x seeds")
    compare.add_argument("config", help="compare config (see configs/compare/)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--out", help="output folder (default from the config); re-running resumes it")
    compare.add_argument("--fresh", action="store_true", help="start a new output folder instead of resuming")
    compare.add_argument("--shard", metavar="K/N", help="train only the K-th of N disjoint shares of the cells into "
                         "the same folder; N processes may run at once (one per GPU, or a SLURM job array)")
    compare.add_argument("--report-only", action="store_true",
                         help="train nothing: write the tables, plots and report of the cells finished so far")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except MomaError as exc:
        if args.debug:
            raise
        print(f"moma: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = {"compare": "re-running the same command completes the missing cells",
                "predict": "re-running the same command predicts the slides not yet done",
                "tile": "re-running the same command writes the tiles not yet written"}.get(
                    args.command, "an interrupted run continues with `--resume RUN_DIR`")
        print(f"moma: interrupted; {hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, the traceback behind --debug
        if args.debug:
            raise
        print(f"moma: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1

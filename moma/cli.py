"""The ``moma`` command line: the argument parser of every sub-command, and the one place errors
become a line and an exit status.

Every sub-command reads a YAML config (``configs/``) with ``--set section.key=value`` overrides and
a few shortcut flags. Errors a user can fix print one line and exit with status 2; ``--debug``
shows the traceback instead. The handlers live in :mod:`moma.commands`, one module per group.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

from moma import __version__
from moma.commands.checkpoints import cmd_embed, cmd_evaluate, cmd_export, cmd_import_teacher, cmd_info, cmd_predict
from moma.commands.slides import cmd_tile
from moma.commands.training import ALL_SHORTCUTS, SHORTCUTS, cmd_compare, cmd_config, cmd_methods, cmd_train
from moma.errors import MomaError

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

"""The commands on a model file: ``moma evaluate``, ``moma predict`` on tiles, ``moma info``,
``moma export``, ``moma import-teacher`` and ``moma embed`` (a teacher's outputs cached)."""

from __future__ import annotations

import json
from pathlib import Path

from moma.commands.slides import cmd_predict_slides, is_slide_input
from moma.errors import ConfigError


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

    if args.slides or is_slide_input(args.folder):
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


def cmd_info(args) -> int:
    from moma.engine.checkpoint import read_metadata

    meta = read_metadata(args.checkpoint)
    shown = {k: v for k, v in meta.__dict__.items() if k != "config"}
    if args.config:
        shown["config"] = meta.config
    print(json.dumps(shown, indent=2, default=str))
    return 0


def cmd_export(args) -> int:
    from moma.engine.export import export_onnx

    _refuse_existing_file(Path(args.out))
    report = export_onnx(args.checkpoint, args.out, opset=args.opset, dynamic_batch=args.dynamic_batch)
    print(f"{report['arch']} ({report['classes']} classes, input {report['input_shape']}) -> {args.out}; "
          f"max |delta prob| vs PyTorch on a test batch: {report['max_prob_diff']:.2e}")
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

"""The commands on whole slides: ``moma tile`` cuts them into a tile data set, ``moma predict`` on
slides writes per-slide predictions and one table over the cohort."""

from __future__ import annotations

from pathlib import Path

from moma.errors import ConfigError, DataError


def _refuse_foreign_folder(folder: Path, marker: str, what: str) -> None:
    """A re-run may continue its own earlier output (it holds ``marker``), never fill another folder."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; choose a folder for --out")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ConfigError(f"--out {folder} is not empty and holds no earlier {what} ({marker}); choose another --out")


def is_slide_input(path: str) -> bool:
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

"""Region annotations as QuPath exports them (GeoJSON, level-0 pixel coordinates) and tile labels.

QuPath writes a FeatureCollection, a bare list of Features or a single Feature; the class of an
annotation is ``properties.classification.name`` (older exports: a plain string). Polygons and
MultiPolygons are used; points, lines and unclassified annotations carry no region label.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape

from moma.errors import DataError

log = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".geojson", ".json")
LABEL_RULES = ("centre", "overlap")


def _features(data, path: Path) -> list[dict]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise DataError(f"annotations {path}: expected a GeoJSON FeatureCollection or a list of Features (as QuPath exports)")


def _class_name(feature: dict) -> str | None:
    classification = (feature.get("properties") or {}).get("classification")
    if isinstance(classification, dict):
        classification = classification.get("name")
    return classification.strip() if isinstance(classification, str) and classification.strip() else None


def read_annotations(path: str | Path) -> dict[str, shapely.Geometry]:
    """One (multi)polygon per class: the union of that class's annotated regions."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"annotations {path}: not a readable GeoJSON file ({exc})") from None
    regions: dict[str, list[shapely.Geometry]] = {}
    unclassified = 0
    for number, feature in enumerate(_features(data, path)):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise DataError(f"annotations {path}: feature {number} has no geometry")
        if feature["geometry"].get("type") not in ("Polygon", "MultiPolygon"):
            continue
        name = _class_name(feature)
        if name is None:
            unclassified += 1
            continue
        try:
            geometry = shapely.make_valid(shape(feature["geometry"]))
        except (ValueError, TypeError, AttributeError, shapely.errors.ShapelyError) as exc:
            raise DataError(f"annotations {path}: feature {number} has an invalid geometry ({exc})") from None
        regions.setdefault(name, []).append(geometry)
    if unclassified:
        log.warning("annotations %s: %d polygon(s) without a classification were ignored", path, unclassified)
    merged = {name: shapely.union_all(parts) for name, parts in sorted(regions.items())}
    for geometry in merged.values():
        shapely.prepare(geometry)
    return merged


def find_annotation_file(folder: Path, slide_id: str) -> Path | None:
    for suffix in ANNOTATION_SUFFIXES:
        candidate = folder / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def label_tiles(regions: dict[str, shapely.Geometry], x: np.ndarray, y: np.ndarray, size: np.ndarray,
                rule: str = "centre", min_overlap: float = 0.5) -> np.ndarray:
    """The class of each tile (level-0 box x, y, size), or None where no region claims it.

    ``centre``: the region containing the tile's centre (where regions of two classes overlap
    there, the one covering more of the tile). ``overlap``: the class covering the largest part
    of the tile, if that part is at least ``min_overlap``.
    """
    if rule not in LABEL_RULES:
        raise DataError(f"label rule {rule!r}: use one of {', '.join(LABEL_RULES)}")
    x, y, size = (np.asarray(a, dtype=float) for a in (x, y, size))
    labels = np.full(len(x), None, dtype=object)
    if not regions or len(x) == 0:
        return labels
    boxes = shapely.box(x, y, x + size, y + size)
    names = list(regions)
    covered = np.stack([shapely.area(shapely.intersection(boxes, regions[n])) for n in names]) / (size * size)
    if rule == "centre":
        inside = np.stack([shapely.contains_xy(regions[n], x + size / 2, y + size / 2) for n in names])
        covered = np.where(inside, covered, -1.0)
        keep = inside.any(axis=0)
    else:
        keep = covered.max(axis=0) >= min_overlap
    best = covered.argmax(axis=0)
    labels[keep] = np.asarray(names, dtype=object)[best[keep]]
    return labels

"""Data: tile tables from folders or manifests, patient-level splits, transforms, stain jitter."""

from moma.data.dataset import TileDataset
from moma.data.splits import apply_split, kfold_split, load_split, save_split, split_table
from moma.data.tiles import TileTable, scan_tiles

__all__ = ["TileDataset", "TileTable", "apply_split", "kfold_split", "load_split", "save_split", "scan_tiles", "split_table"]

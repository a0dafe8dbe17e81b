"""Slide readers: one interface (``SlideReader``), OpenSlide for scanner formats, tifffile for plain
tiled TIFF and OME-TIFF, and a registry a plugin adds its own reader to."""

from moma.data.slide_readers.base import SlideReader
from moma.data.slide_readers.openslide_reader import OpenSlideReader
from moma.data.slide_readers.registry import describe_readers, open_reader, reader_for, readers, register_reader
from moma.data.slide_readers.tiff_reader import TiffReader

# Registration order is the reverse of the asking order: tifffile before OpenSlide.
register_reader(OpenSlideReader)
register_reader(TiffReader)

__all__ = ["OpenSlideReader", "SlideReader", "TiffReader", "describe_readers", "open_reader", "reader_for", "readers",
           "register_reader"]

"""Slide readers by name, and the choice of a reader for a file.

Readers are asked newest first, so a reader registered by a plugin is asked before the built-in
ones and can take over a format; the built-in tifffile reader is asked before OpenSlide, which
then gets only the TIFFs that scanners wrote (and the scanner formats).
"""

from __future__ import annotations

from pathlib import Path

from moma.data.slide_readers.base import SlideReader
from moma.errors import ConfigError, DataError

_READERS: dict[str, type[SlideReader]] = {}


def register_reader(reader: type[SlideReader]) -> type[SlideReader]:
    """Make ``reader`` available under ``reader.name`` (replacing one of that name); usable as a
    class decorator."""
    if not (isinstance(reader, type) and issubclass(reader, SlideReader)):
        raise ConfigError(f"{reader!r} is not a SlideReader subclass")
    _READERS.pop(reader.name, None)  # re-registered: asked first again
    _READERS[reader.name] = reader
    return reader


def readers() -> list[type[SlideReader]]:
    """The registered readers in the order they are asked (newest first)."""
    return list(reversed(_READERS.values()))


def reader_for(path: Path) -> type[SlideReader] | None:
    """The first reader that says it can open ``path``, or None."""
    return next((reader for reader in readers() if reader.can_open(Path(path))), None)


def describe_readers() -> str:
    return "; ".join(f"{reader.name}: {reader.formats}" for reader in readers())


def open_reader(path: Path, reader: str | type[SlideReader] | None = None) -> SlideReader:
    """``path`` opened by ``reader`` (a registered name or a reader class), or by the first reader
    that can open it. Worker processes are handed the class: pickled by reference, it imports its
    plugin module in a process that did not inherit the registry (spawn, forkserver)."""
    if isinstance(reader, str):
        if reader not in _READERS:
            raise ConfigError(f"unknown slide reader {reader!r} (known: {', '.join(sorted(_READERS))})")
        reader = _READERS[reader]
    reader = reader or reader_for(path)
    if reader is None:
        raise DataError(f"{path} is not a slide any reader can open ({describe_readers()})")
    return reader(path)

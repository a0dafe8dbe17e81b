"""User-facing errors.

Anything the user can fix (a bad path, a corrupt tile, an unknown config key) is raised as a
:class:`MomaError`. The CLI prints its message on one line and exits non-zero; other exceptions
are bugs and keep their traceback.
"""


class MomaError(Exception):
    """An error caused by input the user controls; the message says what to fix."""


class DataError(MomaError):
    """Bad or missing data: unreadable tiles, empty classes, broken manifests."""


class ConfigError(MomaError):
    """An invalid configuration: unknown key, wrong type, impossible combination."""


class CheckpointError(MomaError):
    """A checkpoint that cannot be read or does not fit what it is used for."""

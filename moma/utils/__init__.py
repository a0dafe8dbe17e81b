"""Low-level helpers every layer may use: atomic file writes, file locks, tensor collectives and the
pydantic error formatter.

Nothing here imports another part of the package except :mod:`moma.errors`.
"""

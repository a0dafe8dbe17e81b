"""Low-level helpers every layer may use: atomic file writes and tensor collectives.

Nothing here imports another part of the package except :mod:`moma.errors`.
"""

"""The geometric views of a tile: the 8 symmetries of the square (flips and 90-degree rotations).

Histology has no 'up', so training flips and rotates tiles; every such view is one of the 8
elements of the dihedral group, numbered here once for the whole package:

    view v in 0..7:  flip = v // 4 (mirror left-right), k = v % 4 (quarter turns, counter-clockwise)
    apply_view(x, v) = rot90(fliplr(x) if flip else x, k)

A view number is what the teacher cache stores with each teacher output, so that a student trained
later sees exactly the view the teacher saw. ``view_group`` gives the views that the configured
flips and rotations can produce (drawn uniformly: independent random flips and rotations give
each element of the group they generate with equal probability).
"""

from __future__ import annotations

import torch

NUM_VIEWS = 8
IDENTITY = 0
_HFLIP, _VFLIP, _ROT90 = 4, 6, 1  # left-right mirror, top-bottom mirror (= half turn of the mirror), quarter turn


def apply_view(image: torch.Tensor, view: int) -> torch.Tensor:
    """``image`` (..., H, W) seen in view ``view``."""
    if not 0 <= view < NUM_VIEWS:
        raise ValueError(f"view {view} is not in 0..{NUM_VIEWS - 1}")
    if view // 4:
        image = torch.flip(image, dims=(-1,))
    k = view % 4
    return torch.rot90(image, k, dims=(-2, -1)) if k else image


def compose(first: int, second: int) -> int:
    """The view of applying ``first`` and then ``second``."""
    probe = torch.arange(4).view(2, 2)
    target = apply_view(apply_view(probe, first), second)
    return next(v for v in range(NUM_VIEWS) if torch.equal(apply_view(probe, v), target))


def view_group(hflip: bool, vflip: bool, rot90: bool) -> tuple[int, ...]:
    """The views that random flips (left-right, top-bottom) and quarter turns can produce, sorted."""
    generators = [v for v, on in ((_HFLIP, hflip), (_VFLIP, vflip), (_ROT90, rot90)) if on]
    group = {IDENTITY}
    frontier = [IDENTITY]
    while frontier:
        current = frontier.pop()
        for g in generators:
            nxt = compose(current, g)
            if nxt not in group:
                group.add(nxt)
                frontier.append(nxt)
    return tuple(sorted(group))

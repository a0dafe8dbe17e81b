"""The dihedral view numbering shared by augmentation and the teacher cache."""

import torch

from moma.data.views import NUM_VIEWS, apply_view, compose, view_group


def _tile():
    return torch.arange(2 * 3 * 3).view(2, 3, 3)


def test_views_are_the_eight_distinct_symmetries():
    seen = {tuple(apply_view(_tile(), v).flatten().tolist()) for v in range(NUM_VIEWS)}
    assert len(seen) == NUM_VIEWS


def test_view_numbering_by_hand():
    x = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(apply_view(x, 4), torch.tensor([[2, 1], [4, 3]]))  # left-right mirror
    assert torch.equal(apply_view(x, 1), torch.tensor([[2, 4], [1, 3]]))  # quarter turn counter-clockwise
    assert torch.equal(apply_view(x, 6), torch.tensor([[3, 4], [1, 2]]))  # top-bottom mirror


def test_compose_matches_applying_twice():
    for a in range(NUM_VIEWS):
        for b in range(NUM_VIEWS):
            assert torch.equal(apply_view(apply_view(_tile(), a), b), apply_view(_tile(), compose(a, b)))


def test_groups_generated_by_the_configured_flips_and_turns():
    assert view_group(False, False, False) == (0,)
    assert view_group(True, False, False) == (0, 4)
    assert view_group(False, True, False) == (0, 6)
    assert view_group(True, True, False) == (0, 2, 4, 6)
    assert view_group(False, False, True) == (0, 1, 2, 3)
    assert view_group(True, True, True) == tuple(range(8))
    assert view_group(False, True, True) == tuple(range(8))

"""Mirroring with an inter-modal rotation: conjugated rotations, per-sample flips, test-time mirror axes."""
import numpy as np
import pytest
import torch

from nnunet_rl.mirroring import (FlipGroup, Mirroring, commuting_axes, conjugation_table, draw_mirroring, flip_matrix,
                                 mirror_batch)
from nnunet_rl.rl_xalign import PoseAlign
from nnunet_rl.rotations import cube_rotations, quarter_turn, rotate_array, rotation_index

HALF_TURN_ABOUT_AXIS_0 = rotation_index(quarter_turn(3, 1, 2) @ quarter_turn(3, 1, 2))
QUARTER_TURN_IN_PLANE_01 = rotation_index(quarter_turn(3, 0, 1))


@pytest.mark.parametrize("dim", [2, 3])
def test_conjugation_table_is_f_r_f_for_every_flip_and_rotation(dim):
    rotations = cube_rotations(dim)
    for axes in [(), (0,), (1,), (0, 1), tuple(range(dim))]:
        flip = flip_matrix(axes, dim)
        table = conjugation_table(axes, dim)
        for index, rotation in enumerate(rotations):
            assert np.array_equal(rotations[int(table[index])], flip @ rotation @ flip)
        assert sorted(table.tolist()) == list(range(len(rotations)))  # a permutation of the group


def test_the_conjugated_rotation_realigns_a_mirrored_pair():
    """aux = R0·primary; R = R0ᵀ undoes it; after flipping both by F, F·R·F undoes it."""
    generator = torch.Generator().manual_seed(0)
    primary = torch.rand(4, 1, 6, 6, 6, generator=generator)
    known = cube_rotations(3)[QUARTER_TURN_IN_PLANE_01]
    auxiliary = torch.from_numpy(rotate_array(primary.numpy(), known).copy())
    undo = torch.tensor([rotation_index(known.T)])
    mirroring = Mirroring((FlipGroup(0, 1, ()), FlipGroup(1, 3, (0,)), FlipGroup(3, 4, (1, 2))), 3)
    pose = PoseAlign(3, k_sel=1, temperature=0.1)
    flipped_primary, flipped_auxiliary = mirror_batch(primary, mirroring), mirror_batch(auxiliary, mirroring)
    torch.testing.assert_close(pose(flipped_auxiliary, undo, mirroring), flipped_primary, rtol=0, atol=0)
    assert not torch.equal(pose(flipped_auxiliary, undo), flipped_primary)  # the unconjugated rotation is wrong


def test_draw_mirroring_flips_each_axis_half_the_time_in_contiguous_groups():
    mirroring = draw_mirroring(4000, (0, 1, 2), 3, torch.Generator().manual_seed(0))
    assert mirroring.groups[0].start == 0 and mirroring.groups[-1].stop == 4000
    assert all(a.stop == b.start for a, b in zip(mirroring.groups, mirroring.groups[1:]))
    assert len({group.axes for group in mirroring.groups}) == len(mirroring.groups) == 8
    for axis in range(3):
        flipped = sum(g.stop - g.start for g in mirroring.groups if axis in g.axes)
        assert 1800 < flipped < 2200


def test_mirror_batch_flips_only_the_samples_of_each_group():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    mirroring = Mirroring((FlipGroup(0, 1, ()), FlipGroup(1, 2, (1,))), 2)
    mirrored = mirror_batch(x, mirroring)
    assert torch.equal(mirrored[0], x[0]) and torch.equal(mirrored[1], x[1].flip(2))
    assert mirror_batch(x, Mirroring((FlipGroup(0, 2, ()),), 2)) is x


def test_only_flips_that_commute_with_every_greedy_rotation_are_kept_for_test_time_mirroring():
    assert commuting_axes((0, 1, 2), [0], 3) == (0, 1, 2)  # identity: co-registered data keep nnU-Net's TTA
    assert commuting_axes((0, 1, 2), [HALF_TURN_ABOUT_AXIS_0], 3) == (0, 1, 2)  # diagonal: commutes with all flips
    assert commuting_axes((0, 1, 2), [QUARTER_TURN_IN_PLANE_01], 3) == (2,)  # a flip of axis 0 or 1 inverts it
    assert commuting_axes((0, 1, 2), [0, QUARTER_TURN_IN_PLANE_01], 3) == (2,)
    assert commuting_axes(None, [QUARTER_TURN_IN_PLANE_01], 3) is None
    assert commuting_axes((0, 1), [rotation_index(quarter_turn(2, 0, 1))], 2) == ()


def test_unchanged_actions_skip_the_per_group_path():
    all_axes = Mirroring((FlipGroup(0, 1, ()), FlipGroup(1, 2, (0, 1, 2))), 3)  # F = −I commutes with everything
    assert not all_axes.changes(torch.tensor([QUARTER_TURN_IN_PLANE_01]))
    one_axis = Mirroring((FlipGroup(0, 1, ()), FlipGroup(1, 2, (0,))), 3)
    assert not one_axis.changes(torch.tensor([0, HALF_TURN_ABOUT_AXIS_0]))
    assert one_axis.changes(torch.tensor([QUARTER_TURN_IN_PLANE_01]))

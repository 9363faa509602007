import numpy as np
import pytest

from nnunet_rl.rotations import cube_rotations, quarter_turn, rotate_array, rotation_index, verify_rotation_group


@pytest.mark.parametrize("dim, order", [(2, 4), (3, 24)])
def test_group_order_and_properties(dim, order):
    group = cube_rotations(dim)
    assert len(group) == order
    assert np.array_equal(group[0], np.eye(dim, dtype=int))
    verify_rotation_group(group)


def test_order_is_deterministic_and_indices_round_trip():
    first, second = cube_rotations(3), cube_rotations(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert [rotation_index(m) for m in first] == list(range(24))


def test_quarter_turn_takes_first_axis_to_second():
    assert np.array_equal(quarter_turn(3, 0, 2) @ np.array([1, 0, 0]), [0, 0, 1])


@pytest.mark.parametrize("bad, message", [
    ([np.eye(3, dtype=int), np.diag([1, 1, -1])], "determinant"),
    ([np.eye(3, dtype=int), np.eye(3, dtype=int)], "distinct"),
    ([np.eye(3, dtype=int), quarter_turn(3, 0, 1)], "not closed"),
    ([np.eye(2, dtype=int) * 2], "orthogonal"),
    ([np.full((2, 2), 0.3)], "integer"),
])
def test_verify_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        verify_rotation_group(bad)


def _centred(index, shape):
    return np.asarray(index) - (np.asarray(shape) - 1) / 2


# the marked voxel's centred coordinates are non-zero with distinct magnitudes, so matrix @ x identifies the matrix
@pytest.mark.parametrize("dim, shape, marked", [(2, (7, 7), (0, 4)), (2, (4, 7), (0, 4)),
                                                (3, (7, 7, 7), (0, 1, 4)), (3, (3, 4, 7), (0, 0, 6))])
def test_single_voxel_moves_to_matrix_times_centred_index(dim, shape, marked):
    arr = np.zeros(shape)
    arr[marked] = 1
    for matrix in cube_rotations(dim):
        rotated = rotate_array(arr, matrix)
        assert rotated.shape == tuple(np.abs(matrix) @ shape)
        assert np.array_equal(_centred(np.argwhere(rotated)[0], rotated.shape), matrix @ _centred(marked, shape))


def test_leading_axes_are_kept():
    arr = np.random.default_rng(0).random((2, 3, 4, 5))
    matrix = cube_rotations(3)[7]
    rotated = rotate_array(arr, matrix)
    for channel in range(2):
        assert np.array_equal(rotated[channel], rotate_array(arr[channel], matrix))


@pytest.mark.parametrize("dim", [2, 3])
def test_composition_and_inverse(dim):
    arr = np.random.default_rng(1).random((4, 5, 6)[-dim:])
    group = cube_rotations(dim)
    for a in group:
        assert np.array_equal(rotate_array(rotate_array(arr, a), a.T), arr)
        for b in group:
            assert np.array_equal(rotate_array(rotate_array(arr, a), b), rotate_array(arr, b @ a))


def test_rotate_array_rejects_non_permutations():
    with pytest.raises(ValueError, match="signed permutation"):
        rotate_array(np.zeros((3, 3)), [[1, 1], [0, 1]])
    with pytest.raises(ValueError, match="at least 3 axes"):
        rotate_array(np.zeros((3, 3)), np.eye(3, dtype=int))

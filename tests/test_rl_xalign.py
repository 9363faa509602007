"""RL-XAlign (Qu and Zhao, RL-U2Net): CMA against a per-window loop, rotations against rotate_array, the policy,
S_similarity, eq. 7."""
import itertools
import math

import pytest
import torch

from helpers import feature_similarity

from nnunet_rl.rl_xalign import (CrossModalAttention, PoseAlign, RLXAlign, rotate_by_resampling, rotate_feature_map)
from nnunet_rl.rotations import cube_rotations, quarter_turn, rotate_array


def project(conv: torch.nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """The kernel-size-1 Conv1D of eqs. 1-3 and 5 on (C, T) tokens, written as the matrix product it is."""
    return conv.weight @ tokens + conv.bias[:, None]


def naive_cma(cma: CrossModalAttention, primary: torch.Tensor, auxiliary: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-5 window by window, each window cut to its real voxels (so no padding exists to leak)."""
    spatial = primary.shape[2:]
    window = [min(cma.window_size, n) for n in spatial]
    out = torch.empty_like(primary)
    starts = itertools.product(*(range(0, n, w) for n, w in zip(spatial, window)))
    for b, start in itertools.product(range(primary.shape[0]), starts):
        region = (b, slice(None), *(slice(s, s + w) for s, w in zip(start, window)))
        p, a = primary[region].flatten(1), auxiliary[region].flatten(1)
        q, k, v = project(cma.query, p), project(cma.key, a), project(cma.value, a)
        attention = torch.softmax(q.T @ k / math.sqrt(q.shape[0]), dim=-1) @ v.T  # eq. 4: (T, C)
        out[region] = project(cma.out, attention.T).reshape(primary[region].shape)
    return out


@pytest.mark.parametrize("spatial, window_size", [
    ((6, 6), 3), ((5, 7), 3), ((2, 5), 4),                    # 2D: divisible, padded, window larger than an axis
    ((4, 4, 4), 2), ((3, 5, 6), 4), ((5, 3, 4), 2)])          # 3D: the same
def test_cma_equals_a_per_window_loop_over_real_voxels(spatial, window_size):
    torch.manual_seed(0)
    cma = CrossModalAttention(channels=3, dim=len(spatial), window_size=window_size)
    primary, auxiliary = torch.randn(2, 3, *spatial), torch.randn(2, 3, *spatial)
    out = cma(primary, auxiliary)
    assert out.shape == primary.shape
    torch.testing.assert_close(out, naive_cma(cma, primary, auxiliary), atol=1e-5, rtol=1e-5)


def test_cma_gradients_reach_every_parameter_and_both_inputs():
    torch.manual_seed(0)
    cma = CrossModalAttention(channels=4, dim=3, window_size=2)
    primary = torch.randn(1, 4, 3, 4, 5, requires_grad=True)
    auxiliary = torch.randn(1, 4, 3, 4, 5, requires_grad=True)
    cma(primary, auxiliary).square().sum().backward()
    for name, parameter in cma.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert primary.grad.abs().sum() > 0 and auxiliary.grad.abs().sum() > 0


def test_cma_rejects_maps_of_different_shapes():
    cma = CrossModalAttention(channels=2, dim=2, window_size=2)
    with pytest.raises(ValueError, match="one shape"):
        cma(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))


@pytest.mark.parametrize("dim, size", [(3, 5), (3, 4), (2, 5), (2, 4)])
def test_rotations_of_a_cube_equal_rotate_array(dim, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *[size] * dim)
    for matrix in cube_rotations(dim):
        expected = torch.from_numpy(rotate_array(x.numpy(), matrix).copy())
        assert torch.equal(rotate_feature_map(x, matrix), expected)
        torch.testing.assert_close(rotate_by_resampling(x, matrix), expected, atol=1e-5, rtol=1e-5)


def test_quarter_turn_of_an_anisotropic_map_moves_the_coordinate_along_axis_1_to_axis_2():
    coordinate = torch.linspace(-1, 1, 8)[None, None, None, :, None].expand(1, 1, 4, 8, 6)
    rotated = rotate_feature_map(coordinate, quarter_turn(3, 1, 2))
    assert rotated.shape == coordinate.shape
    expected = torch.linspace(-1, 1, 6)[None, None, None, None, :].expand(1, 1, 4, 8, 6)
    torch.testing.assert_close(rotated, expected, atol=1e-5, rtol=0)


def test_a_turn_that_maps_an_anisotropic_grid_onto_itself_is_exact_and_agrees_with_resampling():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 8, 8)
    turn = torch.as_tensor(quarter_turn(3, 1, 2))
    torch.testing.assert_close(rotate_feature_map(x, turn), rotate_by_resampling(x, turn), atol=1e-5, rtol=1e-5)


def test_pose_align_policy():
    pose = PoseAlign(dim=3, k_sel=4, temperature=0.5)
    assert pose.theta.shape == (24,) and pose.rotations.shape == (24, 3, 3)
    assert torch.equal(pose.rotations[0], torch.eye(3, dtype=torch.long))
    torch.testing.assert_close(pose.probabilities().sum(), torch.tensor(1.0))
    torch.testing.assert_close(pose.entropy(), torch.tensor(math.log(24)))
    assert pose.greedy_action().tolist() == [0]
    with torch.no_grad():
        pose.theta.copy_(torch.linspace(-1, 1, 24).roll(5))
    assert pose.greedy_action().tolist() == [4]
    with torch.no_grad():
        pose.theta.zero_()
        pose.theta[[7, 3]] = 1.0
    assert pose.greedy_action().tolist() == [3]


def test_pose_align_log_prob_is_the_sum_of_log_softmax_entries_and_reaches_theta():
    pose = PoseAlign(dim=2, k_sel=3, temperature=2.0)
    with torch.no_grad():
        pose.theta.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    actions = torch.tensor([[0, 2, 2], [3, 1, 0]])
    scaled = [0.25, -0.5, 1.0, 0.0]
    log_norm = math.log(sum(math.exp(s) for s in scaled))
    expected = torch.tensor([sum(scaled[a] - log_norm for a in row) for row in actions.tolist()])
    log_prob = pose.log_prob(actions)
    torch.testing.assert_close(log_prob, expected)
    log_prob.sum().backward()
    assert pose.theta.grad.abs().sum() > 0


def test_pose_align_sampling_is_reproducible_with_a_seeded_generator():
    pose = PoseAlign(dim=3, k_sel=5, temperature=1.0)
    first = pose.sample(torch.Generator().manual_seed(7))
    second = pose.sample(torch.Generator().manual_seed(7))
    assert first.dtype == torch.long and first.shape == (5,) and torch.equal(first, second)
    assert ((first >= 0) & (first < 24)).all()
    with torch.no_grad():
        pose.theta[11] = 100.0
    assert pose.sample(torch.Generator().manual_seed(0)).tolist() == [11] * 5


def test_pose_align_forward_averages_the_chosen_rotations():
    torch.manual_seed(0)
    pose = PoseAlign(dim=3, k_sel=2, temperature=1.0)
    x = torch.randn(1, 2, 3, 3, 3)
    assert torch.equal(pose(x, torch.tensor([0])), x)
    group = cube_rotations(3)
    expected = (rotate_array(x.numpy(), group[5]) + rotate_array(x.numpy(), group[17])) / 2
    torch.testing.assert_close(pose(x, torch.tensor([5, 17])), torch.from_numpy(expected))


def test_feature_similarity():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, 6)
    torch.testing.assert_close(feature_similarity(x, x), torch.ones(2))
    torch.testing.assert_close(feature_similarity(x, -x[:, [2, 0, 3, 1]]), torch.ones(2))  # channel order, sign
    constant = torch.ones(2, 4, 6, 6, 6)
    assert torch.isfinite(feature_similarity(constant, constant)).all()
    assert torch.isfinite(feature_similarity(x, constant)).all()
    rotated = rotate_feature_map(x, quarter_turn(3, 0, 2))
    assert (feature_similarity(x, rotated) < feature_similarity(x, x) - 0.5).all()


def test_rl_xalign_shapes_and_the_fusion_of_eq_7():
    torch.manual_seed(0)
    primary, auxiliary = torch.randn(2, 4, 5, 4, 6), torch.randn(2, 4, 5, 4, 6)
    actions = torch.tensor([0, 3])
    module = RLXAlign(channels=4, dim=3, window_size=3, k_sel=2, temperature=1.0)
    fused, aligned = module(primary, auxiliary, actions)
    assert fused.shape == aligned.shape == primary.shape

    plain = RLXAlign(channels=4, dim=3, window_size=3, k_sel=2, temperature=1.0, fusion_weight=0.3, use_cma=False)
    assert plain.cma is None
    fused, aligned = plain(primary, auxiliary, actions)
    expected_aligned = (auxiliary + rotate_by_resampling(auxiliary, cube_rotations(3)[3])) / 2
    torch.testing.assert_close(aligned, expected_aligned, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, 0.3 * expected_aligned + 0.7 * primary, atol=1e-5, rtol=1e-5)

"""MRL-Seg's rewards and returns (nnunet_rl.mrl_seg): eqs. 3, 4-5, 10, 11-12 against hand-made maps and naive loops."""
import itertools
import math

import pytest
import torch
from torch import nn

from nnunet_rl.mrl_seg import (cross_entropy_reward, difficulty, difficulty_returns, foreground_prior, global_reward,
                               prior_rewards)
from nnunet_rl.voxel_actor_critic import NeighbourReturns

CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


@pytest.mark.parametrize("beta", torch.linspace(0.2, 0.3, 11).tolist())
def test_prior_eq3_peaks_at_a_foreground_background_ratio_in_0447_0548(beta):
    ratios = torch.arange(0.01, 2.0, 1e-4, dtype=torch.float64)
    background = torch.full_like(ratios, 1e4)
    prior = foreground_prior(ratios * background, background, alpha=-0.5, beta=beta)
    peak = ratios[prior.argmax()].item()
    assert 0.447 <= peak <= 0.548
    assert peak == pytest.approx(math.sqrt(beta), abs=1e-4)


def test_global_reward_eq3_on_hand_made_counts():
    rewards = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    foreground, background = torch.tensor([1.0]), torch.tensor([3.0])
    prior = -0.5 * (1 / 3 + 0.25 * 3)
    torch.testing.assert_close(foreground_prior(foreground, background, -0.5, 0.25), torch.tensor([prior]))
    expected = torch.tensor([(10.0 + prior) / 4])
    torch.testing.assert_close(global_reward(rewards, foreground, background, -0.5, 0.25), expected)
    per_voxel = prior_rewards(rewards, foreground, background, -0.5, 0.25)
    assert per_voxel.shape == rewards.shape
    torch.testing.assert_close(per_voxel.mean(dim=(1, 2, 3)), expected)


def test_empty_foreground_or_background_stays_finite():
    rewards = torch.zeros(3, 1, 4, 4, 4)
    foreground, background = torch.tensor([0, 64, 0]), torch.tensor([64, 0, 0])
    prior = foreground_prior(foreground, background, -0.5, 0.25)
    assert torch.isfinite(prior).all()
    torch.testing.assert_close(prior[0], torch.tensor(-0.5 * (1 / 64 + 0.25 * 64)))
    assert torch.isfinite(global_reward(rewards, foreground, background, -0.5, 0.25)).all()
    assert torch.isfinite(prior_rewards(rewards, foreground, background, -0.5, 0.25)).all()
    empty = torch.zeros(3, 4, 4, 4, dtype=torch.long)
    adp = difficulty(empty, window=3)
    assert torch.equal(adp, torch.zeros(3, 1, 4, 4, 4))
    assert torch.isfinite(cross_entropy_reward(torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4), empty)).all()


def test_reward_eq5_on_hand_made_maps():
    # binary: foreground probability p per voxel before and after, as two-class logits [0, log(p / (1 − p))]
    def logits(p):
        p = torch.tensor(p)
        return torch.stack((torch.zeros_like(p), torch.log(p / (1 - p))))[None]

    reference = torch.tensor([[1, 1, 0, 0]])
    previous, current = [0.5, 0.8, 0.2, 0.5], [0.8, 0.5, 0.5, 0.2]
    reward = cross_entropy_reward(logits(previous), logits(current), reference)
    assert reward.shape == (1, 1, 4)
    # eq. 4: −y log p − (1 − y) log(1 − p); eq. 5: P(t−1) − P(t)
    expected = [math.log(0.8 / 0.5), math.log(0.5 / 0.8), math.log(0.5 / 0.8), math.log(0.8 / 0.5)]
    torch.testing.assert_close(reward[0, 0], torch.tensor(expected))


def test_reward_eq5_multiclass_and_masked():
    previous = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]).T)[None]
    current = torch.log(torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]).T)[None]
    reference = torch.tensor([[2, 1, 7]])  # 7: an ignore label, not a class of the logits
    valid = torch.tensor([[[True, True, False]]])
    reward = cross_entropy_reward(previous, current, reference, valid)
    torch.testing.assert_close(reward[0, 0], torch.tensor([math.log(0.8 / 0.3), math.log(0.5 / 0.3), 0.0]))


def naive_difficulty(reference: torch.Tensor, window: int) -> torch.Tensor:
    """Eq. 10 voxel by voxel: among the voxels of the window around i inside the image, i excluded, the fraction
    whose label differs from i's."""
    spatial = reference.shape[1:]
    result = torch.zeros(reference.shape[0], 1, *spatial)
    half = window // 2
    for b in range(reference.shape[0]):
        for i in itertools.product(*map(range, spatial)):
            different = members = 0
            for offset in itertools.product(range(-half, half + 1), repeat=len(spatial)):
                j = tuple(a + o for a, o in zip(i, offset))
                if any(offset) and all(0 <= c < s for c, s in zip(j, spatial)):
                    members += 1
                    different += int(reference[(b, *j)] != reference[(b, *i)])
            result[(b, 0, *i)] = different / members
    return result


@pytest.mark.parametrize("spatial, window", [((6, 7), 3), ((6, 7), 5), ((4, 5, 3), 3), ((5, 4, 6), 5)])
def test_difficulty_eq10_matches_a_loop_over_voxels_and_neighbours(spatial, window):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 3, (2, *spatial), generator=generator)
    reference[1] = 0
    reference[1, 1:3, 2:4] = 2
    adp = difficulty(reference, window)
    torch.testing.assert_close(adp, naive_difficulty(reference, window))
    assert adp.min() >= 0 and adp.max() <= 1


def test_difficulty_is_one_for_a_voxel_unlike_all_its_neighbours():
    reference = torch.zeros(1, 5, 5, dtype=torch.long)
    reference[0, 2, 2] = 1
    adp = difficulty(reference, window=3)
    assert adp[0, 0, 2, 2] == 1
    assert adp[0, 0, 1, 1] == pytest.approx(1 / 8)
    assert adp[0, 0, 0, 0] == 0


@pytest.mark.parametrize("window", [1, 4])
def test_difficulty_refuses_windows_without_a_centre_or_neighbours(window):
    with pytest.raises(ValueError, match="odd and at least 3"):
        difficulty(torch.zeros(1, 4, 4, dtype=torch.long), window)


def naive_difficulty_returns(rewards, bootstrap, adp, weight, gamma):
    """Eqs. 11-12 voxel by voxel: R_i(t) = r_i(t) + γ Σ_{j∈N(i)} w_{i−j} (𝔍_i + R_j(t+1)), N(i) the neighbours of i
    inside the image, w_{i−j} stored at weight[centre + (j − i)] (the convolution's layout)."""
    spatial = bootstrap.shape[2:]
    half = weight.shape[0] // 2
    returns = []
    following = bootstrap
    for reward in reversed(rewards):
        current = reward.clone()
        for b in range(reward.shape[0]):
            for i in itertools.product(*map(range, spatial)):
                total = 0.0
                for offset in itertools.product(range(-half, half + 1), repeat=len(spatial)):
                    j = tuple(a + o for a, o in zip(i, offset))
                    if all(0 <= c < s for c, s in zip(j, spatial)):
                        total += weight[tuple(half + o for o in offset)] * (adp[(b, 0, *i)] + following[(b, 0, *j)])
                current[(b, 0, *i)] += gamma * total
        following = current
        returns.append(current)
    return returns[::-1]


@pytest.mark.parametrize("dim, steps", [(2, 2), (2, 3), (3, 2)])
def test_returns_eqs11_12_match_a_loop_over_voxels_and_neighbours(dim, steps):
    torch.manual_seed(0)
    omega = NeighbourReturns(CONVS[dim], kernel_size=3).omega
    with torch.no_grad():
        omega.weight.normal_()
    shape = (2, 1, *[5, 4, 3][:dim])
    rewards = [torch.randn(shape) for _ in range(steps)]
    bootstrap, adp = torch.randn(shape), torch.rand(shape)
    with torch.no_grad():
        returns = difficulty_returns(rewards, bootstrap, adp, omega, gamma=0.95)
        expected = naive_difficulty_returns(rewards, bootstrap, adp, omega.weight[0, 0], 0.95)
    assert len(returns) == steps
    for actual, wanted in zip(returns, expected):
        torch.testing.assert_close(actual, wanted)


def test_returns_without_adp_are_eq12_as_printed_and_omega_learns_from_them():
    torch.manual_seed(0)
    omega = NeighbourReturns(nn.Conv2d, kernel_size=3).omega
    with torch.no_grad():
        omega.weight.normal_()
    rewards = [torch.randn(1, 1, 6, 6) for _ in range(3)]
    bootstrap = torch.randn(1, 1, 6, 6)
    with torch.no_grad():
        first = difficulty_returns(rewards, bootstrap, torch.zeros(1, 1, 6, 6), omega, 0.95)[0]
        # eq. 12: R(0) = r*(0) + γ w∗r*(1) + γ² w²∗r*(2) + γ³ w³∗V(s(3)), wⁿ∗ the convolution applied n times
        expected = rewards[0] + 0.95 * omega(rewards[1]) + 0.95 ** 2 * omega(omega(rewards[2])) + \
            0.95 ** 3 * omega(omega(omega(bootstrap)))
    torch.testing.assert_close(first, expected)
    returns = difficulty_returns(rewards, bootstrap, torch.rand(1, 1, 6, 6), omega, 0.95)
    returns[0].square().mean().backward()
    assert omega.weight.grad.abs().sum() > 0

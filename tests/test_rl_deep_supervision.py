"""AWSnet's DAS: stock weights, α↔β, cubed reward, moving baseline, REINFORCE gradient and a learning run."""
import math
import os
import warnings

import numpy as np
import pytest
import torch

from helpers import on_two_gloo_ranks

from nnunet_rl.plans.rl_block import DeepSupervisionSettings
from nnunet_rl.rl_deep_supervision import (ACTIONS, DASControllers, DeepSupervisionWeights, MovingBaseline,
                                           alpha_from_beta, beta_from_alpha, cubed_reward, num_controlled,
                                           stock_weights)


def nnunet_weights(num_outputs: int) -> np.ndarray:
    """nnUNetTrainer._build_loss, non-DDP branch, for ``num_outputs`` deep-supervision scales."""
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 0
    return weights / weights.sum()


@pytest.mark.parametrize("num_outputs", [2, 3, 4, 5, 6])
def test_stock_weights_are_nnunets(num_outputs):
    np.testing.assert_allclose(stock_weights(num_outputs), nnunet_weights(num_outputs), rtol=0, atol=1e-15)


def test_one_output_gets_weight_one_where_nnunet_divides_zero_by_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(nnunet_weights(1)).all()
    np.testing.assert_array_equal(stock_weights(1), [1.0])
    assert num_controlled(1) == 1


def test_stock_weights_for_five_outputs_by_hand():
    np.testing.assert_allclose(stock_weights(5), [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])
    assert num_controlled(5) == 4


def test_alpha_beta_roundtrip():
    beta = np.array([0.3, -1.2, 2.0, 0.0])
    alpha = alpha_from_beta(beta)
    assert math.isclose(alpha.sum(), 1.0)
    np.testing.assert_allclose(alpha_from_beta(beta_from_alpha(alpha)), alpha)
    np.testing.assert_allclose(beta_from_alpha(alpha), np.log(alpha))
    np.testing.assert_allclose(beta_from_alpha(alpha) - beta, np.full(4, -np.log(np.exp(beta).sum())))


def test_paper_initial_beta_gives_its_softmax():
    e = math.exp(0.5)
    np.testing.assert_allclose(alpha_from_beta([0.5, 0.5, 0.5, 1.0]),
                               np.array([e, e, e, math.e]) / (3 * e + math.e))


@pytest.mark.parametrize("alpha", [[0.5, 0.5, 0.0], [0.5, 0.4], [-0.5, 1.5]])
def test_beta_refuses_what_is_not_a_positive_distribution(alpha):
    with pytest.raises(ValueError):
        beta_from_alpha(alpha)


@pytest.mark.parametrize("num_outputs", [1, 2, 3, 5, 6])
def test_stock_beta_reproduces_nnunet_on_the_supervised_outputs(num_outputs):
    weights = DeepSupervisionWeights.stock(num_outputs)
    assert weights.num_controlled == num_controlled(num_outputs) == max(num_outputs - 1, 1)
    np.testing.assert_allclose(weights.alpha(), stock_weights(num_outputs)[:weights.num_controlled])
    assert np.all(stock_weights(num_outputs)[weights.num_controlled:] == 0)


def test_cubed_reward():
    assert cubed_reward(0.5) == 0.125
    assert cubed_reward(1.3) == 1.0
    assert cubed_reward(-0.2) == 0.0
    torch.testing.assert_close(cubed_reward(torch.tensor([0.5, 2.0, -1.0])), torch.tensor([0.125, 1.0, 0.0]))
    with pytest.raises(ValueError):
        cubed_reward(float("nan"))
    with pytest.raises(ValueError):
        cubed_reward(torch.tensor([0.5, float("nan")]))


def test_moving_baseline_by_hand():
    baseline = MovingBaseline(gamma=0.1)
    assert baseline.value is None
    assert baseline.update(1.0) == 1.0  # first reward initialises B
    assert math.isclose(baseline.update(0.0), 0.9)  # 1 + 0.1·(0 − 1)
    assert math.isclose(baseline.update(0.5), 0.86)  # 0.9 + 0.1·(0.5 − 0.9)
    restored = MovingBaseline()
    restored.load_state_dict(baseline.state_dict())
    assert (restored.gamma, restored.value) == (0.1, baseline.value)


def controllers_with_probabilities(rows: list[list[float]]) -> DASControllers:
    controllers = DASControllers(len(rows))
    with torch.no_grad():
        controllers.theta.copy_(torch.log(torch.tensor(rows)))
    return controllers


def test_reinforce_gradient_is_onehot_minus_pi_times_minus_advantage():
    controllers = controllers_with_probabilities([[0.25, 0.5, 0.25]])
    controllers.reinforce_loss(torch.tensor([[0]]), torch.tensor([2.0])).backward()
    # (onehot(0) − π)·(−A) = ([1, 0, 0] − [0.25, 0.5, 0.25])·(−2)
    torch.testing.assert_close(controllers.theta.grad, torch.tensor([[-1.5, 1.0, 0.5]]))


def test_reinforce_gradient_averages_over_samples_per_controller():
    controllers = controllers_with_probabilities([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]])
    actions = torch.tensor([[0, 1], [2, 1]])
    controllers.reinforce_loss(actions, torch.tensor([2.0, -1.0])).backward()
    # row 0: ½[(e0 − π)(−2) + (e2 − π)(+1)] = ½[(−1.5, 1, 0.5) + (−0.25, −0.5, 0.75)]
    # row 1: ½[(e1 − π)(−2) + (e1 − π)(+1)] = ½(e1 − π)(−1) = ½(0.5, −0.75, 0.25)
    torch.testing.assert_close(controllers.theta.grad, torch.tensor([[-0.875, 0.25, 0.625],
                                                                     [0.25, -0.375, 0.125]]))


def test_update_centres_the_first_round_and_moves_towards_rewarded_actions():
    controllers = controllers_with_probabilities([[1 / 3, 1 / 3, 1 / 3]])
    baseline = MovingBaseline()
    stats = controllers.update(torch.tensor([[0], [2]]), [0.2, 0.4], baseline)
    assert math.isclose(stats["baseline"], 0.3) and math.isclose(stats["reward_mean"], 0.3)
    assert abs(stats["advantage_mean"]) < 1e-12
    assert len(stats["entropies"]) == 1
    pi = controllers.probabilities()[0]
    assert pi[2] > pi[1] > pi[0]


def test_initial_controllers_are_near_uniform_and_sample_valid_actions():
    controllers = DASControllers(4, seed=3)
    assert controllers.theta.abs().max() < 0.01
    torch.testing.assert_close(controllers.entropies(), torch.full((4,), math.log(3)), atol=1e-5, rtol=0)
    actions = controllers.sample(10)
    assert actions.shape == (10, 4) and actions.dtype == torch.long
    assert set(controllers.delta_beta(actions).unique().tolist()) <= set(ACTIONS)


def toy_probability_of_lowering(seed: int, lr: float, arm: str = "learner") -> float:
    """π(Δβ = −0.15) of output 2's controller after 40 DAS rounds of K = 10 candidates on a toy reward:
    Dice = 0.9 − 0.5·α_2 + N(0, 0.01²) (output 2's weight hurts; the noise is as large as the candidates' spread).
    ``arm``: "learner"; "shuffled" (rewards permuted across the round's candidates); "frozen" (random search)."""
    weights = DeepSupervisionWeights.stock(5)
    controllers = DASControllers(weights.num_controlled, lr=lr, init_std=PLANS.init_std, seed=seed)
    baseline, noise = MovingBaseline(PLANS.baseline_gamma), np.random.default_rng(seed)
    for _ in range(40):
        actions, betas = weights.candidates(controllers, k=PLANS.candidates)
        rewards = np.array([cubed_reward(0.9 - 0.5 * alpha_from_beta(beta)[2] + noise.normal(0, 0.01))
                            for beta in betas])
        if arm == "shuffled":
            rewards = noise.permutation(rewards)
        if arm != "frozen":
            controllers.update(actions, rewards, baseline)
        weights.keep(betas[int(np.argmax(rewards))])
    return controllers.probabilities()[2, ACTIONS.index(-0.15)].item()


PLANS = DeepSupervisionSettings()


def test_the_papers_learning_rate_barely_moves_the_policy():
    """Why the plans' lr differs from the paper's 1e-3: Adam moves θ by about lr a round, so in 40 rounds π cannot
    leave the neighbourhood of 1/3 however clear the reward (the plans' lr on this toy: docs/rl_deep_supervision.md)."""
    assert all(toy_probability_of_lowering(seed, 1e-3) < 0.4 for seed in (0, 1, 2))


def test_state_dicts_resume_the_same_samples():
    weights = DeepSupervisionWeights.stock(4)
    controllers, baseline = DASControllers(weights.num_controlled, seed=7), MovingBaseline()
    actions, betas = weights.candidates(controllers, k=5)
    controllers.update(actions, [cubed_reward(0.5 + 0.1 * i) for i in range(5)], baseline)
    weights.keep(betas[0])
    saved = (weights.state_dict(), controllers.state_dict(), baseline.state_dict())

    resumed_weights = DeepSupervisionWeights([0.0] * weights.num_controlled)
    resumed, resumed_baseline = DASControllers(weights.num_controlled, seed=99), MovingBaseline()
    resumed_weights.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    resumed_baseline.load_state_dict(saved[2])

    next_actions, next_betas = weights.candidates(controllers, k=5)
    resumed_actions, resumed_betas = resumed_weights.candidates(resumed, k=5)
    torch.testing.assert_close(resumed_actions, next_actions)
    np.testing.assert_array_equal(resumed_betas, next_betas)
    rewards = [0.3, 0.1, 0.5, 0.2, 0.4]
    controllers.update(next_actions, rewards, baseline)
    resumed.update(resumed_actions, rewards, resumed_baseline)
    torch.testing.assert_close(resumed.theta, controllers.theta)  # Adam's moments came along


def das_rank(rank: int, folder: str) -> None:
    """One rank: its own validation Dice per candidate, averaged over ranks before the rewards, three rounds."""
    from nnunet_rl.distributed import mean_across_ranks
    weights, controllers, baseline = DeepSupervisionWeights.stock(4), DASControllers(3, lr=0.05), MovingBaseline()
    own = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        actions, betas = weights.candidates(controllers, 4)
        dice = mean_across_ranks(torch.rand(4, generator=own, dtype=torch.float64))
        rewards = [cubed_reward(float(d)) for d in dice]
        controllers.update(actions, rewards, baseline)
        weights.keep(betas[int(np.argmax(rewards))])
    torch.save({"theta": controllers.theta.detach(), "beta": torch.tensor(weights.beta)},
               os.path.join(folder, f"rank{rank}.pt"))


def test_two_gloo_ranks_keep_identical_controllers_and_weights(tmp_path):
    rank0, rank1 = on_two_gloo_ranks(das_rank, tmp_path)
    torch.testing.assert_close(rank0["theta"], rank1["theta"], rtol=0, atol=0)
    torch.testing.assert_close(rank0["beta"], rank1["beta"], rtol=0, atol=0)
    assert not torch.allclose(rank0["beta"], torch.tensor(DeepSupervisionWeights.stock(4).beta))

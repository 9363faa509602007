"""RL-U2Net's PPO (eqs. 10-13, Algorithm 1): the loss by hand, the critic, a bandit, resuming, two DDP ranks."""
import copy
import math
import os

import pytest
import torch
from torch import nn

from helpers import on_two_gloo_ranks

from nnunet_rl.distributed import mean_across_ranks
from nnunet_rl.plans.rl_block import paper_defaults
from nnunet_rl.ppo import (Critic, PPOAgent, RolloutBuffer, Transition, normalise_advantages, policy_loss,
                           rollout_iterations)

ACTIONS, BEST = 24, 7


class SoftmaxPolicy(nn.Module):
    """PoseAlign's policy interface without the rotations: π = softmax(θ/τ), k_sel actions per sample."""

    def __init__(self, actions: int = ACTIONS, tau: float = 1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(actions))
        self.tau = tau

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.theta / self.tau, dim=0)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.theta / self.tau, dim=0)[actions].sum(-1)

    def entropy(self) -> torch.Tensor:
        p = self.probabilities()
        return -(p * torch.log(p)).sum()

    def sample(self, n: int, k_sel: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.probabilities().detach().expand(n, -1), k_sel, generator=generator)


def bandit_round(policy: SoftmaxPolicy, buffer: RolloutBuffer, generator: torch.Generator, n: int) -> None:
    """n transitions with random states; reward 1 for action BEST, 0 otherwise, plus noise of std 0.01."""
    actions = policy.sample(n, 1, generator)
    with torch.no_grad():
        log_prob = policy.log_prob(actions)
    reward = (actions[:, 0] == BEST).float() + 0.01 * torch.randn(n, generator=generator)
    buffer.add(Transition(torch.rand(n, 3, generator=generator), torch.rand(n, 3, generator=generator), actions,
                          log_prob, reward))


def filled_buffer(n: int = 16, k_sel: int = 2, seed: int = 0) -> RolloutBuffer:
    generator = torch.Generator().manual_seed(seed)
    buffer = RolloutBuffer(n, k_sel)
    buffer.add(Transition(torch.rand(n, 3, generator=generator), torch.rand(n, 3, generator=generator),
               torch.randint(ACTIONS, (n, k_sel), generator=generator), torch.full((n,), -2 * math.log(ACTIONS)),
               torch.rand(n, generator=generator)))
    return buffer


def test_policy_loss_matches_the_clipped_surrogate_by_hand():
    log_prob_old = torch.tensor([0.0, 0.0, 0.0])
    log_prob_new = torch.log(torch.tensor([1.5, 0.9, 0.5]))  # ratios 1.5, 0.9, 0.5
    advantages = torch.tensor([2.0, -1.0, 1.0])
    # min(1.5·2, 1.2·2) = 2.4 (clipped); min(0.9·−1, 0.9·−1) = −0.9; min(0.5·1, 0.8·1) = 0.5
    expected = -(2.4 - 0.9 + 0.5) / 3
    loss = policy_loss(log_prob_new, log_prob_old, advantages, clip=0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_policy_loss_gradient_vanishes_where_clipped():
    log_prob_new = torch.log(torch.tensor([1.5, 0.9])).requires_grad_()
    policy_loss(log_prob_new, torch.zeros(2), torch.tensor([2.0, -1.0]), clip=0.2).backward()
    assert log_prob_new.grad[0] == 0 and log_prob_new.grad[1] != 0


def test_normalise_advantages():
    normalised = normalise_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    torch.testing.assert_close(normalised, (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3) / math.sqrt(14 / 3))
    assert normalised.mean().abs() < 1e-6 and normalised.std().item() == pytest.approx(1, abs=1e-6)
    torch.testing.assert_close(normalise_advantages(torch.tensor([5.0])), torch.tensor([5.0]))
    assert torch.isfinite(normalise_advantages(torch.ones(4))).all()


def test_critic_maps_states_to_one_value_each():
    assert Critic()(torch.rand(5, 3)).shape == (5,)


def test_critic_learns_a_constant_reward():
    torch.manual_seed(0)
    agent = PPOAgent(SoftmaxPolicy(), value_lr=1e-2, gamma=0.0, ppo_epochs=20)
    buffer = filled_buffer()
    buffer.reward.fill_(0.7)
    first = agent.update(buffer)["value_loss"]
    for _ in range(4):
        last = agent.update(buffer)["value_loss"]
    assert last < first / 10
    assert agent.critic(torch.rand(8, 3)).sub(0.7).abs().max() < 0.1


def test_bandit_learns_the_rewarded_action():
    """24 actions, reward 1 for action 7: defaults except policy lr 0.05 (the paper's 5e-5 is for a network
    whose reward moves slowly); 40 rounds of 16 samples."""
    torch.manual_seed(0)
    policy = SoftmaxPolicy()
    agent = PPOAgent(policy, policy_lr=0.05)
    buffer, generator = RolloutBuffer(16, 1), torch.Generator().manual_seed(1)
    rewards = []
    for _ in range(40):
        bandit_round(policy, buffer, generator, 16)
        rewards.append(agent.update(buffer)["mean_reward"])
        buffer.clear()
    assert policy.probabilities()[BEST] >= 0.5
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5


def test_update_reports_familiar_diagnostics():
    stats = PPOAgent(SoftmaxPolicy(), ppo_epochs=2, minibatch=5).update(filled_buffer())
    assert set(stats) == {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "mean_reward"}
    assert all(math.isfinite(value) for value in stats.values())
    assert stats["entropy"] == pytest.approx(math.log(ACTIONS), abs=1e-2)


def test_buffer_add_len_full_clear():
    buffer = RolloutBuffer(3, 2)
    buffer.add(Transition(torch.rand(3), torch.rand(3), torch.tensor([1, 2]), torch.tensor(-1.0), torch.tensor(0.5)))
    assert len(buffer) == 1 and not buffer.full
    buffer.add(Transition(torch.rand(2, 3), torch.rand(2, 3), torch.tensor([[3, 4], [5, 6]]), torch.zeros(2),
                          torch.ones(2)))
    assert len(buffer) == 3 and buffer.full
    assert buffer.actions.tolist() == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="cannot add"):
        buffer.add(Transition(torch.rand(3), torch.rand(3), torch.tensor([1, 2]), torch.tensor(-1.0),
                              torch.tensor(0.5)))
    buffer.clear()
    assert len(buffer) == 0


def test_buffer_state_dict_roundtrip_continues_at_the_same_position():
    buffer = RolloutBuffer(4, 2)
    buffer.add(Transition(torch.rand(2, 3), torch.rand(2, 3), torch.tensor([[1, 2], [3, 4]]), torch.zeros(2),
                          torch.ones(2)))
    resumed = RolloutBuffer(4, 2)
    resumed.load_state_dict(buffer.state_dict())
    assert len(resumed) == 2
    for b in (buffer, resumed):
        b.add(Transition(torch.ones(3), torch.ones(3), torch.tensor([5, 6]), torch.tensor(-3.0), torch.tensor(2.0)))
    for name in Transition._fields:
        torch.testing.assert_close(getattr(resumed, name), getattr(buffer, name))
    assert len(resumed) == 3 and resumed.actions[2].tolist() == [5, 6]
    with pytest.raises(ValueError, match="cannot be loaded"):
        RolloutBuffer(4, 1).load_state_dict(buffer.state_dict())


def test_agent_state_dict_roundtrip_makes_the_next_update_identical():
    torch.manual_seed(0)
    buffer = filled_buffer(n=10)
    policy = SoftmaxPolicy()
    agent = PPOAgent(policy, policy_lr=0.01, ppo_epochs=2, minibatch=4)
    agent.update(buffer)  # Adam moments and the generator are no longer at their start
    saved_agent, saved_policy = copy.deepcopy(agent.state_dict()), copy.deepcopy(policy.state_dict())  # as torch.save
    expected = agent.update(buffer)

    resumed_policy = SoftmaxPolicy()
    resumed_policy.load_state_dict(saved_policy)
    resumed = PPOAgent(resumed_policy, policy_lr=0.01, ppo_epochs=2, minibatch=4, seed=123)
    resumed.load_state_dict(saved_agent)
    assert resumed.update(buffer) == expected
    torch.testing.assert_close(resumed_policy.theta, policy.theta, rtol=0, atol=0)
    for resumed_param, param in zip(resumed.critic.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(resumed_param, param, rtol=0, atol=0)


def test_buffer_hands_out_named_shuffled_minibatches_covering_every_transition():
    buffer = filled_buffer(n=10)
    batches = list(buffer.get(4, torch.Generator().manual_seed(0)))
    assert [len(b.reward) for b in batches] == [4, 4, 2] and all(isinstance(b, Transition) for b in batches)
    assert sorted(torch.cat([b.reward for b in batches]).tolist()) == sorted(buffer.reward.tolist())
    first = batches[0]
    row = int((buffer.reward == first.reward[0]).nonzero())
    assert torch.equal(first.state[0], buffer.state[row]) and torch.equal(first.actions[0], buffer.actions[row])


def test_agent_defaults_are_the_plans_defaults():
    """One source of truth: PPOAgent's defaults (γ = 0 included) are the rl block's rl_u2net values."""
    import inspect
    from nnunet_rl import ppo
    defaults = {name: p.default for name, p in inspect.signature(PPOAgent).parameters.items()
                if p.default is not inspect.Parameter.empty and name != "seed"}
    assert defaults == {name: paper_defaults("rl_u2net")[name] for name in defaults}
    assert defaults["gamma"] == 0.0
    assert "γ = 0" in ppo.__doc__ and "0.99" not in ppo.__doc__


@pytest.mark.parametrize("iterations, samples, expected", [(250, 16, 16), (8, 8, 8), (4, 16, 4), (1000, 16, 16)])
def test_rollout_iterations_take_exactly_the_planned_samples_per_epoch(iterations, samples, expected):
    chosen = rollout_iterations(iterations, samples)
    assert len(chosen) == expected and min(chosen) == 0 and max(chosen) < iterations
    gaps = {b - a for a, b in zip(sorted(chosen), sorted(chosen)[1:])}
    assert gaps <= {iterations // samples, -(-iterations // samples)} or iterations < samples


def test_non_finite_rewards_and_states_are_refused():
    buffer = RolloutBuffer(4, 1)
    with pytest.raises(ValueError, match="reward"):
        buffer.add(Transition(torch.rand(3), torch.rand(3), torch.tensor([0]), torch.tensor(-1.0),
                              torch.tensor(math.nan)))
    with pytest.raises(ValueError, match="next_state"):
        buffer.add(Transition(torch.rand(3), torch.tensor([0.0, math.inf, 0.0]), torch.tensor([0]), torch.tensor(-1.0),
                   torch.tensor(1.0)))
    assert len(buffer) == 0
    loaded = filled_buffer()
    loaded.reward[3] = math.nan  # e.g. a checkpoint written before the guard
    with pytest.raises(ValueError, match="reward"):
        PPOAgent(SoftmaxPolicy()).update(loaded)
    with pytest.raises(ValueError, match="empty"):
        PPOAgent(SoftmaxPolicy()).update(RolloutBuffer(4, 1))


def test_mean_across_ranks_is_the_identity_without_a_process_group():
    tensor = torch.tensor([1.0, 2.0])
    assert mean_across_ranks(tensor) is tensor


def test_the_seed_not_the_global_random_state_sets_the_critic():
    torch.manual_seed(1)
    first = PPOAgent(SoftmaxPolicy(), seed=3).critic.state_dict()
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = PPOAgent(SoftmaxPolicy(), seed=3).critic.state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left as it was
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = PPOAgent(SoftmaxPolicy(), seed=4).critic.state_dict()
    assert not all(torch.equal(first[name], other[name]) for name in first)


def ddp_rank(rank: int, folder: str) -> None:
    """One rank: a different global random state, different rewards (averaged), one update."""
    torch.manual_seed(rank)  # the ranks' global random streams differ (nnU-Net does not seed its ranks) ...
    policy = SoftmaxPolicy()  # ... θ starts at zeros, as PoseAlign's (and DDP broadcasts the network's parameters)
    agent = PPOAgent(policy, policy_lr=0.01, ppo_epochs=3, minibatch=4, seed=0)  # ... the critic from the seed
    generator = torch.Generator().manual_seed(42)  # same states and actions on both ranks
    buffer = RolloutBuffer(8, 2)
    actions = policy.sample(8, 2, generator)
    with torch.no_grad():
        log_prob = policy.log_prob(actions)
    own_reward = torch.rand(8, generator=generator) + rank  # the ranks' rewards differ
    buffer.add(Transition(torch.rand(8, 3, generator=generator), torch.rand(8, 3, generator=generator), actions,
                          log_prob, mean_across_ranks(own_reward)))
    agent.update(buffer)
    torch.save({"reward": own_reward, "theta": policy.theta.detach(), "critic": agent.critic.state_dict()},
               os.path.join(folder, f"rank{rank}.pt"))


def test_two_gloo_ranks_end_with_identical_policy_and_critic(tmp_path):
    rank0, rank1 = on_two_gloo_ranks(ddp_rank, tmp_path)
    assert not torch.equal(rank0["reward"], rank1["reward"])
    torch.testing.assert_close(rank0["theta"], rank1["theta"], rtol=0, atol=0)
    for name, value in rank0["critic"].items():
        torch.testing.assert_close(value, rank1["critic"][name], rtol=0, atol=0)
    assert not torch.equal(rank0["theta"], torch.zeros(ACTIONS))

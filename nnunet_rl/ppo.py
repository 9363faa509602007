"""PPO for RL-XAlign's PoseAlign policy.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), eqs. 8-13 and Algorithm 1; PPO itself: J. Schulman et al.,
"Proximal Policy Optimization Algorithms", arXiv:1707.06347.

A rollout sample is one :class:`Transition` ``(s, s', a, log π_old(a), r)``: ``s`` the state with PoseAlign disabled,
``s'`` the state with it enabled, both ``[1 − L_Dice, S_similarity, epoch / E]`` (eq. 8), ``r = (1 − L_Dice) +
S_similarity`` (eq. 9). The critic is a small MLP ``V(s)``; the update runs ``ppo_epochs`` mini-epochs over the
shuffled mini-batches :meth:`RolloutBuffer.get` yields:

    V̂ = r + γ·V(s')                                       (eq. 13, V(s') detached)
    A = V̂ − V(s), normalised to mean 0, std 1              (eq. 10)
    L_policy = −mean(min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)),  ρ = exp(log π_new − log π_old)   (eq. 11)
    L_value = mean((V(s) − V̂)²)                           (eq. 12)

The policy is any module with ``log_prob(actions) -> (N,)`` and ``entropy() -> scalar`` (PoseAlign: a state-free
softmax over the 24 cube rotations); the paper has no entropy bonus, so entropy is only reported. Defaults are the
plans' (``nnunet_rl.plans.rl_block``): the paper's value lr 2e-4, 10 mini-epochs and mini-batch 64; policy lr 1e-3,
not the paper's 5e-5, with which the policy cannot leave uniform within a default run (docs/rl_u2net.md); ε and γ are
not given there, so ε = 0.2 (PPO's usual value) and γ = 0: a sample is a one-step episode (its s' is not the
state the next action is taken from), so nothing is bootstrapped and A = r − V(s).
"""
from typing import Iterator, NamedTuple

import torch
from torch import nn

STATE_DIM = 3  # eq. 8: [1 − L_Dice, S_similarity, epoch / E]


class Transition(NamedTuple):
    """One rollout sample of Algorithm 1 (lines 5-14), or a batch of them along a leading dimension N.

    ``state``/``next_state``: (3,) or (N, 3) (eq. 8); ``actions``: the k_sel rotation indices, (k_sel,) or
    (N, k_sel); ``log_prob_old``: log π_old of those actions and ``reward`` (eq. 9): scalars or (N,).
    :meth:`RolloutBuffer.get` yields mini-batches of this type, as Stable-Baselines3's ``RolloutBufferSamples``.
    """
    state: torch.Tensor
    next_state: torch.Tensor
    actions: torch.Tensor
    log_prob_old: torch.Tensor
    reward: torch.Tensor


FLOAT_FIELDS = ("state", "next_state", "log_prob_old", "reward")  # the fields that must stay finite


def state_vector(dice: float, similarity: float, progress: float) -> torch.Tensor:
    """The PPO state of eq. 8, [1 − L_Dice, S_similarity, epoch / E], from the branch's soft Dice (= 1 − L_Dice)."""
    return torch.tensor([dice, similarity, progress])


def rollout_iterations(iterations: int, samples: int) -> frozenset[int]:
    """The iterations of an epoch on which a rollout sample is taken: ``samples`` of them spread evenly over
    ``iterations`` (iteration ⌊i·iterations/samples⌋ for i < samples), every iteration when the epoch is shorter."""
    return frozenset(i * iterations // samples for i in range(samples))


def normalise_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages shifted to mean 0 and scaled to std 1 (eq. 10, "standardized"); one sample is returned as is."""
    if advantages.numel() < 2:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def policy_loss(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
                clip: float) -> torch.Tensor:
    """The clipped surrogate −mean(min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)), ρ = exp(log π_new − log π_old) (eq. 11)."""
    ratio = torch.exp(log_prob_new - log_prob_old)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError if ``tensor`` holds NaN or ±inf: one bad reward would poison both networks."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"PPO {name} must be finite: {bad} of {tensor.numel()} values are NaN or inf")


class Critic(nn.Module):
    """V_φ(s): Linear-Tanh-Linear-Tanh-Linear on the state vector; ``(N, state_dim) -> (N,)``."""

    def __init__(self, state_dim: int = STATE_DIM, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state).squeeze(-1)


class RolloutBuffer:
    """Preallocated storage for ``capacity`` transitions (Algorithm 1, lines 1-14), on the CPU.

    ``add`` takes a :class:`Transition` (one sample or a batch); ``get`` yields shuffled mini-batches of them. The
    write position is part of ``state_dict`` so a resumed run continues exactly.
    """

    def __init__(self, capacity: int, k_sel: int, state_dim: int = STATE_DIM):
        self.capacity, self.k_sel, self.size = capacity, k_sel, 0
        self.state = torch.zeros(capacity, state_dim)
        self.next_state = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, k_sel, dtype=torch.long)
        self.log_prob_old = torch.zeros(capacity)
        self.reward = torch.zeros(capacity)

    def add(self, transition: Transition) -> None:
        state_dim = self.state.shape[1]
        rows = {"state": transition.state.detach().reshape(-1, state_dim),
                "next_state": transition.next_state.detach().reshape(-1, state_dim),
                "actions": transition.actions.detach().reshape(-1, self.k_sel),
                "log_prob_old": transition.log_prob_old.detach().reshape(-1),
                "reward": torch.as_tensor(transition.reward).detach().reshape(-1)}
        n = rows["state"].shape[0]
        sizes = {name: value.shape[0] for name, value in rows.items()}
        if set(sizes.values()) != {n}:
            raise ValueError(f"transition parts disagree on the number of transitions: {sizes}")
        if self.size + n > self.capacity:
            raise ValueError(f"buffer holds {self.size} of {self.capacity} transitions, cannot add {n}")
        for name in FLOAT_FIELDS:
            require_finite(name, rows[name])
        for name, value in rows.items():
            getattr(self, name)[self.size:self.size + n] = value.to("cpu")
        self.size += n

    def __len__(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def clear(self) -> None:
        """Start a new round; the storage is overwritten, not reallocated."""
        self.size = 0

    def get(self, batch_size: int, generator: torch.Generator) -> Iterator[Transition]:
        """The stored transitions in an order drawn from ``generator``, as mini-batches of ``batch_size`` (the last
        one may be smaller)."""
        order = torch.randperm(self.size, generator=generator)
        for start in range(0, self.size, batch_size):
            index = order[start:start + batch_size]
            yield Transition(*(getattr(self, name)[index] for name in Transition._fields))

    def state_dict(self) -> dict:
        return {"size": self.size} | {name: getattr(self, name).clone() for name in Transition._fields}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["actions"].shape != self.actions.shape:
            raise ValueError(f"buffer of shape {tuple(state_dict['actions'].shape)} (capacity, k_sel) cannot be loaded "
                             f"into one of shape {tuple(self.actions.shape)}")
        for name in Transition._fields:
            getattr(self, name).copy_(state_dict[name])
        self.size = int(state_dict["size"])


class PPOAgent:
    """The critic, one Adam optimiser for the policy and one for the critic, and the PPO update (Algorithm 1).

    ``update(buffer)`` runs lines 17-31 and returns the mean statistics of its mini-batches; the caller clears the
    buffer for the next round. The policy's own parameters are saved with the network that holds it; this
    agent's ``state_dict`` holds the critic, both optimisers and the shuffling generator. The critic's initial
    weights and the shuffling come from ``seed``, so under DDP agents with one seed start identical on every rank;
    they stay identical when every rank updates on the same buffer (``nnunet_rl.distributed.mean_across_ranks``
    before ``add``) from the same initial policy.
    """

    def __init__(self, policy: nn.Module, policy_lr: float = 1e-3, value_lr: float = 2e-4, clip: float = 0.2,
                 gamma: float = 0.0, ppo_epochs: int = 10, minibatch: int = 64, seed: int = 0):
        self.policy = policy
        with torch.random.fork_rng(devices=[]):  # the critic's initial weights from the seed: equal on every rank
            torch.manual_seed(seed)
            self.critic = Critic()
        self.clip, self.gamma, self.ppo_epochs, self.minibatch = clip, gamma, ppo_epochs, minibatch
        self.policy_optimizer = torch.optim.Adam(policy.parameters(), lr=policy_lr)
        self.value_optimizer = torch.optim.Adam(self.critic.parameters(), lr=value_lr)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        """``ppo_epochs`` passes over the buffer in shuffled mini-batches, each one step of both optimisers.

        Returns the means over mini-batches of ``policy_loss`` (eq. 11), ``value_loss`` (eq. 12), ``entropy`` of
        the policy, ``approx_kl`` and ``clip_fraction`` (as Stable-Baselines3 logs them), and ``mean_reward``.
        """
        n = len(buffer)
        if n == 0:
            raise ValueError("PPO update on an empty buffer")
        for name in FLOAT_FIELDS:
            require_finite(name, getattr(buffer, name)[:n])
        critic_device = next(self.critic.parameters()).device
        policy_device = next(self.policy.parameters()).device
        size = min(self.minibatch, n)
        totals = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"), 0.0)
        steps = 0
        for _ in range(self.ppo_epochs):
            for batch in buffer.get(size, self.generator):
                value_now = self.critic(batch.state.to(critic_device))
                with torch.no_grad():
                    target = batch.reward.to(critic_device) + \
                        self.gamma * self.critic(batch.next_state.to(critic_device))  # eq. 13
                advantages = normalise_advantages(target - value_now.detach()).to(policy_device)  # eq. 10
                log_prob_new = self.policy.log_prob(batch.actions.to(policy_device))
                log_prob_old = batch.log_prob_old.to(policy_device)
                actor_loss = policy_loss(log_prob_new, log_prob_old, advantages, self.clip)
                value_loss = torch.mean((value_now - target) ** 2)  # eq. 12
                self.policy_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()
                self.policy_optimizer.step()
                self.value_optimizer.zero_grad(set_to_none=True)
                value_loss.backward()
                self.value_optimizer.step()
                with torch.no_grad():
                    log_ratio = log_prob_new - log_prob_old
                    totals["policy_loss"] += actor_loss.item()
                    totals["value_loss"] += value_loss.item()
                    totals["entropy"] += self.policy.entropy().item()
                    totals["approx_kl"] += torch.mean(torch.expm1(log_ratio) - log_ratio).item()
                    totals["clip_fraction"] += torch.mean(((log_ratio.exp() - 1).abs() > self.clip).float()).item()
                steps += 1
        stats = {key: value / steps for key, value in totals.items()}
        stats["mean_reward"] = buffer.reward[:n].mean().item()
        return stats

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "policy_optimizer": self.policy_optimizer.state_dict(),
                "value_optimizer": self.value_optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.critic.load_state_dict(state_dict["critic"])
        self.policy_optimizer.load_state_dict(state_dict["policy_optimizer"])
        self.value_optimizer.load_state_dict(state_dict["value_optimizer"])
        self.generator.set_state(state_dict["generator"])

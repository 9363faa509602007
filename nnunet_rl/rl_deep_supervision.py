"""AWSnet's deep auto-weighted supervision (DAS): deep-supervision weights learned by REINFORCE.

Wang et al., "AWSnet: An auto-weighted supervision attention network for myocardial scar and edema segmentation in
multi-sequence cardiac magnetic resonance images", Medical Image Analysis 77 (2022) 102362,
doi:10.1016/j.media.2022.102362, DAS section and Fig. 4. The deep-supervision loss is Σ_l α_l·L_l with
α = softmax(β). One controller per supervised output holds three logits θ_l; softmax(θ_l) is its policy over
the additive actions Δβ_l ∈ {−0.15, 0, +0.15}. Each round (bilevel, Fig. 4):

1. sample K joint actions, giving K candidate weightings β + Δβ_k (:meth:`DeepSupervisionWeights.candidates`);
2. the trainer trains K copies of the network one epoch each and scores them on held-out reward cases;
3. reward R_k = Dice_k³ (Eq. 7, :func:`cubed_reward`);
4. REINFORCE with a moving baseline (Eqs. 6 and 8): θ ← θ + η·(1/K)·Σ_k (R_k − B_t)·∇_θ log g(β_k), with
   g(β_k) = Π_l π_l(a_{k,l}) since the controllers are independent (:meth:`DASControllers.update`);
5. keep the best candidate's β (and network) for the next round (:meth:`DeepSupervisionWeights.keep`).

Only this library part lives here; the trainer that copies networks and runs epochs uses it. Where the
paper's text is vague (its equations are garbled in our copy) we follow the authors' code,
github.com/soleilssss/AWSnet, ``ASAN_training/pure_training.py`` (branch ``master``), and say so.

Output order: nnU-Net lists deep-supervision outputs fine→coarse (index 0 = full resolution); all arrays
here use that order. The paper lists them coarse→fine: its initial β = [0.5, 0.5, 0.5, 1] (4 outputs) is
[1, 0.5, 0.5, 0.5] in our order. We start instead from nnU-Net's own weights (:meth:`DeepSupervisionWeights.stock`).
"""
import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

ACTIONS = (-0.15, 0.0, +0.15)
"""Δβ of one controller, indexed by the action index (DAS section; the code's ``delta * (sample - 1)``)."""
MIN_REWARD_SPREAD = 1e-12
"""Below this spread of a round's rewards the advantages are not standardised (float64 ties, not a preference)."""


def stock_weights(num_outputs: int) -> np.ndarray:
    """nnU-Net's deep-supervision weights, as ``nnUNetTrainer._build_loss`` computes them (non-DDP).

    w_i = 1/2^i (i = 0 the full-resolution output), the lowest-resolution output set to 0, normalised to
    sum 1. With a single output nnU-Net's recipe gives 0/0; we return [1.0] (no deep supervision).
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if num_outputs == 1:
        return np.ones(1)
    weights = np.array([1 / 2 ** i for i in range(num_outputs)])
    weights[-1] = 0
    return weights / weights.sum()


def num_controlled(num_outputs: int) -> int:
    """How many outputs DAS weighs: those nnU-Net supervises, i.e. all but the zero-weight lowest one.

    nnU-Net gives its lowest-resolution output weight 0, which softmax cannot produce; DAS therefore controls only the
    supervised outputs, and the trainer keeps that output's stock weight (see :func:`stock_weights`).
    """
    return int(np.count_nonzero(stock_weights(num_outputs)))


def alpha_from_beta(beta: np.ndarray) -> np.ndarray:
    """α = softmax(β) (DAS section): the loss weights, positive and summing to 1."""
    beta = np.asarray(beta, dtype=np.float64)
    exp = np.exp(beta - beta.max())
    return exp / exp.sum()


def beta_from_alpha(alpha: np.ndarray) -> np.ndarray:
    """β = log α, the inverse of :func:`alpha_from_beta`.

    softmax is invariant to adding a constant to β; of all β with softmax(β) = α we return the one with
    Σ exp(β) = 1, i.e. log α. α must be a distribution with every entry > 0: a zero weight has no β
    (that is why nnU-Net's zero-weight output is left out of DAS, see :func:`num_controlled`).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    if np.any(alpha <= 0) or not math.isclose(alpha.sum(), 1.0, rel_tol=1e-9):
        raise ValueError(f"alpha must be positive and sum to 1, got {alpha}")
    return np.log(alpha)


def cubed_reward(dice: float | torch.Tensor) -> float | torch.Tensor:
    """R = Dice³ (Eq. 7): the cube sharpens the differences between candidates near the top.

    Dice is clamped to [0, 1]; NaN (e.g. a validation Dice over empty classes) is refused with ValueError,
    the trainer decides how to aggregate such classes. The authors' code uses (Dice + 0.04)³; we follow
    the paper.
    """
    if isinstance(dice, torch.Tensor):
        if torch.isnan(dice).any():
            raise ValueError("Dice is NaN")
        return dice.clamp(0.0, 1.0) ** 3
    dice = float(dice)
    if math.isnan(dice):
        raise ValueError("Dice is NaN")
    return min(max(dice, 0.0), 1.0) ** 3


class MovingBaseline:
    """The reward baseline B_t of Eq. 8 as the authors' code applies it: B_t = B_{t−1} + γ·(r_t − B_{t−1}), r_t a
    round's mean reward; the first round sets B to r. The paper's γ is 0.99; the plans default to γ = 1, the round's
    own mean (its K candidates are scored from the same state): with 0.99 the 1 % lag behind a Dice that rises from
    round to round outweighs the spread of the candidates' rewards and gives them all advantages of one sign.

    Read as B_t = γ·B_{t−1} + (1 − γ)·r_t instead (γ weighting the old value), the baseline lags rewards that rise from
    round to round, every advantage comes out positive and the controllers learn from sampling noise (measured in
    docs/rl_deep_supervision.md, "Baseline").
    """

    def __init__(self, gamma: float = 0.99):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        self.gamma = gamma
        self.value: float | None = None

    def update(self, reward: float) -> float:
        """Fold ``reward`` into B and return the new B."""
        reward = float(reward)
        self.value = reward if self.value is None else self.value + self.gamma * (reward - self.value)
        return self.value

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.value = state["gamma"], state["value"]


class DASControllers:
    """The L independent DAS controllers: θ ∈ R^{L×3}, π_l = softmax(θ_l) over :data:`ACTIONS`.

    θ starts at N(0, ``init_std``) (DAS section: "Gaussian with a variance of 0.001"; the code uses it
    as the standard deviation, as we do) and is trained by Adam (lr 1e-3, as in the code). Initialisation
    and sampling draw from one private, seeded ``torch.Generator``, saved in :meth:`state_dict`, so a
    resumed run samples the same actions as an uninterrupted one.
    """

    def __init__(self, num_controlled: int, lr: float = 1e-3, init_std: float = 0.001, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(num_controlled, len(ACTIONS), generator=self.generator) * init_std)
        self.optimizer = torch.optim.Adam([self.theta], lr=lr)

    @property
    def num_controlled(self) -> int:
        return self.theta.shape[0]

    def probabilities(self) -> torch.Tensor:
        """π, shape (L, 3): softmax of each controller's θ_l."""
        return torch.softmax(self.theta, dim=1)

    def entropies(self) -> torch.Tensor:
        """Entropy of each controller's policy, shape (L,); log 3 ≈ 1.0986 at the uniform start."""
        with torch.no_grad():
            log_pi = torch.log_softmax(self.theta, dim=1)
            return -(log_pi.exp() * log_pi).sum(dim=1)

    def sample(self, k: int) -> torch.Tensor:
        """K joint actions, shape (k, L): each controller draws its action index independently."""
        with torch.no_grad():
            return torch.multinomial(self.probabilities(), k, replacement=True, generator=self.generator).T

    @staticmethod
    def delta_beta(actions: torch.Tensor) -> torch.Tensor:
        """The Δβ of action indices, same shape as ``actions`` (float64)."""
        return torch.tensor(ACTIONS, dtype=torch.float64)[actions]

    def reinforce_loss(self, actions: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """−(1/K)·Σ_k Σ_l log π_l(a_{k,l})·A_k, whose negative gradient is the REINFORCE step of Eq. 8.

        For one controller and one sample, ∂loss/∂θ_l = −A·(onehot(a_l) − π_l).
        """
        k = actions.shape[0]
        log_pi = torch.log_softmax(self.theta, dim=1)
        log_g = log_pi[torch.arange(self.num_controlled), actions].sum(dim=1)  # log g(β_k), shape (k,)
        return -(log_g * torch.as_tensor(advantages, dtype=log_g.dtype)).sum() / k

    def update(self, actions: torch.Tensor, rewards: Sequence[float] | torch.Tensor,
               baseline: MovingBaseline) -> dict:
        """One REINFORCE round (Eq. 8) over the K scored candidates; returns the round's statistics.

        Order, from the authors' code (the paper indexes the baseline by epoch, B_t): the baseline is
        updated once per round with the round's mean reward, and then every sample's advantage is
        A_k = (R_k − B_t)/σ_R with that updated B_t, σ_R the standard deviation of the round's rewards (1 when
        it is below :data:`MIN_REWARD_SPREAD`: ties and rounding are no signal). In the first round B_t is the
        mean reward, so the advantages are centred. Then one Adam step on :meth:`reinforce_loss`.

        Dividing by σ_R is ours: candidates differ in Dice by as little as 1e-9, below Adam's ε = 1e-8, where
        Adam no longer normalises the step; with σ_R every round casts an equal vote.
        """
        rewards = torch.as_tensor(rewards, dtype=torch.float64)
        if actions.shape != (rewards.numel(), self.num_controlled):
            raise ValueError(f"actions must have shape ({rewards.numel()}, {self.num_controlled}), "
                             f"got {tuple(actions.shape)}")
        spread = rewards.std(unbiased=False).item()
        scale = spread if spread > MIN_REWARD_SPREAD else 1.0
        advantages = (rewards - baseline.update(rewards.mean().item())) / scale
        self.optimizer.zero_grad()
        loss = self.reinforce_loss(actions, advantages)
        loss.backward()
        self.optimizer.step()
        return {"reward_mean": rewards.mean().item(), "advantage_mean": advantages.mean().item(),
                "baseline": baseline.value, "policy_gradient_loss": loss.item(),
                "entropies": self.entropies().tolist()}

    def state_dict(self) -> dict:
        """θ, Adam's state and the generator's state, copied (Adam's own state_dict shares its live moments)."""
        return {"theta": self.theta.detach().clone(), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


class DeepSupervisionWeights:
    """The current β of the controlled outputs (fine→coarse) and the weighting α = softmax(β) it gives."""

    def __init__(self, beta: Sequence[float]):
        self.beta = np.array(beta, dtype=np.float64)

    @classmethod
    def stock(cls, num_outputs: int) -> "DeepSupervisionWeights":
        """β = log of nnU-Net's stock weights of the supervised outputs: α starts where nnU-Net is."""
        return cls(beta_from_alpha(stock_weights(num_outputs)[:num_controlled(num_outputs)]))

    @property
    def num_controlled(self) -> int:
        return self.beta.size

    def alpha(self) -> np.ndarray:
        """α of the controlled outputs (the trainer appends the lowest output's stock weight)."""
        return alpha_from_beta(self.beta)

    def candidates(self, controllers: DASControllers, k: int) -> tuple[torch.Tensor, np.ndarray]:
        """K sampled actions (k, L) and the candidate β + Δβ_k, shape (k, L) (Fig. 4, inner level)."""
        if controllers.num_controlled != self.num_controlled:
            raise ValueError(f"{controllers.num_controlled} controllers for {self.num_controlled} weights")
        actions = controllers.sample(k)
        return actions, self.beta[None, :] + controllers.delta_beta(actions).numpy()

    def keep(self, beta_best: Sequence[float]) -> None:
        """Adopt the best candidate's β for the next round (the code's ``coeff = coeff_total[max_index]``)."""
        beta_best = np.array(beta_best, dtype=np.float64)
        if beta_best.shape != self.beta.shape:
            raise ValueError(f"beta must have shape {self.beta.shape}, got {beta_best.shape}")
        self.beta = beta_best

    def state_dict(self) -> dict:
        return {"beta": self.beta.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.beta = np.array(state["beta"], dtype=np.float64)

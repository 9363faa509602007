"""MRL-Seg on nnU-Net's planned networks: per-voxel {mask, retain} agents on the input, rewarded by the planned
U-Net's cross-entropy (eqs. 4-5) with the foreground/background prior (eq. 3) and the difficulty term ADP (eqs. 10-12).

F. Yang, X. Li, H. Duan, F. Xu, Y. Huang, X. Zhang, Y. Long, Y. Zheng, "MRL-Seg: Overcoming imbalance in medical
image segmentation with multi-step reinforcement learning", IEEE Journal of Biomedical and Health Informatics 28(2),
858-869 (2024), DOI 10.1109/jbhi.2023.3336726, §III.

- Rewards and returns (pure functions; maps are (B, 1, *spatial) per voxel, labels (B, *spatial), logits
  (B, C, *spatial), 2D and 3D alike): :func:`foreground_prior` (eq. 3), :func:`cross_entropy_reward` (eqs. 4-5),
  :func:`difficulty` (ADP, eq. 10), :func:`difficulty_returns` (eqs. 11-12, on the shared ω of
  :attr:`nnunet_rl.voxel_actor_critic.NeighbourReturns.omega`).
- The networks: :class:`ReinforcementEncoder` (the paper's feature-extraction blocks, copies of the planned
  encoder's first stages), :class:`ReinforcementNet` (it plus the shared per-voxel policy and value heads of
  :mod:`nnunet_rl.voxel_actor_critic`) and :class:`MRLSegNetwork` (Reinforcement-Net, the masked representation and
  the planned U-Net as Segmentation-Net), whose prediction is the Segmentation-Net's logits on the greedily masked
  input.
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_rl.pixel_rl import one_hot, shuffled_over_voxels
from nnunet_rl.planned_network import AroundPlannedNetwork
from nnunet_rl.plans.rl_block import MRLSegSettings
from nnunet_rl.voxel_actor_critic import (A2CLosses, EpisodeFeatures, VoxelActorCritic, a2c_losses, full_resolution,
                                          greedy_actions, greedy_rollout, sample_actions)

MASK, RETAIN = 0, 1
NUM_ACTIONS = 2

_CONVOLUTIONS = {2: F.conv2d, 3: F.conv3d}


def balance_prior(ratio: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 3's global term as a function of x = N_F/N_B: α·f(x), f(x) = x + β/x (any shape; the dtype is kept).

    f's extremum lies at x = √β: α ∈ (−1, 0) makes it a maximum of the reward, and β ∈ (0.2, 0.3) puts it at
    N_F/N_B ∈ (0.447, 0.548). x is a ratio of counts, not the foreground fraction N_F/N."""
    return alpha * (ratio + beta / ratio)


def foreground_prior(foreground: torch.Tensor, background: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 3's global term α(N_F/N_B + β·N_B/N_F) from the voxel counts ``foreground`` = N_F and ``background`` =
    N_B (any shape, e.g. (B,)). Counts are clamped to ≥ 1: an empty foreground scores as one voxel of foreground,
    α(1/N_B + β·N_B), the term's most negative value for that N_B, instead of −∞ (an empty background likewise)."""
    return balance_prior(foreground.clamp(min=1) / background.clamp(min=1), alpha, beta)


def global_reward(rewards: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Eq. 3, r̄* = (1/N)(Σ_i r_i + α(N_F/N_B + β·N_B/N_F)) per sample, shape (B,): ``rewards`` (B, 1, *spatial) are
    the local rewards r_i of the N voxels (eq. 5), ``prior`` (B,) the global term (:func:`foreground_prior`). The
    prior is divided by N as printed, so it weighs like one voxel's reward."""
    return (rewards.flatten(1).sum(dim=1) + prior) / rewards[0].numel()


def prior_rewards(rewards: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The per-voxel rewards r*(t) of eq. 12, (B, 1, *spatial): r_i plus eq. 3's global term ``prior`` (B,) divided
    by N, the map whose mean over the voxels is :func:`global_reward`."""
    return rewards + (prior / rewards[0].numel()).view(-1, *[1] * (rewards.ndim - 1)).to(rewards.dtype)


def retained_prior(masked: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None, empty_ratio: float,
                   alpha: float, beta: float) -> torch.Tensor:
    """Eq. 3's global term per sample (B,) for the masked representation: N_F and N_B count the retained voxels
    (``masked`` (B, 1, *spatial) false, ``valid`` true) whose reference label (B, *spatial) is foreground (any label
    but background) and background. A sample whose reference holds no foreground has no ratio to balance: it gets
    the prior at ``empty_ratio`` (the dataset's N_F/N_B), the same value whatever is masked."""
    considered = ~masked if valid is None else ~masked & valid
    foreground = (reference[:, None] > 0) if valid is None else (reference[:, None] > 0) & valid
    counts_foreground = (foreground & considered).flatten(1).sum(dim=1).float()
    counts_background = (~foreground & considered).flatten(1).sum(dim=1).float()
    prior = foreground_prior(counts_foreground, counts_background, alpha, beta)
    empty = balance_prior(torch.full_like(prior, empty_ratio), alpha, beta)
    return torch.where(foreground.flatten(1).any(dim=1), prior, empty)


def dataset_foreground_ratio(label_fractions: dict[str, float]) -> float:
    """N_F/N_B of the dataset from the rl block's mean voxel fraction per foreground label (nnU-Net's
    ``gt_segmentations``, see ``nnunet_rl.plans.rl_block.label_fractions``): φ/(1 − φ), φ their sum."""
    fraction = sum(label_fractions.values())
    if not 0 < fraction < 1:
        raise ValueError(f"the labels' voxel fractions sum to {fraction}; a foreground ratio needs 0 < sum < 1")
    return fraction / (1 - fraction)


def cross_entropy(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per voxel, multi-class: −log softmax(``logits``)[y_i], shape (B, 1, *spatial). For two classes this is
    eq. 4's −y log p − (1 − y) log(1 − p) with p the softmax probability of the foreground."""
    return F.cross_entropy(logits.float(), reference.long(), reduction="none").unsqueeze(1)


def cross_entropy_reward(previous_logits: torch.Tensor, current_logits: torch.Tensor, reference: torch.Tensor,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5 per voxel: r_i(t) = CE_i(t−1) − CE_i(t), (B, 1, *spatial), positive where the segmentation of step t
    puts more probability on the reference label (B, *spatial) than that of step t−1. 0 where ``valid``
    (B, 1, *spatial) is false (e.g. nnU-Net's ignore label, whose value need not be a class of the logits)."""
    if valid is not None:
        reference = torch.where(valid[:, 0], reference, torch.zeros_like(reference))
    reward = cross_entropy(previous_logits, reference) - cross_entropy(current_logits, reference)
    return reward if valid is None else torch.where(valid, reward, torch.zeros_like(reward))


def difficulty(reference: torch.Tensor, window: int) -> torch.Tensor:
    """ADP, eq. 10: per voxel i, the fraction of its window F_i whose reference label differs from y_i, shape
    (B, 1, *spatial), in [0, 1]; ``reference`` holds integer labels ≥ 0, (B, *spatial).

    F_i is the ``window``^d cube centred on i, without i itself (the paper has 𝔍_i = 1 "if the class labels of all
    pixels in F_i are different from x_i", impossible if F_i held x_i) and without the voxels outside the image.
    Counted per label with one grouped convolution of the one-hot map. MRL-Seg's F_i is the window N(i) of eq. 11, so
    ``window`` is ω's kernel size.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"the ADP window must be odd and at least 3, got {window}")
    labels = one_hot(reference, int(reference.max()) + 1)
    classes, dims = labels.shape[1], labels.ndim - 2
    kernel = labels.new_ones((classes, 1, *[window] * dims))
    counts = _CONVOLUTIONS[dims](labels, kernel, padding=window // 2, groups=classes)
    inside = counts.sum(dim=1, keepdim=True)
    same = (counts * labels).sum(dim=1, keepdim=True)
    return (inside - same) / (inside - 1).clamp(min=1)


def difficulty_returns(rewards: Sequence[torch.Tensor], bootstrap: torch.Tensor, adp: torch.Tensor,
                       omega: nn.Module, gamma: float) -> list[torch.Tensor]:
    """R(0) … R(T−1) of eqs. 11-12 for the rewards r*(0) … r*(T−1) (:func:`prior_rewards`), each (B, 1, *spatial);
    ``bootstrap`` is R(T) = V(s(T)), ``adp`` the map 𝔍 of :func:`difficulty`, ``omega`` the single-channel
    convolution w without bias (:attr:`NeighbourReturns.omega`, zero padding)::

        R_i(t) = r*_i(t) + γ Σ_{j∈N(i)} w_{i−j} (𝔍_i + R_j(t+1)),   R(T) = V(s(T))
               = r*(t) + γ (𝔍 · (w ∗ 1) + w ∗ R(t+1))

    For one step this is eq. 11 as printed: 𝔍 of the centre voxel i, weighted by the weights of i's neighbours
    inside the image (w ∗ 1). Over several steps eq. 11 is applied at every step with V(s(t+1)) replaced by the
    return R(t+1), as eq. 12 follows from eq. 6; eq. 12 as printed omits 𝔍, and with 𝔍 = 0 this is eq. 12. ω learns
    through both terms (eq. 13).
    """
    bonus = adp * omega(torch.ones_like(adp))
    returns = []
    following = bootstrap
    for reward in reversed(rewards):
        following = reward + gamma * (bonus + omega(following))
        returns.append(following)
    return returns[::-1]


def masked_input(image: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The representation s(t): the input ``image`` (B, C, *spatial) with every channel of the ``masked`` voxels
    (B, 1, *spatial) set to 0, the value nnU-Net pads its normalised images with."""
    return image.masked_fill(masked, 0.0)


class ReinforcementEncoder(nn.Module):
    """The Reinforcement-Net's feature extraction (§III.A, Fig. 3): a copy of the planned encoder cut after its
    first ``stages`` stages (stem included, for residual encoders), the same structure as the Segmentation-Net's
    blocks and initialised from them (:meth:`initialise_from`). The deepest stage's features are projected to
    ``out_channels`` by a 1^d convolution at their own resolution and interpolated back to the input's, so that every
    voxel gets a feature vector (projecting first costs the same as projecting after the interpolation, which is
    linear, on 2^d to 4^d fewer voxels)."""

    def __init__(self, encoder: nn.Module, stages: int, out_channels: int):
        super().__init__()
        if not 1 <= stages <= len(encoder.stages):
            raise ValueError(f"the planned encoder has {len(encoder.stages)} stages; cannot copy {stages}")
        self.body = copy.deepcopy(encoder)
        self.body.stages = self.body.stages[:stages]
        self.body.strides = self.body.strides[:stages]
        self.body.output_channels = self.body.output_channels[:stages]
        self.body.return_skips = False
        self.project = encoder.conv_op(encoder.output_channels[stages - 1], out_channels, kernel_size=1)
        self.output_channels = out_channels

    def initialise_from(self, encoder: nn.Module) -> None:
        """Copy the weights of the corresponding blocks of the (pre-trained) Segmentation-Net's ``encoder``."""
        source = encoder.state_dict()
        self.body.load_state_dict({key: source[key] for key in self.body.state_dict()})

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        features = self.project(self.body(representation))
        mode = "bilinear" if features.ndim == 4 else "trilinear"
        return F.interpolate(features, size=representation.shape[2:], mode=mode, align_corners=False)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """nnU-Net's estimate for the copied stages, plus the interpolated features."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return int(self.body.compute_conv_feature_map_size(input_size)) + voxels * self.output_channels


class ReinforcementNet(nn.Module):
    """Reinforcement-Net (§III.A, Fig. 3): :class:`ReinforcementEncoder` on the representation s(t), then the shared
    per-voxel policy and value heads (:class:`~nnunet_rl.voxel_actor_critic.VoxelActorCritic`, no SAM) on
    [features, s(t), mask(t)]: 2 action logits {mask, retain} and V(s(t)) per voxel, at the input's resolution; the
    heads' ω is eq. 11's w."""

    def __init__(self, encoder: ReinforcementEncoder, actor_critic: VoxelActorCritic):
        super().__init__()
        self.encoder = encoder
        self.actor_critic = actor_critic

    def _state(self, representation: torch.Tensor, masked: torch.Tensor) -> tuple[EpisodeFeatures, torch.Tensor]:
        """The encoder's features of s(t) (they change every step, so the heads respond to them every step) and
        [s(t), mask(t)]."""
        return (self.actor_critic.attend(self.encoder(representation)),
                torch.cat((representation, masked.to(representation.dtype)), dim=1))

    def forward(self, representation: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits (B, 2, *spatial) and values (B, 1, *spatial)."""
        return self.actor_critic(*self._state(representation, masked))

    def state_value(self, representation: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        return self.actor_critic.state_value(*self._state(representation, masked))

    def action_logits(self, representation: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The policy head alone (B, 2, *spatial): all a greedy step needs."""
        return self.actor_critic.action_logits(*self._state(representation, masked))

    @property
    def omega(self) -> nn.Module:
        return self.actor_critic.returns.omega


@dataclass
class RewardSettings:
    """What MRL-Seg's reward of a training episode uses: γ, eq. 3's α and β with the dataset's N_F/N_B for samples
    without foreground (``use_prior`` false: _noFB), ADP (``use_difficulty`` false: _noADP, 𝔍 = 0) with its window,
    and the control's shuffling of each step's rewards across voxels."""
    gamma: float
    alpha: float
    beta: float
    empty_ratio: float | None
    use_prior: bool
    use_difficulty: bool
    window: int
    shuffle_rewards: bool = False


@dataclass
class Episode:
    """One training episode over a batch: the A2C losses (None when non-finite), and per step the mean reward r* per
    voxel and the fraction of voxels masked after the step."""
    losses: A2CLosses | None
    mean_rewards: list[float]
    masked_fractions: list[float]


@dataclass
class GreedyEpisode:
    """A greedy episode, for validation: the masks after each step and the Segmentation-Net's label map of s(0) …
    s(T)."""
    masks: list[torch.Tensor]
    maps: list[torch.Tensor]


class MRLSegNetwork(AroundPlannedNetwork):
    """Reinforcement-Net, masked representation and Segmentation-Net (MRL-Seg's Fig. 2) around nnU-Net's planned
    network.

    - Plain forward with deep supervision on (nnU-Net's training step outside the RL phase, validation before it):
      the Segmentation-Net on the unmasked input, nnU-Net's outputs unchanged.
    - Deep supervision off (``nnUNetv2_predict``, nnU-Net's final validation): ``steps`` greedy steps of the
      Reinforcement-Net, then the Segmentation-Net's logits of the masked input s(T); nnU-Net aggregates them over
      windows as stock logits.
    - Inside :meth:`recording` (validation in the RL phase): the same greedy episode, recording the Segmentation-Net's
      map of every s(t).
    - Inside :meth:`training_episodes` (the RL phase's training steps): a sampled episode against the batch's
      reference (:meth:`training_episode`); the output is the Segmentation-Net's on the greedily masked input (what
      prediction feeds it), which nnU-Net's loss trains.
    """

    def __init__(self, segmentation: nn.Module, reinforcement: ReinforcementNet, steps: int):
        super().__init__()
        self.segmentation = segmentation
        self.reinforcement = reinforcement
        self.steps = steps
        self._recorded: list[GreedyEpisode] | None = None
        self._training: dict | None = None

    @property
    def planned_network(self) -> nn.Module:
        """The Segmentation-Net."""
        return self.segmentation

    def warm_start_from_planned(self) -> None:
        """The Reinforcement-Net's encoder becomes a copy of the Segmentation-Net's first encoder stages (Table V's
        pre-training)."""
        self.reinforcement.encoder.initialise_from(self.segmentation.encoder)

    @contextmanager
    def recording(self):
        """Run greedy episodes with deep supervision on as well; yields the list that receives each forward's
        :class:`GreedyEpisode`."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    @contextmanager
    def training_episodes(self, reference: torch.Tensor, valid: torch.Tensor | None, settings: RewardSettings,
                          generator: torch.Generator | None):
        """Forwards run :meth:`training_episode` against ``reference``; yields the list that receives each
        :class:`Episode`."""
        episodes: list[Episode] = []
        self._training = dict(reference=reference, valid=valid, settings=settings, generator=generator,
                              episodes=episodes)
        try:
            yield episodes
        finally:
            self._training = None

    def forward(self, x: torch.Tensor):
        if self._training is not None:
            episodes = self._training["episodes"]
            arguments = {k: v for k, v in self._training.items() if k != "episodes"}
            output, episode = self.training_episode(x, **arguments)
            episodes.append(episode)
            return output
        if self._recorded is not None:
            masks = self.greedy_masks(x)
            states = [masked_input(x, m) for m in masks]
            outputs = [self.segmentation(state) for state in states]
            self._recorded.append(GreedyEpisode(masks, [full_resolution(o).argmax(dim=1) for o in outputs]))
            return outputs[-1]
        if not self.decoder.deep_supervision:
            return self.segmentation(masked_input(x, self.greedy_masks(x)[-1]))
        return self.segmentation(x)

    def greedy_masks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """mask(0) … mask(T), each (B, 1, *spatial) boolean, under the greedy policy
        (:func:`~nnunet_rl.voxel_actor_critic.greedy_rollout`: the policy head alone, and no more of it once a step
        masks nothing new); a masked voxel stays masked, and a voxel whose action logits are not finite is retained."""

        def step(masked: torch.Tensor) -> torch.Tensor:
            logits = self.reinforcement.action_logits(masked_input(x, masked), masked)
            actions = torch.where(torch.isfinite(logits).all(dim=1), greedy_actions(logits), RETAIN)
            return masked | (actions == MASK)[:, None]

        return greedy_rollout(torch.zeros_like(x[:, :1], dtype=torch.bool), step, self.steps)

    def training_episode(self, x: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None,
                         settings: RewardSettings, generator: torch.Generator | None):
        """``steps`` sampled steps from s(0) = ``x``; per step the reward r*(t) of eqs. 3-5 against ``reference``
        (B, *spatial, labels ≥ 0; 0 where ``valid`` (B, 1, *spatial) is false), the returns of eqs. 11-12 with ADP
        (eq. 10) bootstrapped from V(s(T)), and the A2C losses (eqs. 8, 9, 13) over the valid voxels; the policy term
        of step t only over the voxels not masked before it (masks only grow, so an action there changes nothing).
        Returns the Segmentation-Net's output on the input masked by the greedy policy (with gradients, for nnU-Net's
        loss: the Segmentation-Net trains on what prediction feeds it, not on the sampled exploration) and the
        :class:`Episode`. The rewards come from the Segmentation-Net without gradients: the A2C losses train the
        Reinforcement-Net and ω only."""
        masked = torch.zeros_like(x[:, :1], dtype=torch.bool)
        with torch.no_grad():
            greedy = self.greedy_masks(x)[-1]
            previous = full_resolution(self.segmentation(x))
        logits, values, actions, rewards, fractions, acting = [], [], [], [], [], []
        for _ in range(self.steps):
            acting.append(~masked if valid is None else valid & ~masked)
            step_logits, value = self.reinforcement(masked_input(x, masked), masked)
            action = sample_actions(step_logits.detach(), generator, fallback=RETAIN)
            masked = masked | (action == MASK)[:, None]
            with torch.no_grad():
                current = full_resolution(self.segmentation(masked_input(x, masked)))
            reward = self._reward(previous, current, masked, reference, valid, settings, generator)
            logits.append(step_logits)
            values.append(value)
            actions.append(action)
            rewards.append(reward)
            fractions.append(masked.float().mean())
            previous = current
        with torch.no_grad():  # R(T) = V(s(T)) is a target: no graph
            bootstrap = self.reinforcement.state_value(masked_input(x, masked), masked).float()
        adp = difficulty(reference, settings.window) if settings.use_difficulty else torch.zeros_like(bootstrap)
        returns = difficulty_returns(rewards, bootstrap, adp, self.reinforcement.omega, settings.gamma)
        losses = a2c_losses(logits, values, actions, returns, valid, policy_mask=acting)
        mean_rewards = torch.stack([r.mean() for r in rewards]).tolist()
        episode = Episode(losses, mean_rewards, torch.stack(fractions).tolist())
        return self.segmentation(masked_input(x, greedy)), episode

    @staticmethod
    def _reward(previous: torch.Tensor, current: torch.Tensor, masked: torch.Tensor, reference: torch.Tensor,
                valid: torch.Tensor | None, settings: RewardSettings,
                generator: torch.Generator | None) -> torch.Tensor:
        """r*(t) per voxel: eq. 5, plus eq. 3's prior over the retained voxels (unless _noFB), shuffled for the
        control."""
        reward = cross_entropy_reward(previous, current, reference, valid)
        if settings.use_prior:
            prior = retained_prior(masked, reference, valid, settings.empty_ratio, settings.alpha, settings.beta)
            reward = prior_rewards(reward, prior)
        if settings.shuffle_rewards:
            reward = shuffled_over_voxels(reward, generator)
        return reward

    def compute_conv_feature_map_size(self, input_size) -> int:
        """nnU-Net's estimate for the planned network plus the Reinforcement-Net's encoder and heads ``steps`` + 1
        times (what a training episode keeps for the backward pass)."""
        encoder = self.reinforcement.encoder.compute_conv_feature_map_size(input_size)
        return self.segmentation.compute_conv_feature_map_size(input_size) + (self.steps + 1) * encoder + \
            self.reinforcement.actor_critic.compute_conv_feature_map_size(input_size, self.steps + 1)


def build_mrl_seg_network(segmentation: nn.Module, input_channels: int,
                          hyperparameters: MRLSegSettings) -> MRLSegNetwork:
    """The Reinforcement-Net typed from the planned network (its conv, norm and nonlinearity, its first
    ``encoder_stages`` encoder stages projected to ``head_channels``), heads of ``head_layers`` 3^d convolutions; the
    policy started so that a sampled episode retains a voxel through all steps with probability
    ``initial_episode_retain_probability`` (per step its ``steps``-th root), so an untrained policy masks nothing
    greedily."""
    encoder = segmentation.encoder
    features = ReinforcementEncoder(encoder, hyperparameters.encoder_stages, hyperparameters.head_channels)
    actor_critic = VoxelActorCritic(
        feature_channels=features.output_channels, state_channels=input_channels + 1, num_actions=NUM_ACTIONS,
        conv_op=encoder.conv_op, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
        nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs, head_channels=hyperparameters.head_channels,
        dilations=[1] * hyperparameters.head_layers, use_sam=False,
        omega_kernel_size=hyperparameters.omega_kernel_size)
    probabilities = [0.0] * NUM_ACTIONS
    probabilities[RETAIN] = hyperparameters.initial_episode_retain_probability ** (1 / hyperparameters.steps)
    probabilities[MASK] = 1 - probabilities[RETAIN]
    actor_critic.bias_policy(probabilities)
    return MRLSegNetwork(segmentation, ReinforcementNet(features, actor_critic), hyperparameters.steps)

"""PixelDRL-MG's per-voxel refinement on nnU-Net's planned U-Net: actions {set to background, keep}, reward eq. 12.

Y. Liu, D. Yuan, Z. Xu, Y. Zhan, H. Zhang, J. Lu, T. Lukasiewicz, "Pixel level deep reinforcement learning for
accurate and robust medical image segmentation", Scientific Reports (published 10 March 2025; our copy of the paper
gives no DOI), §"Dynamic iterative update policy", eqs. 8 and 12-16, Algorithm 1.

The planned network (the paper's feature extractor) runs once per patch; its logits give the initial label map f(0)
(:func:`initial_map`: the argmax by default; with ``proposal_threshold`` > 0 also the voxels whose background
probability is below it, a superset of the planned network's segmentation for agents that can only remove; with 1 every
voxel, our reading of the paper's initial state), its last decoder stage the features. Every voxel is an agent: at each
of t_max steps the policy head sees [SAM(features), one-hot f(t)] and each voxel either sets its label to background or
keeps it (multi-class: keeps its current label; a voxel set to background stays background). The reward of step t is
eq. 12 on one-hot maps, r = ‖f(t) − G‖² − ‖f(t+1) − G‖² per voxel: +2 where a false-positive voxel becomes background,
−2 where a true positive does, 0 otherwise. The actor-critic machinery is :mod:`nnunet_rl.voxel_actor_critic`.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_rl.planned_network import AroundPlannedNetwork
from nnunet_rl.plans.rl_block import PixelRLSettings
from nnunet_rl.voxel_actor_critic import (A2CLosses, VoxelActorCritic, a2c_losses, greedy_actions,
                                          greedy_rollout, sample_actions)

SET_TO_BACKGROUND, KEEP = 0, 1
NUM_ACTIONS = 2


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *spatial) integer labels → (B, num_classes, *spatial) float one-hot."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def apply_actions(labels: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """f(t+1): background where the action is SET_TO_BACKGROUND, the current label elsewhere."""
    return torch.where(actions == SET_TO_BACKGROUND, torch.zeros_like(labels), labels)


def initial_map(logits: torch.Tensor, proposal_threshold: float) -> torch.Tensor:
    """f(0), (B, *spatial): the argmax of ``logits``, except that a voxel whose background probability is below
    ``proposal_threshold`` gets its most probable foreground label. 0 gives the argmax; above 0.5 the map is a
    superset of the argmax's foreground (a high-recall proposal for agents that can only remove); 1 (or more) gives
    every voxel its most probable foreground label, our reading of the paper's initial state: its state starts from
    the image (s(0) = I), its agents set pixels to zero (§"Dynamic iterative update policy", Fig. 4)."""
    labels = logits.argmax(dim=1)
    if proposal_threshold <= 0:
        return labels
    proposed = logits[:, 1:].argmax(dim=1) + 1
    if proposal_threshold >= 1:  # not p(background) < 1: a saturated softmax gives exactly 1 far from any organ
        return proposed
    background = torch.softmax(logits.float(), dim=1)[:, 0]
    return torch.where((labels == 0) & (background < proposal_threshold), proposed, labels)


def refined_logits(logits: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """The logits of a refined map: the backbone's ``logits`` where the refined label is their argmax; elsewhere the
    same logits with the argmax's and the refined label's exchanged. Each voxel's argmax is its refined label, with the
    backbone's own confidence (softmax margin) behind it, so nnU-Net's Gaussian averaging over windows and mirrorings,
    its probabilities and ensembling work on them as on stock logits."""
    winner = logits.argmax(dim=1, keepdim=True)
    refined = refined[:, None]
    exchanged = logits.scatter(1, winner, logits.gather(1, refined)).scatter(1, refined, logits.gather(1, winner))
    return torch.where(refined != winner, exchanged, logits)


def shuffled_over_voxels(reward: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``reward`` (B, 1, *spatial) with its values permuted across the voxels of each sample: the control whose reward
    carries no information about which voxel did what."""
    flat = reward.flatten(1)
    order = torch.stack([torch.randperm(flat.shape[1], generator=generator, device=reward.device)
                         for _ in range(flat.shape[0])])
    return flat.gather(1, order).view_as(reward)


def squared_error_reward(previous: torch.Tensor, current: torch.Tensor, reference: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """Eq. 12 per voxel on one-hot maps: ‖f(t−1) − G‖² − ‖f(t) − G‖², shape (B, 1, *spatial)."""
    target = one_hot(reference, num_classes)
    before = ((one_hot(previous, num_classes) - target) ** 2).sum(dim=1, keepdim=True)
    after = ((one_hot(current, num_classes) - target) ** 2).sum(dim=1, keepdim=True)
    return before - after


def step_confusion(maps: list[torch.Tensor], reference: torch.Tensor, num_classes: int,
                   ignore_label: int | None = None) -> torch.Tensor:
    """True positives, false positives and false negatives of each foreground label in each map f(0) … f(T) against
    ``reference`` (B, *spatial), voxels of ``ignore_label`` left out; shape (T + 1, num_classes − 1, 3)."""
    valid = torch.ones_like(reference, dtype=torch.bool) if ignore_label is None else reference != ignore_label
    counts = []
    for labels in maps:
        per_class = []
        for label in range(1, num_classes):
            predicted, actual = (labels == label) & valid, (reference == label) & valid
            per_class.append(torch.stack([(predicted & actual).sum(), (predicted & ~actual).sum(),
                                          (~predicted & actual).sum()]))
        counts.append(torch.stack(per_class))
    return torch.stack(counts).cpu()


def dice_per_step(confusion: torch.Tensor) -> list[float]:
    """Mean foreground Dice per step from summed :func:`step_confusion` counts (labels absent from both the maps and
    the reference left out of the mean, as nnU-Net's pseudo Dice does)."""
    tp, fp, fn = confusion.double().unbind(dim=-1)
    dice = 2 * tp / (2 * tp + fp + fn)
    return [float(step[torch.isfinite(step)].mean()) if torch.isfinite(step).any() else float("nan") for step in dice]


@dataclass
class Episode:
    """One training episode over a batch: the A2C losses (None when non-finite), and per step the mean reward and the
    fraction of voxels whose label changed."""
    losses: A2CLosses | None
    mean_rewards: list[float]
    changed_fractions: list[float]


class PixelRLNetwork(AroundPlannedNetwork):
    """nnU-Net's planned network plus a :class:`VoxelActorCritic` on its last decoder stage.

    With deep supervision on (nnU-Net's training step) it returns the planned network's outputs unchanged. With deep
    supervision off (``nnUNetv2_predict``, nnU-Net's final validation), or inside :meth:`refining` (the trainer's
    validation steps), it refines: f(0) = :func:`initial_map` of the full-resolution logits, ``steps`` greedy head
    steps, and the full-resolution output becomes :func:`refined_logits` of f(t_max).
    """

    def __init__(self, backbone: nn.Module, actor_critic: VoxelActorCritic, num_classes: int, steps: int,
                 proposal_threshold: float):
        super().__init__()
        self.backbone = backbone
        self.actor_critic = actor_critic
        self.num_classes = num_classes
        self.steps = steps
        self.proposal_threshold = proposal_threshold
        self.features: torch.Tensor | None = None
        self.recorded_episodes: list[list[torch.Tensor]] | None = None
        backbone.decoder.stages[-1].register_forward_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.features = output

    @property
    def planned_network(self) -> nn.Module:
        """The backbone (the paper's feature extractor)."""
        return self.backbone

    def warm_start_from_planned(self) -> None:
        """Nothing: the heads take no weights from the planned network; they start as initialised (near "keep")."""

    @contextmanager
    def refining(self):
        """Refine the full-resolution output with deep supervision on as well; yields a list that receives, per
        forward, the greedy episode's maps f(0) … f(t_max)."""
        self.recorded_episodes = []
        try:
            yield self.recorded_episodes
        finally:
            self.recorded_episodes = None

    def forward(self, x: torch.Tensor):
        output = self.backbone(x)
        if not self.decoder.deep_supervision:
            return self.refine(output, self.take_features())
        if self.recorded_episodes is None:
            return output
        return [self.refine(output[0], self.take_features()), *output[1:]]

    def refine(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The greedy episode from f(0) = :meth:`initial_map`; the logits of its last map (:func:`refined_logits`)."""
        maps = self.greedy_episode(self.initial_map(logits), features)
        if self.recorded_episodes is not None:
            self.recorded_episodes.append(maps)
        return refined_logits(logits, maps[-1])

    def initial_map(self, logits: torch.Tensor) -> torch.Tensor:
        return initial_map(logits, self.proposal_threshold)

    def take_features(self) -> torch.Tensor:
        """The last decoder stage's output of the latest forward (released here)."""
        features, self.features = self.features, None
        return features

    def greedy_episode(self, labels: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
        """f(0) … f(t_max) under the greedy policy (:func:`~nnunet_rl.voxel_actor_critic.greedy_rollout`: the policy
        head alone, and no more of it once a step changes nothing); a voxel whose action logits are not finite keeps
        its label."""
        attended = self.actor_critic.attend(features)

        def step(current: torch.Tensor) -> torch.Tensor:
            logits = self.actor_critic.action_logits(attended, one_hot(current, self.num_classes))
            return apply_actions(current, torch.where(torch.isfinite(logits).all(dim=1), greedy_actions(logits), KEEP))

        return greedy_rollout(labels, step, self.steps)

    def training_episode(self, labels: torch.Tensor, features: torch.Tensor, reference: torch.Tensor,
                         gamma: float, generator: torch.Generator | None,
                         valid: torch.Tensor | None = None, shuffle_rewards: bool = False) -> Episode:
        """Algorithm 1 on one batch: sampled actions for ``steps`` steps from f(0) = ``labels``, rewards eq. 12 against
        ``reference`` (B, *spatial), discounted returns bootstrapped with ω ∗ V(s(t_max)) (Algorithm 1 with eq. 8), A2C
        losses (eqs. 13-15) over the voxels where ``valid`` (B, 1, *spatial) is true. Gradients reach whatever
        ``features`` depend on (eq. 16) unless the caller detached them. ``shuffle_rewards``: the control arm, each
        step's rewards permuted across voxels (:func:`shuffled_over_voxels`)."""
        attended = self.actor_critic.attend(features)
        logits, values, actions, rewards, changed = [], [], [], [], []
        current = labels
        for _ in range(self.steps):
            step_logits, value = self.actor_critic(attended, one_hot(current, self.num_classes))
            action = sample_actions(step_logits.detach(), generator, fallback=KEEP)
            following = apply_actions(current, action)
            reward = squared_error_reward(current, following, reference, self.num_classes)
            if valid is not None:
                reward = reward * valid
            if shuffle_rewards:
                reward = shuffled_over_voxels(reward, generator)
            logits.append(step_logits)
            values.append(value)
            actions.append(action)
            rewards.append(reward)
            changed.append((following != current).float().mean())
            current = following
        bootstrap = self.actor_critic.state_value(attended, one_hot(current, self.num_classes)).detach().float()
        returns = self.actor_critic.returns(rewards, bootstrap, gamma)
        losses = a2c_losses(logits, values, actions, returns, valid)
        mean_rewards = torch.stack([r.mean() for r in rewards]).tolist()
        return Episode(losses, mean_rewards, torch.stack(changed).tolist())

    def compute_conv_feature_map_size(self, input_size) -> int:
        """nnU-Net's estimate for the planned network plus SAM and t_max + 1 evaluations of both heads (training keeps
        all of them for the backward pass)."""
        return self.backbone.compute_conv_feature_map_size(input_size) + \
            self.actor_critic.compute_conv_feature_map_size(input_size, self.steps + 1)


def build_pixel_rl_network(backbone: nn.Module, num_classes: int, hyperparameters: PixelRLSettings) -> PixelRLNetwork:
    """The actor-critic sized and typed from the planned network (its conv, norm and nonlinearity, the channels of
    its last decoder stage), the policy started so that a sampled episode keeps a label through all t_max steps with
    probability ``initial_episode_keep_probability`` (per step its t_max-th root)."""
    encoder = backbone.encoder
    actor_critic = VoxelActorCritic(
        feature_channels=encoder.output_channels[0], state_channels=num_classes, num_actions=NUM_ACTIONS,
        conv_op=encoder.conv_op, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
        nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs, head_channels=hyperparameters.head_channels,
        dilations=hyperparameters.head_dilations, use_sam=hyperparameters.use_sam,
        omega_kernel_size=hyperparameters.omega_kernel_size)
    probabilities = [0.0] * NUM_ACTIONS
    probabilities[KEEP] = hyperparameters.initial_episode_keep_probability ** (1 / hyperparameters.t_max)
    probabilities[SET_TO_BACKGROUND] = 1 - probabilities[KEEP]
    actor_critic.bias_policy(probabilities)
    return PixelRLNetwork(backbone, actor_critic, num_classes, hyperparameters.t_max,
                          hyperparameters.proposal_threshold)

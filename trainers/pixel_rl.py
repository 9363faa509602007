"""``nnUNetTrainerPixelRL``: PixelDRL-MG's per-voxel actor-critic refinement on nnU-Net's planned network.

Y. Liu, D. Yuan, Z. Xu, Y. Zhan, H. Zhang, J. Lu, T. Lukasiewicz, "Pixel level deep reinforcement learning for
accurate and robust medical image segmentation", Scientific Reports (published 10 March 2025; our copy of the paper
gives no DOI), eqs. 1, 8, 12-16, Algorithm 1, Table 3.

The trainer wires the components into nnU-Net's hooks:

- ``build_network_architecture``: the planned network with the actor-critic heads
  (:class:`~nnunet_rl.pixel_rl.PixelRLNetwork`); ``nnUNetv2_predict`` rebuilds it and gets, per window, the logits
  of the map after t_max greedy steps (:func:`~nnunet_rl.pixel_rl.refined_logits`);
- ``_build_loss`` (shared, :class:`~nnunet_rl.trainers.voxel_agents.VoxelAgentsTrainer`): nnU-Net's loss, to which
  the RL phase adds the episode's A2C losses, so that nnU-Net's ``train_step`` does one forward, one backward (mixed
  precision, gradient clipping) and one step of its optimiser for the planned network, the heads and ω alike;
- ``train_step``: the first ``backbone_fraction`` of the epochs are nnU-Net's; then every step also runs an episode
  on the batch, rewarded by its ground truth (eq. 12);
- ``validation_step``: in the RL phase nnU-Net's validation (its pseudo Dice, hence ``checkpoint_best``) measures the
  refined output, and the Dice of every greedy step f(0) … f(t_max) is recorded (``pixel_rl_steps.json`` / ``.png``)
  with the action maps of one validation patch (``pixel_rl_actions.png``, Fig. 4).
"""
import math
from os.path import join

import numpy as np
import torch
from torch import nn

from nnunet_rl.agent_figures import actions_patch, plot_actions
from nnunet_rl.pixel_rl import Episode, PixelRLNetwork, build_pixel_rl_network
from nnunet_rl.plans.rl_block import PixelRLSettings
from nnunet_rl.trainers.schedules import short_schedule_variants
from nnunet_rl.trainers.voxel_agents import VoxelAgentsTrainer, finite_mean
from nnunet_rl.voxel_actor_critic import full_resolution

COMPONENT = "pixel_rl"
TELEMETRY = ("pixel_rl/reward", "pixel_rl/changed_fraction", "pixel_rl/policy_loss", "pixel_rl/value_loss",
             "pixel_rl/skipped_updates", "pixel_rl/omega_sum", "pixel_rl/val_dice_initial",
             "pixel_rl/val_dice_refined")
ACTIONS_FIGURE = "pixel_rl_actions.png"


class nnUNetTrainerPixelRL(VoxelAgentsTrainer):
    """Planned U-Net + PixelDRL-MG's policy/value heads with SAM and DC, trained by A2C after an nnU-Net phase."""
    component = COMPONENT
    acts_on_label_maps = "refines label maps with the actions {background, keep}"
    shuffle_rewards = False
    _figure_patch: dict | None = None  # the last RL validation epoch's first patch (agent_figures.actions_patch)

    @classmethod
    def with_agents(cls, planned: nn.Module, num_input_channels: int, num_output_channels: int,
                    hyperparameters: PixelRLSettings) -> nn.Module:
        return build_pixel_rl_network(planned, num_output_channels, hyperparameters)

    @property
    def rl_module(self) -> nn.Module:
        """The heads and ω."""
        return self.pixel_rl_network.actor_critic

    def initialize(self) -> None:
        super().initialize()
        hp = self.rl_hyperparameters(COMPONENT)
        self.gamma = hp.gamma
        self.rl_gradient_to_backbone = hp.rl_gradient_to_backbone
        self.rl_start_epoch = math.floor(hp.backbone_fraction * self.num_epochs)
        self.action_generator = torch.Generator(device=self.device).manual_seed(hp.seed)
        self.register_telemetry(*TELEMETRY)
        self._episodes: list[Episode] = []
        self._step_confusions: list[torch.Tensor] = []
        self.step_dice_history: dict[int, list[float]] = {}

    @property
    def pixel_rl_network(self) -> PixelRLNetwork:
        return self.bare_network

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._episodes = []

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; in the RL phase on the refined output (its one forward refines once), recording
        each greedy step's counts, and of the epoch's first batch the first patch for ``pixel_rl_actions.png``."""
        if not self.in_rl_phase():
            return super().validation_step(batch)
        reference = self.validation_reference(batch)
        with self.pixel_rl_network.refining() as episodes:
            result = super().validation_step(batch)
        (maps,) = episodes
        self.record_step_counts(maps, reference)
        if len(self._step_confusions) == 1:
            self._figure_patch = actions_patch(batch["data"], reference, maps,
                                               self.label_manager.num_segmentation_heads)
        return result

    def log_step_dice(self, dice: list[float]) -> None:
        self.log_telemetry("pixel_rl/val_dice_initial", dice[0])
        self.log_telemetry("pixel_rl/val_dice_refined", dice[-1])

    def train_step(self, batch: dict) -> dict:
        objective = self.episode_loss if self.in_rl_phase() else \
            lambda output, target: self.idle_term(self.rl_module)
        with self.loss.adding(objective):
            return super().train_step(batch)

    def episode_loss(self, output, target) -> torch.Tensor:
        """An episode from f(0) (the network's initial map of the full-resolution output) against the full-resolution
        target; its A2C losses, or zero (recorded as skipped) when they are not finite."""
        network = self.pixel_rl_network
        reference, valid = self.reference_and_valid(target)
        features = network.take_features()
        if not self.rl_gradient_to_backbone:
            features = features.detach()
        episode = network.training_episode(network.initial_map(full_resolution(output).detach()), features, reference,
                                           self.gamma,
                                           self.action_generator, valid, self.shuffle_rewards)
        self._episodes.append(episode)
        return self.idle_term(self.rl_module) if episode.losses is None else episode.losses.total

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        if not self._episodes:
            return
        self.log_telemetry("pixel_rl/reward", finite_mean(np.mean(e.mean_rewards) for e in self._episodes))
        self.log_telemetry("pixel_rl/changed_fraction",
                           np.mean([np.mean(e.changed_fractions) for e in self._episodes]))
        self.log_updates(self._episodes, self.pixel_rl_network.actor_critic.returns.omega)

    def on_train_end(self) -> None:
        """nnU-Net's end of training; on rank 0 ``pixel_rl_steps.json`` / ``.png`` and, when an RL validation epoch ran
        in this process (not kept across ``--c``), ``pixel_rl_actions.png`` of its last one."""
        super().on_train_end()
        self.save_steps_record()
        if self.local_rank == 0 and self._figure_patch is not None:
            plot_actions(self._figure_patch, join(self.output_folder, ACTIONS_FIGURE))


class nnUNetTrainerPixelRL_noSAM(nnUNetTrainerPixelRL):
    """PA3C + DC without the self-attention module (Table 3)."""
    rl_overrides = {COMPONENT: {"use_sam": False}}


class nnUNetTrainerPixelRL_noDC(nnUNetTrainerPixelRL):
    """PA3C + SAM with undilated heads (Table 3): the same layers and widths, every dilation 1."""
    rl_overrides = {COMPONENT: {"head_dilations": [1, 1, 1]}}


class nnUNetTrainerPixelRL_shuffledReward(nnUNetTrainerPixelRL):
    """The learning experiment's control, not a method: each step's rewards are permuted across the voxels of each
    patch, so the heads train on the same reward distribution without knowing which voxel earned what."""
    shuffle_rewards = True


class nnUNetTrainerPixelRL_allForeground(nnUNetTrainerPixelRL):
    """Our reading of the paper's initial state: f(0) gives every voxel its most probable foreground label
    (``proposal_threshold`` 1), so that the agents, not the planned network's output layer, decide what is background
    (the paper's state starts from the image, s(0) = I, and its agents set pixels to zero)."""
    rl_overrides = {COMPONENT: {"proposal_threshold": 1.0}}


class nnUNetTrainerPixelRL_allForeground_shuffledReward(nnUNetTrainerPixelRL_allForeground):
    """The control of ``_allForeground`` in the learning experiment, not a method: rewards permuted across voxels as
    in ``_shuffledReward``."""
    shuffle_rewards = True


class nnUNetTrainerPixelRL_pretrained(nnUNetTrainerPixelRL):
    """The RL phase from the first epoch (``backbone_fraction`` 0), for a backbone trained before the run: train with
    ``-pretrained_weights`` from ``nnunet-rl pretrained-weights`` (a stock nnUNetTrainer checkpoint converted)."""
    rl_overrides = {COMPONENT: {"backbone_fraction": 0.0}}


STEP_STUDY = {f"nnUNetTrainerPixelRL_tmax{steps}": type(
    f"nnUNetTrainerPixelRL_tmax{steps}", (nnUNetTrainerPixelRL,),
    {"rl_overrides": {COMPONENT: {"t_max": steps}}, "__module__": __name__,
     "__doc__": f"PixelDRL-MG with t_max = {steps} steps per episode, in training and prediction "
                f"(the paper's Fig. 7)."})
    for steps in range(1, 11)}
globals().update(STEP_STUDY)

SHORT_SCHEDULES = short_schedule_variants(
    (nnUNetTrainerPixelRL, nnUNetTrainerPixelRL_noSAM, nnUNetTrainerPixelRL_noDC,
     nnUNetTrainerPixelRL_shuffledReward, nnUNetTrainerPixelRL_allForeground,
     nnUNetTrainerPixelRL_allForeground_shuffledReward, nnUNetTrainerPixelRL_pretrained), __name__)
globals().update(SHORT_SCHEDULES)

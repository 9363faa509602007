"""``nnUNetTrainerMRLSeg``: MRL-Seg's per-voxel {mask, retain} agents on the input of nnU-Net's planned U-Net.

F. Yang, X. Li, H. Duan, F. Xu, Y. Huang, X. Zhang, Y. Long, Y. Zheng, "MRL-Seg: Overcoming imbalance in medical
image segmentation with multi-step reinforcement learning", IEEE Journal of Biomedical and Health Informatics 28(2),
858-869 (2024), DOI 10.1109/jbhi.2023.3336726, eqs. 3-13, Table V, Fig. 9.

The trainer wires the components into nnU-Net's hooks:

- ``build_network_architecture``: the planned U-Net (Segmentation-Net) with the Reinforcement-Net
  (:class:`~nnunet_rl.mrl_seg.MRLSegNetwork`); ``nnUNetv2_predict`` rebuilds it and gets, per window, the
  Segmentation-Net's logits of the input after ``steps`` greedy masking steps;
- ``_build_loss`` (shared, :class:`~nnunet_rl.trainers.voxel_agents.VoxelAgentsTrainer`): nnU-Net's loss, to which
  the RL phase adds the episode's A2C losses: one forward, one backward, one step of nnU-Net's optimiser;
- ``on_train_epoch_start``: the first ``segmentation_fraction`` of the epochs pre-train the Segmentation-Net with
  nnU-Net's loss; at the first RL epoch the Reinforcement-Net's encoder is initialised from it (Table V);
- ``train_step``: in the RL phase every step runs a sampled episode on the batch (rewards eqs. 3-5, returns
  eqs. 10-12), and nnU-Net's loss trains the Segmentation-Net on the input masked by the greedy policy (what
  prediction feeds it);
- ``validation_step``: in the RL phase nnU-Net's validation (its pseudo Dice, hence ``checkpoint_best``) measures
  the Segmentation-Net on the greedily masked input, and the Dice of every step's s(t) is recorded
  (``mrl_seg_steps.json`` / ``.png``) with the masks of one validation patch (``mrl_seg_masks.png``, Fig. 9).
"""
import math
from os.path import join

import numpy as np
import torch
from torch import nn

from nnunet_rl.agent_figures import middle_plane, plot_panels
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.mrl_seg import (Episode, GreedyEpisode, MRLSegNetwork, RewardSettings, build_mrl_seg_network,
                               dataset_foreground_ratio, masked_input)
from nnunet_rl.plans.rl_block import DatasetFacts, MRLSegSettings
from nnunet_rl.trainers.schedules import short_schedule_variants
from nnunet_rl.trainers.voxel_agents import VoxelAgentsTrainer, finite_mean

COMPONENT = "mrl_seg"
MASKS_FIGURE = "mrl_seg_masks.png"


class nnUNetTrainerMRLSeg(VoxelAgentsTrainer):
    """Planned U-Net as Segmentation-Net + MRL-Seg's Reinforcement-Net masking its input, trained by A2C after an
    nnU-Net pre-training phase."""
    component = COMPONENT
    acts_on_label_maps = "rewards the cross-entropy of label maps (eq. 4)"
    shuffle_rewards = False

    @classmethod
    def with_agents(cls, planned: nn.Module, num_input_channels: int, num_output_channels: int,
                    hyperparameters: MRLSegSettings) -> nn.Module:
        return build_mrl_seg_network(planned, num_input_channels, hyperparameters)

    def initialize(self) -> None:
        super().initialize()
        hp = self.rl_hyperparameters(COMPONENT)
        self.pretrain = hp.pretrain
        self.rl_start_epoch = math.floor(hp.segmentation_fraction * self.num_epochs) if self.pretrain else 0
        self.reward_settings = RewardSettings(
            gamma=hp.gamma, alpha=hp.alpha, beta=hp.beta, empty_ratio=self._dataset_foreground_ratio(hp),
            use_prior=hp.use_prior, use_difficulty=hp.use_difficulty, window=hp.omega_kernel_size,
            shuffle_rewards=self.shuffle_rewards)
        self.action_generator = torch.Generator(device=self.device).manual_seed(hp.seed)
        self.steps = hp.steps
        self.register_telemetry(*self.telemetry_keys())
        self._episodes: list[Episode] = []
        self._step_confusions: list[torch.Tensor] = []
        self._figure_patch: dict | None = None
        self.step_dice_history: dict[int, list[float]] = {}

    def _dataset_foreground_ratio(self, hp: MRLSegSettings) -> float | None:
        """N_F/N_B of the dataset (the rl block's ``label_fractions``), eq. 3's value for patches without
        foreground."""
        if not hp.use_prior:
            return None
        fractions = DatasetFacts.from_block(self.rl_block).label_fractions
        if not fractions:
            raise NnunetRLError(f"{type(self).__name__} needs the dataset's label fractions in the plans' rl block "
                                f"(derived from gt_segmentations); rerun `nnunet-rl plan "
                                f"{self.plans_manager.dataset_name} -c {self.configuration_name}`")
        try:
            return dataset_foreground_ratio(fractions)
        except ValueError as error:
            raise NnunetRLError(f"the plans' rl block: {error}") from error

    def telemetry_keys(self) -> list[str]:
        """Per step t: the mean reward r*(t), the masked fraction after t (training) and the validation Dice of
        s(t) (t = 0: the unmasked input)."""
        return [*(f"mrl_seg/reward_step{t}" for t in range(1, self.steps + 1)),
                *(f"mrl_seg/masked_fraction_step{t}" for t in range(1, self.steps + 1)),
                *(f"mrl_seg/val_dice_step{t}" for t in range(self.steps + 1)),
                "mrl_seg/policy_loss", "mrl_seg/value_loss", "mrl_seg/skipped_updates", "mrl_seg/omega_sum"]

    @property
    def mrl_seg_network(self) -> MRLSegNetwork:
        return self.bare_network

    @property
    def rl_module(self) -> nn.Module:
        """The Reinforcement-Net: its encoder, heads and w."""
        return self.mrl_seg_network.reinforcement

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._episodes = []
        if self.pretrain and self.current_epoch == self.rl_start_epoch:
            self.mrl_seg_network.warm_start_from_planned()
            self.print_to_log_file("mrl_seg: Reinforcement-Net encoder initialised from the Segmentation-Net")

    def train_step(self, batch: dict) -> dict:
        if not self.in_rl_phase():
            with self.loss.adding(lambda output, target: self.idle_term(self.rl_module)):
                return super().train_step(batch)
        reference, valid = self.reference_and_valid(self.batch_to_device(batch)[1])
        with self.mrl_seg_network.training_episodes(reference, valid, self.reward_settings,
                                                    self.action_generator) as episodes:
            with self.loss.adding(lambda output, target: self._episode_loss(episodes[-1], output)):
                return super().train_step(batch)

    def _episode_loss(self, episode: Episode, output) -> torch.Tensor:
        """The episode's A2C losses, or a zero gradient for the Reinforcement-Net (recorded as skipped) when they are
        not finite."""
        self._episodes.append(episode)
        if episode.losses is None:
            return self.idle_term(self.rl_module)
        return episode.losses.total

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; in the RL phase on the greedily masked input, recording each step's counts."""
        if not self.in_rl_phase():
            return super().validation_step(batch)
        data, reference = self.batch_to_device(batch)[0], self.validation_reference(batch)
        with self.mrl_seg_network.recording() as episodes:
            result = super().validation_step(batch)
        (episode,) = episodes
        self.record_step_counts(episode.maps, reference)
        if len(self._step_confusions) == 1:
            self._figure_patch = figure_patch(data, reference, episode)
        return result

    def log_step_dice(self, dice: list[float]) -> None:
        for t, value in enumerate(dice):
            self.log_telemetry(f"mrl_seg/val_dice_step{t}", value)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        if not self._episodes:
            return
        for t in range(self.steps):
            self.log_telemetry(f"mrl_seg/reward_step{t + 1}", finite_mean(e.mean_rewards[t] for e in self._episodes))
            self.log_telemetry(f"mrl_seg/masked_fraction_step{t + 1}",
                               np.mean([e.masked_fractions[t] for e in self._episodes]))
        self.log_updates(self._episodes, self.mrl_seg_network.reinforcement.omega)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank != 0:
            return
        self.save_steps_record()
        if self._figure_patch is not None:
            plot_masks(self._figure_patch, join(self.output_folder, MASKS_FIGURE))


def figure_patch(data: torch.Tensor, reference: torch.Tensor, episode: GreedyEpisode) -> dict:
    """The first patch of a validation batch as 2D arrays (3D: its middle slice along the first axis,
    :func:`~nnunet_rl.agent_figures.middle_plane`): the input's first channel, the masked input, each step's mask, the
    reference and the final segmentation."""
    masked = masked_input(data, episode.masks[-1])
    return {"input": middle_plane(data[:, 0]), "masked": middle_plane(masked[:, 0]),
            "masks": [middle_plane(mask[:, 0]) for mask in episode.masks[1:]], "reference": middle_plane(reference),
            "segmentation": middle_plane(episode.maps[-1])}


def plot_masks(patch: dict, filename: str) -> None:
    """MRL-Seg's Fig. 9 view for one validation patch: the input, the mask after each greedy step, the masked input,
    the reference and the Segmentation-Net's map of the masked input (:func:`~nnunet_rl.agent_figures.plot_panels`)."""
    plot_panels([("input", patch["input"]),
                 *((f"mask after step {t + 1}", mask) for t, mask in enumerate(patch["masks"])),
                 ("masked input", patch["masked"]), ("reference", patch["reference"]),
                 ("segmentation", patch["segmentation"])], filename)


class nnUNetTrainerMRLSeg_noFB(nnUNetTrainerMRLSeg):
    """Without eq. 3's foreground/background prior (Table V, RL + ADP + Seg)."""
    rl_overrides = {COMPONENT: {"use_prior": False}}


class nnUNetTrainerMRLSeg_noADP(nnUNetTrainerMRLSeg):
    """Without the difficulty term ADP in the returns (eq. 11 with 𝔍 = 0: eq. 12 as printed)."""
    rl_overrides = {COMPONENT: {"use_difficulty": False}}


class nnUNetTrainerMRLSeg_noPretrain(nnUNetTrainerMRLSeg):
    """Table V's "w/o pre-training", which "corresponds to the RL+Seg" (its row ticks neither FB nor ADP): the RL
    phase from the first epoch, the Reinforcement-Net not initialised from a pre-trained Segmentation-Net, without
    eq. 3's prior and without ADP (the paper reports collapse)."""
    rl_overrides = {COMPONENT: {"pretrain": False, "use_prior": False, "use_difficulty": False}}


class nnUNetTrainerMRLSeg_shuffledReward(nnUNetTrainerMRLSeg):
    """The learning experiment's control, not a method: each step's rewards r* are permuted across the voxels of each
    patch, so the Reinforcement-Net trains on the same reward distribution without knowing which voxel earned what."""
    shuffle_rewards = True


class nnUNetTrainerMRLSeg_pretrained(nnUNetTrainerMRLSeg):
    """The RL phase from the first epoch (``segmentation_fraction`` 0), for a Segmentation-Net trained before the run:
    train with ``-pretrained_weights`` from ``nnunet-rl pretrained-weights`` (a stock nnUNetTrainer checkpoint
    converted). ``pretrain`` stays on: at epoch 0 the Reinforcement-Net's encoder is copied from the loaded
    Segmentation-Net, as at the first RL epoch of an in-run pre-training."""
    rl_overrides = {COMPONENT: {"segmentation_fraction": 0.0}}


SHORT_SCHEDULES = short_schedule_variants(
    (nnUNetTrainerMRLSeg, nnUNetTrainerMRLSeg_noFB, nnUNetTrainerMRLSeg_noADP, nnUNetTrainerMRLSeg_noPretrain,
     nnUNetTrainerMRLSeg_shuffledReward, nnUNetTrainerMRLSeg_pretrained), __name__)
globals().update(SHORT_SCHEDULES)

"""What the trainers of per-voxel agents share (``nnUNetTrainerPixelRL``, ``nnUNetTrainerMRLSeg``).

Both add an A2C-trained module (PixelDRL-MG's heads and ω; MRL-Seg's Reinforcement-Net and w) to nnU-Net's planned
network and train it inside nnU-Net's ``train_step``. :class:`VoxelAgentsTrainer` holds what they do alike; each
trainer names its rl block section (``component``) and the module its agents learn in (:attr:`rl_module`).
"""
from contextlib import contextmanager
from os.path import join

import matplotlib.pyplot as plt
import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.heads_optimizer import SGDWithAdamHeads
from nnunet_rl.pixel_rl import dice_per_step, step_confusion
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY
from nnunet_rl.trainers.base import RLTrainerBase
from nnunet_rl.voxel_actor_critic import full_resolution

HEADS_OPTIMIZERS = ("adam", "sgd")


def finite_mean(values) -> float:
    """The mean of the finite ``values`` (NaN when none is): an epoch's telemetry over its episodes, of which those
    skipped for non-finite rewards would otherwise turn the epoch's mean into NaN."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def plot_dice_per_step(history: dict[int, list[float]], filename: str) -> None:
    """PixelDRL-MG's Fig. 4 view: validation Dice against step t, for the first and the last RL epoch."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for epoch in sorted({min(history), max(history)}):
        axis.plot(range(len(history[epoch])), history[epoch], marker="o", label=f"epoch {epoch}")
    axis.set_xlabel("step t (0: before the agents act)")
    axis.set_ylabel("mean foreground Dice, validation patches")
    axis.legend()
    figure.tight_layout()
    figure.savefig(filename)
    plt.close(figure)


class PlusEpisodeLoss(nn.Module):
    """nnU-Net's loss, plus ``objective(output, target)`` while :meth:`adding` is active (the RL phase's steps)."""

    def __init__(self, segmentation_loss: nn.Module):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.objective = None

    @contextmanager
    def adding(self, objective):
        self.objective = objective
        try:
            yield
        finally:
            self.objective = None

    def forward(self, output, target) -> torch.Tensor:
        loss = self.segmentation_loss(output, target)
        return loss if self.objective is None else loss + self.objective(output, target)


class VoxelAgentsTrainer(RLTrainerBase):
    """Base of the per-voxel agents' trainers: nnU-Net's loss plus the episode's (:class:`PlusEpisodeLoss`), the
    agents' optimiser, the reference an episode is rewarded against, and the RL state in the checkpoint (the action
    sampler ``self.action_generator`` and the per-step validation Dice ``self.step_dice_history``, which subclasses
    set up in ``initialize``; the agents' weights and optimiser state are in nnU-Net's own entries)."""
    component: str  # the rl block's section, with the keys ``heads_optimizer`` and ``heads_lr``
    acts_on_label_maps: str  # what the agents do that region-based training (overlapping labels) leaves undefined
    rl_start_epoch: int  # the first epoch of the RL phase, set by the subclass's ``initialize``
    action_generator: torch.Generator
    step_dice_history: dict[int, list[float]]

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The planned network with the agents' networks around it (:meth:`with_agents`); ``nnUNetv2_predict`` calls
        this without a trainer, so the hyperparameters come from the plans and the class."""
        planned = RLTrainerBase.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        hp = cls.hyperparameters_from(configuration_manager.configuration.get(RL_BLOCK_KEY, {}), cls.component)
        return cls.with_agents(planned, num_input_channels, num_output_channels, hp)

    @classmethod
    def with_agents(cls, planned: nn.Module, num_input_channels: int, num_output_channels: int,
                    hyperparameters: dict) -> nn.Module:
        """The component's network around ``planned`` (nnU-Net's planned network), from its ``hyperparameters``."""
        raise NotImplementedError

    def initialize(self) -> None:
        """Refuses region-based training before nnU-Net builds the network: the agents act on label maps."""
        if self.label_manager.has_regions:
            raise NnunetRLError(f"{type(self).__name__} {self.acts_on_label_maps}; this dataset is trained on regions "
                                f"(overlapping labels), for which that is not defined")
        super().initialize()

    def _do_i_compile(self) -> bool:
        """Not compiled: the episode's loop and sampling run outside the planned network's graph."""
        return False

    def _build_loss(self) -> nn.Module:
        return PlusEpisodeLoss(super()._build_loss())

    def in_rl_phase(self) -> bool:
        return self.current_epoch >= self.rl_start_epoch

    def reference_and_valid(self, target) -> tuple[torch.Tensor, torch.Tensor | None]:
        """From nnU-Net's target(s): the full-resolution reference (B, *spatial) with the ignore label set to 0, and
        the valid voxels (B, 1, *spatial), None without an ignore label."""
        reference = full_resolution(target)[:, 0].long()
        ignore_label = self.label_manager.ignore_label
        if ignore_label is None:
            return reference, None
        valid = (reference != ignore_label)[:, None]
        return torch.where(valid[:, 0], reference, torch.zeros_like(reference)), valid

    @property
    def rl_module(self) -> nn.Module:
        """The module the A2C losses train (the agents' networks and ω)."""
        raise NotImplementedError

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule; with ``heads_optimizer`` "adam" (both papers train their agents with
        Adam), :attr:`rl_module` leaves the SGD for an Adam at ``heads_lr`` (poly-decayed like the rest), inside one
        optimiser nnU-Net's ``train_step`` drives (:class:`~nnunet_rl.heads_optimizer.SGDWithAdamHeads`)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        hp = self.rl_hyperparameters(self.component)
        if hp.heads_optimizer not in HEADS_OPTIMIZERS:
            raise NnunetRLError(f"{self.component} heads_optimizer must be 'adam' or 'sgd', not "
                                f"{hp.heads_optimizer!r}")
        if hp.heads_optimizer == "sgd":
            return optimizer, lr_scheduler
        heads = list(self.rl_module.parameters())
        ids = {id(p) for p in heads}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer = SGDWithAdamHeads(optimizer, heads, hp.heads_lr / self.initial_lr)
        return optimizer, type(lr_scheduler)(optimizer, self.initial_lr, self.num_epochs)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._step_confusions: list[torch.Tensor] = []

    def validation_reference(self, batch: dict) -> torch.Tensor:
        """A validation batch's full-resolution reference (B, *spatial), ignore label included: a copy taken before
        nnU-Net's validation step, which overwrites the ignore label in place."""
        return full_resolution(self.batch_to_device(batch)[1])[:, 0].long().clone()

    def record_step_counts(self, maps: list[torch.Tensor], reference: torch.Tensor) -> None:
        """One validation batch's counts for each step's map (:func:`~nnunet_rl.pixel_rl.step_confusion`)."""
        self._step_confusions.append(step_confusion(maps, reference, self.label_manager.num_segmentation_heads,
                                                    self.label_manager.ignore_label))

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        if self._step_confusions:
            dice = dice_per_step(torch.stack(self._step_confusions).sum(dim=0))
            self.step_dice_history[self.current_epoch] = dice
            self.log_step_dice(dice)

    def log_step_dice(self, dice: list[float]) -> None:
        """Telemetry of an RL epoch's validation Dice per step (f(0) … f(T))."""
        raise NotImplementedError

    def log_updates(self, episodes: list, omega: nn.Module) -> None:
        """``<component>/skipped_updates``, ``omega_sum``, ``policy_loss`` and ``value_loss`` of the epoch's episodes
        (each with ``losses``, None where skipped); skipped updates also go to the training log."""
        finite = [episode.losses for episode in episodes if episode.losses is not None]
        skipped = len(episodes) - len(finite)
        self.log_telemetry(f"{self.component}/skipped_updates", skipped)
        self.log_telemetry(f"{self.component}/omega_sum", float(omega.weight.detach().sum()))
        if finite:
            for name in ("policy", "value"):
                self.log_telemetry(f"{self.component}/{name}_loss",
                                   np.mean([float(getattr(losses, name).detach()) for losses in finite]))
        if skipped:
            self.print_to_log_file(f"{self.component}: {skipped} of {len(episodes)} updates skipped for non-finite "
                                   f"rewards, returns, values or advantages")

    def save_steps_record(self) -> None:
        """``<component>_steps.json`` (validation Dice per step, every RL epoch) and ``<component>_steps.png`` in the
        fold folder, on rank 0."""
        if self.step_dice_history and self.local_rank == 0:
            self.save_fold_json(f"{self.component}_steps.json", {"dice_per_step": self.step_dice_history})
            plot_dice_per_step(self.step_dice_history, join(self.output_folder, f"{self.component}_steps.png"))

    def rl_state_dict(self) -> dict:
        """The sampler and the per-step Dice record (the agents' weights and optimiser are in nnU-Net's entries)."""
        return {"action_generator": self.action_generator.get_state(), "step_dice_history": self.step_dice_history}

    def load_rl_state_dict(self, state: dict) -> None:
        self.action_generator.set_state(state["action_generator"])
        self.step_dice_history = {int(epoch): dice for epoch, dice in state["step_dice_history"].items()}

"""What every nnunet_rl trainer shares: the plans' ``rl`` block, telemetry, and RL state in the checkpoint."""
import json
import os
from contextlib import contextmanager
from functools import cached_property
from os.path import join
from typing import Union
from unittest import mock

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_rl.plans.rl_block import read_rl_block, rl_section
from nnunet_rl.telemetry import RLLocalLogger

CHECKPOINT_KEY = "nnunet_rl"


@contextmanager
def extra_checkpoint_entries(entries: dict):
    """Add ``entries`` to the dict nnU-Net's ``save_checkpoint`` passes to ``torch.save``.

    nnU-Net builds and writes its checkpoint dict in one method with no hook; intercepting the single
    ``torch.save`` call keeps one write, one file and nnU-Net's own checkpoint layout.
    """
    save = torch.save

    def save_with_entries(obj, filename, *args, **kwargs):
        save({**obj, **entries}, filename, *args, **kwargs)

    with mock.patch.object(torch, "save", save_with_entries):
        yield


@contextmanager
def checkpoint_already_loaded(checkpoint: dict):
    """Hand ``checkpoint`` to nnU-Net's ``load_checkpoint`` in place of its own ``torch.load``.

    The file is read once, by us, for nnU-Net's entries and ours alike. It also lets a checkpoint dict be
    passed, which nnU-Net 2.8's ``load_checkpoint`` accepts in its signature but fails on.
    """
    with mock.patch.object(torch, "load", lambda *args, **kwargs: checkpoint):
        yield


class AtomicCheckpointTrainer(nnUNetTrainer):
    """nnU-Net's trainer whose checkpoints are written whole or not at all.

    nnU-Net saves ``checkpoint_latest.pth`` in place, so a run killed while ``torch.save`` writes it leaves a torn
    file that ``--c`` cannot load: the run is lost, not interrupted. Here nnU-Net writes the checkpoint beside the
    target and it is moved over it in one step (``os.replace``), so an interrupted run keeps its last complete
    checkpoint. The base of all our trainers.
    """

    def save_checkpoint(self, filename: str) -> None:
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.isfile(partial):  # nnU-Net writes on rank 0 only, and nothing with checkpointing disabled
            os.replace(partial, filename)


class RLTrainerBase(AtomicCheckpointTrainer):
    """Base of our RL trainers. Subclasses declare their state and telemetry; nnU-Net's loop does the rest.

    - ``self.rl_block``: the configuration's ``rl`` block from the plans (derived when absent);
      ``rl_hyperparameters(component)``: one component's section, paper defaults overridden by the plans, then by
      the class's ``rl_overrides`` (how variants such as ablations pin a hyperparameter, nnU-Net style).
    - ``register_telemetry(*keys)`` / ``log_telemetry(key, value)``: per-epoch scalars in nnU-Net's logger,
      ``progress.png`` (extra panel) and W&B; keys not logged in an epoch get NaN.
    - ``rl_state_dict()`` / ``load_rl_state_dict(state)``: saved inside nnU-Net's checkpoint under
      ``"nnunet_rl"`` and restored by ``--c``.
    """

    rl_overrides: dict[str, dict] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = RLLocalLogger(self.logger.local_logger.verbose)

    @staticmethod
    def zero_gradient_term(module: torch.nn.Module) -> torch.Tensor:
        """0 · Σ of ``module``'s parameters: a loss term that gives them a zero gradient. nnU-Net's DDP wrapper (without
        ``find_unused_parameters``, and blind to parameters used outside ``forward``, such as heads run in the loss)
        expects a gradient for every parameter in every step; heads that a step does not use (before their phase, or
        when an episode is skipped) get one from this term."""
        return sum(parameter.sum() for parameter in module.parameters()) * 0.0

    def idle_term(self, module: torch.nn.Module) -> torch.Tensor:
        """The loss term of a step that does not use ``module``: under DDP :meth:`zero_gradient_term` (the optimiser's
        momentum then still moves it), otherwise 0, so that its parameters get no gradient and no update."""
        return self.zero_gradient_term(module) if self.is_ddp else torch.zeros((), device=self.device)

    @cached_property
    def rl_block(self) -> dict:
        """The configuration's rl block, read (or derived) on first use."""
        gt_folder = join(self.preprocessed_dataset_folder_base, "gt_segmentations") \
            if self.preprocessed_dataset_folder_base is not None else None
        return read_rl_block(self.configuration_manager, self.dataset_json, gt_folder)

    @classmethod
    def hyperparameters_from(cls, block: dict, component: str):
        """A component's settings (its ``plans.rl_block.COMPONENT_SETTINGS`` class) from ``block`` with this class's
        overrides; usable where only the plans are at hand (``build_network_architecture`` is called by nnU-Net's
        predictor without a trainer instance)."""
        pinned = {**block.get(component, {}), **cls.rl_overrides.get(component, {})}
        return rl_section({**block, component: pinned}, component)

    def rl_hyperparameters(self, component: str):
        """The component's settings: paper defaults overridden by the plans' rl block and the class."""
        return self.hyperparameters_from(self.rl_block, component)

    @property
    def bare_network(self) -> torch.nn.Module:
        """The network without nnU-Net's DDP and torch.compile wrappers."""
        network = self.network.module if self.is_ddp else self.network
        return getattr(network, "_orig_mod", network)

    def register_telemetry(self, *keys: str) -> None:
        for key in keys:
            self.logger.local_logger.register(key)

    def log_telemetry(self, key: str, value: float) -> None:
        self.logger.log(key, float(value), self.current_epoch)

    def batch_to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """A batch's data and target(s) on the trainer's device, as nnU-Net's ``train_step`` moves them."""
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        return batch["data"].to(self.device, non_blocking=True), target

    def save_fold_json(self, filename: str, content: dict) -> None:
        """Write ``content`` as JSON into the fold's output folder (once, on rank 0): what an RL component learned."""
        if self.local_rank == 0:
            with open(join(self.output_folder, filename), "w") as file:
                json.dump(content, file, indent=2)

    def rl_state_dict(self) -> dict:
        """State of the RL components that nnU-Net's checkpoint does not hold already."""
        return {}

    def load_rl_state_dict(self, state: dict) -> None:
        """Restore what :meth:`rl_state_dict` returned."""

    def on_epoch_end(self):
        self.logger.local_logger.fill_missing(self.current_epoch)
        super().on_epoch_end()

    def save_checkpoint(self, filename: str) -> None:
        with extra_checkpoint_entries({CHECKPOINT_KEY: self.rl_state_dict()}):
            super().save_checkpoint(filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not self.was_initialized:  # before torch.load is redirected: nothing else may receive the checkpoint
            self.initialize()
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        with checkpoint_already_loaded(checkpoint):
            super().load_checkpoint(filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "<dict>")
        if CHECKPOINT_KEY in checkpoint:
            self.load_rl_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            self.print_to_log_file("WARNING: the checkpoint holds no nnunet_rl state; RL components start afresh")

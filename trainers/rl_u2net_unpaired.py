"""``nnUNetTrainerRLU2Net_unpaired``: RL-U2Net on two single-modality datasets (MM-WHS 2017 as distributed).

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI): CT and MRI branches (Fig. 6), RL-XAlign between their
encoders (eqs. 1-13), each branch's Dice + CE balanced by AGWD (eqs. 18-20), per-modality Dice (Tables 1 and 3).

``nnUNetv2_train PRIMARY ... -tr nnUNetTrainerRLU2Net_unpaired`` trains the primary branch on the primary dataset and
the auxiliary branch on the dataset the plans name (``rl_u2net.unpaired``, from ``nnunet-rl plan-unpaired``). On
top of :class:`~nnunet_rl.trainers.rl_u2net.nnUNetTrainerRLU2Net` it only changes where data comes from and where
results go:

- ``rl_overrides``: no alignment loss (λ₁ = 0 in eq. 20) and no S_similarity in the PPO reward (eq. 9): both compare
  sample i of the CT batch with sample i of the MRI batch voxel by voxel, and these are crops of different patients;
- ``initialize``: the auxiliary dataset must exist, be preprocessed with the same plans and have the same labels (no
  cascade, as for :class:`nnUNetTrainerRLU2Net`);
- ``build_network_architecture``: :class:`~nnunet_rl.unpaired.UnpairedDualBranchUNet`, predicting the branch of the
  dataset whose plans it is built from;
- ``get_dataloaders``: nnU-Net's own dataloaders and augmentation, once per dataset (each with its own fold split),
  joined by :class:`~nnunet_rl.unpaired.JointLoader`; validation during training: the primary dataset's; each
  branch's reference patch for prediction (:func:`~nnunet_rl.unpaired.reference_patch`: seeded, no augmentation,
  chosen on rank 0 and broadcast), recorded in ``rl_policy.json``;
- ``perform_actual_validation`` / ``save_checkpoint`` / ``on_train_start``: also the auxiliary dataset's validation
  cases, and a model folder in the auxiliary dataset's results (with ``checkpoint_final.pth`` and
  ``checkpoint_best.pth``), so ``nnUNetv2_predict -d AUXILIARY`` and ``nnunet-rl compare AUXILIARY`` work as for any
  nnU-Net model.
"""
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from os.path import basename, isdir, isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p, save_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_rl.augmenters import stop_workers
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY
from nnunet_rl.trainers.rl_u2net import COMPONENT, nnUNetTrainerRLU2Net
from nnunet_rl.unpaired import (JointLoader, UnpairedDatasets, UnpairedDualBranchUNet, check_same_labels,
                                check_same_plans, reference_patch)

REFERENCE_KEY = "reference_patches"  # rl_policy.json and the checkpoint's RL state: where each reference comes from


@dataclass
class DatasetView:
    """The trainer attributes through which nnU-Net's own methods (dataloaders, split, validation, export) reach a
    dataset: swapped in by :meth:`nnUNetTrainerRLU2Net_unpaired.on_dataset` to run them on the auxiliary dataset."""
    preprocessed_dataset_folder_base: str
    preprocessed_dataset_folder: str
    plans_manager: PlansManager
    configuration_manager: ConfigurationManager
    dataset_json: dict
    output_folder_base: str | None
    output_folder: str | None
    dataset_class: type | None = None


class nnUNetTrainerRLU2Net_unpaired(nnUNetTrainerRLU2Net):
    """RL-U2Net with each branch trained on its own dataset, labels and loss (see the module docstring)."""
    rl_overrides = {COMPONENT: {"alignment_weight": 0.0, "reward_similarity_weight": 0.0}}

    def check_channels(self, dataset_json: dict) -> None:
        """Any channel count: the primary dataset's channels feed the primary branch, the auxiliary dataset's the
        other (checked against the plans in :meth:`initialize`)."""

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        hp = cls.hyperparameters_from(configuration_manager.configuration.get(RL_BLOCK_KEY, {}), COMPONENT)
        datasets = UnpairedDatasets.from_section(hp)
        branch = datasets.branch_of(plans_manager.dataset_name)
        expected = len(datasets.sides()[branch].channels)
        if num_input_channels != expected:
            raise NnunetRLError(f"{plans_manager.dataset_name} has {num_input_channels} input channels, its unpaired "
                                f"plans list {expected}: {list(datasets.sides()[branch].channels)}")
        return UnpairedDualBranchUNet(len(datasets.primary.channels), len(datasets.auxiliary.channels),
                                      num_output_channels, configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      patch_size=configuration_manager.patch_size, predicted_branch=branch,
                                      deep_supervision=enable_deep_supervision,
                                      **hp.network_kwargs())

    def initialize(self) -> None:
        if not self.was_initialized:
            self.datasets = UnpairedDatasets.from_section(self.rl_hyperparameters(COMPONENT))
            self.auxiliary = self._auxiliary_view()
            self.reference_records: dict[str, dict] = {}
        super().initialize()

    def _auxiliary_view(self) -> DatasetView:
        """The auxiliary dataset as the trainer sees it, after checking that it is usable with these plans."""
        primary, auxiliary = self.datasets.primary, self.datasets.auxiliary
        if self.plans_manager.dataset_name != primary.dataset or self.plans_manager.plans_name != primary.plans:
            raise NnunetRLError(f"these unpaired plans train {primary.dataset} with plans {primary.plans} (the "
                                f"auxiliary {auxiliary.dataset} trains alongside); got "
                                f"{self.plans_manager.dataset_name} with {self.plans_manager.plans_name}")
        base = join(nnUNet_preprocessed, auxiliary.dataset)
        rerun = f"nnunet-rl plan-unpaired {primary.dataset} {auxiliary.dataset} -c {self.configuration_name} " \
                f"-p {primary.plans}"
        plans_file = join(base, f"{auxiliary.plans}.json")
        if not isfile(plans_file):
            raise NnunetRLError(f"the auxiliary dataset's plans {plans_file} do not exist; run: {rerun}")
        plans = load_json(plans_file)
        check_same_plans(self.plans_manager.plans, plans, self.configuration_name)
        dataset_json = load_json(join(base, "dataset.json"))
        check_same_labels(self.dataset_json, dataset_json, primary.dataset, auxiliary.dataset)
        plans_manager = PlansManager(plans)
        configuration_manager = plans_manager.get_configuration(self.configuration_name)
        folder = join(base, configuration_manager.data_identifier)
        if not isdir(folder):
            raise NnunetRLError(f"the auxiliary dataset is not preprocessed ({folder} is missing); run: {rerun}")
        output_base = join(nnUNet_results, auxiliary.dataset, f"{type(self).__name__}__{auxiliary.plans}__"
                                                              f"{self.configuration_name}") \
            if nnUNet_results.is_set() else None
        return DatasetView(base, folder, plans_manager, configuration_manager, dataset_json, output_base,
                           join(output_base, f"fold_{self.fold}") if output_base is not None else None)

    @contextmanager
    def on_dataset(self, view: DatasetView):
        """Run nnU-Net's own dataset methods on ``view``'s dataset; what they set (the dataset class) stays in it."""
        names = [field.name for field in fields(DatasetView)]
        saved = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, getattr(view, name))
        try:
            yield
        finally:
            view.dataset_class = self.dataset_class
            for name, value in saved.items():
                setattr(self, name, value)

    @contextmanager
    def predicting(self, branch: str):
        """Eval forwards return ``branch``'s logits (its modality's images in, the other branch fed its reference)."""
        network = self.bare_network
        saved, network.predicted_branch = network.predicted_branch, branch
        try:
            yield
        finally:
            network.predicted_branch = saved

    def get_dataloaders(self):
        """nnU-Net's dataloaders for each dataset (its split, its augmentation), joined for training; validation
        during training is the primary dataset's (the eval network predicts the primary branch)."""
        train, validation = super().get_dataloaders()
        with self.on_dataset(self.auxiliary):
            auxiliary_train, auxiliary_validation = super().get_dataloaders()
        stop_workers(auxiliary_validation)
        if not self.bare_network.has_references():  # a resumed run keeps those of its checkpoint
            self._choose_references()
        return JointLoader(train, auxiliary_train), validation

    def _reference_loader(self) -> nnUNetDataLoader:
        """A plain nnU-Net dataloader over the current dataset's fold training cases (no transforms), cropping the
        final patch size (:func:`reference_patch` forces foreground itself)."""
        dataset_tr, _ = self.get_tr_and_val_datasets()
        patch_size = self.configuration_manager.patch_size
        return nnUNetDataLoader(dataset_tr, self.batch_size, patch_size, patch_size, self.label_manager)

    def _choose_references(self) -> None:
        """Each branch's reference patch (:func:`reference_patch`, seeded by the rl block's ``seed``), chosen on rank 0
        and broadcast, so that every DDP rank stores the same one."""
        chosen = [None]
        if self.local_rank == 0:
            seed = self.rl_hyperparameters(COMPONENT).seed
            patches, records = {}, {}
            for branch, view in (("primary", None), ("auxiliary", self.auxiliary)):
                with self.on_dataset(view) if view is not None else nullcontext():
                    patches[branch], records[branch] = reference_patch(self._reference_loader(), seed)
                records[branch]["dataset"] = self.datasets.sides()[branch].dataset
            chosen = [(patches, records)]
        if self.is_ddp:
            torch.distributed.broadcast_object_list(chosen, src=0)
        patches, self.reference_records = chosen[0]
        for branch, patch in patches.items():
            self.bare_network.set_reference(branch, patch.to(self.device))

    def on_train_start(self) -> None:
        super().on_train_start()
        view = self.auxiliary
        if self.local_rank == 0:
            with self.on_dataset(view):
                view.dataset_class.unpack_dataset(view.preprocessed_dataset_folder, overwrite_existing=False,
                                                  num_processes=1, verify=True)
            maybe_mkdir_p(view.output_folder)
            save_json(view.plans_manager.plans, join(view.output_folder_base, "plans.json"), sort_keys=False)
            save_json(view.dataset_json, join(view.output_folder_base, "dataset.json"), sort_keys=False)
            shutil.copyfile(join(view.preprocessed_dataset_folder_base, "dataset_fingerprint.json"),
                            join(view.output_folder_base, "dataset_fingerprint.json"))

    def on_train_end(self) -> None:
        super().on_train_end()
        stop_workers(self.dataloader_train)  # nnU-Net stops only its own augmenter classes

    def save_checkpoint(self, filename: str) -> None:
        """The auxiliary dataset's model folder gets the final and the best checkpoint too (one network for both
        modalities; "best" is nnU-Net's choice by the primary dataset's pseudo Dice)."""
        super().save_checkpoint(filename)
        if basename(filename) in ("checkpoint_final.pth", "checkpoint_best.pth") and self.local_rank == 0 and \
                self.auxiliary.output_folder is not None:
            maybe_mkdir_p(self.auxiliary.output_folder)
            shutil.copyfile(filename, join(self.auxiliary.output_folder, basename(filename)))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation of the primary dataset's fold, then of the auxiliary dataset's fold by the auxiliary
        branch, written into the auxiliary dataset's results (``validation/`` with nnU-Net's summary.json)."""
        super().perform_actual_validation(save_probabilities)
        with self.on_dataset(self.auxiliary), self.predicting("auxiliary"):
            super().perform_actual_validation(save_probabilities)

    def rl_policy(self) -> dict:
        """The paired trainer's policy, and where each branch's reference patch comes from."""
        return {**super().rl_policy(), REFERENCE_KEY: self.reference_records}

    def rl_state_dict(self) -> dict:
        return {**super().rl_state_dict(), REFERENCE_KEY: self.reference_records}

    def load_rl_state_dict(self, state: dict) -> None:
        super().load_rl_state_dict(state)
        self.reference_records = state[REFERENCE_KEY]

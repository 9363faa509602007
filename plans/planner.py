"""``nnunet-rl plan``: nnU-Net's fingerprint/plan/preprocess where missing, then the ``rl`` block per configuration;
:class:`nnUNetPlannerRLU2Net`, nnU-Net's planner fitted to RL-U2Net's memory."""
from pathlib import Path
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_rl.dual_branch import DualBranchUNet
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name as nnunet_dataset_name, require_nnunet_folders
from nnunet_rl.plans.all_slice_fusion import ALL_SLICE_CONFIGURATION, PARENT_CONFIGURATION, all_slice_configuration
from nnunet_rl.plans.classifier_guided import (add_refine_configuration, chain_next_stages, first_stage_of,
                                               is_refine_configuration)
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY, RLU2NetSettings, derive_rl_block

RL_U2NET_PLANS = "nnUNetPlans_RLU2Net"


def dual_branch_estimate(patch_size, input_channels: int, output_channels: int, arch_class_name: str,
                         arch_kwargs: dict, arch_kwargs_req_import) -> int:
    """nnU-Net's memory estimate (``compute_conv_feature_map_size``) of the :class:`DualBranchUNet` built from one
    planned branch with the rl block's default channel split and ``rl_u2net`` network settings."""
    network = DualBranchUNet(input_channels, output_channels, arch_class_name, arch_kwargs, arch_kwargs_req_import,
                             allow_init=False, **RLU2NetSettings().network_kwargs())
    return network.compute_conv_feature_map_size(patch_size)


class nnUNetPlannerRLU2Net(ExperimentPlanner):
    """nnU-Net's default planner whose VRAM estimate is RL-U2Net's (Qu and Zhao, "RL-U2Net: A Dual-Branch UNet with
    Reinforcement Learning-Assisted Multimodal Feature Fusion for Accurate 3D Whole-Heart Segmentation", preprint,
    no DOI, Fig. 6).

    The plans still describe one branch (PlainConvUNet, as stock plans), which ``nnUNetTrainerRLU2Net`` builds twice;
    the patch and batch size are fitted, by nnU-Net's own search, to the memory estimate of the
    :class:`~nnunet_rl.dual_branch.DualBranchUNet` built from that branch (:func:`dual_branch_estimate`): both
    branches and every RL-XAlign module. ``auxiliary_input_channels``: the channels of an unpaired auxiliary dataset
    (``nnunet-rl plan-unpaired``), which the network takes besides this dataset's own.
    """

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = RL_U2NET_PLANS,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False,
                 auxiliary_input_channels: int = 0):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.auxiliary_input_channels = auxiliary_input_channels

    def static_estimate_VRAM_usage(self, patch_size, input_channels: int, output_channels: int, arch_class_name: str,
                                   arch_kwargs: dict, arch_kwargs_req_import) -> int:
        """nnU-Net's hook (a static method there, called through the instance; here it needs the auxiliary
        dataset's channel count): :func:`dual_branch_estimate` with this dataset's and the auxiliary's channels."""
        return dual_branch_estimate(patch_size, input_channels + self.auxiliary_input_channels, output_channels,
                                    arch_class_name, arch_kwargs, arch_kwargs_req_import)


def verified_dataset(dataset_name: str, num_processes: int) -> None:
    """nnU-Net's dataset integrity check (files, labels, geometry, readability), its failure as one line."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    try:
        verify_dataset_integrity(str(Path(str(nnUNet_raw)) / dataset_name), num_processes)
    except (RuntimeError, AssertionError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        problem = lines[-1].split("ERROR: ")[-1] if lines else type(error).__name__
        raise NnunetRLError(f"{dataset_name} fails nnU-Net's dataset integrity check: {problem}") from error


def run_nnunet_planning_where_missing(dataset_name: str, configurations: list[str] | None, plans_name: str,
                                      num_processes: int, auxiliary_input_channels: int = 0) -> Path:
    """Run nnU-Net's own fingerprinting, planning and preprocessing for whatever is not there yet
    (``auxiliary_input_channels``: see :class:`nnUNetPlannerRLU2Net`)."""
    dataset_id = convert_dataset_name_to_id(dataset_name)
    folder = Path(str(nnUNet_preprocessed)) / dataset_name
    if not (folder / "dataset_fingerprint.json").is_file():
        verified_dataset(dataset_name, num_processes)
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=False)
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        if plans_name not in ("nnUNetPlans", RL_U2NET_PLANS):
            raise NnunetRLError(f"{plans_file} does not exist; only nnUNetPlans and {RL_U2NET_PLANS} are planned "
                                f"here (use nnUNetv2_plan_experiment -overwrite_plans_name {plans_name} for others)")
        if plans_name == RL_U2NET_PLANS:
            nnUNetPlannerRLU2Net(dataset_id, auxiliary_input_channels=auxiliary_input_channels).plan_experiment()
        else:
            plan_experiments([dataset_id])
    plans = PlansManager(str(plans_file))
    unknown = sorted(set(configurations or []) - set(plans.available_configurations))
    if unknown:
        raise NnunetRLError(f"configurations {unknown} are not in {plans_file} "
                            f"(it has {sorted(plans.available_configurations)})")
    missing = [c for c in configurations or plans.available_configurations
               if not (folder / plans.get_configuration(c).data_identifier).is_dir()]
    if missing:
        preprocess([dataset_id], plans_name, missing, [num_processes] * len(missing))
    return plans_file


def configurations_needed(configurations: list[str]) -> list[str]:
    """``configurations`` and those ours are built from (a refinement's first stage, ``2d`` for ``2d_allslice``),
    each after what it needs."""
    needed = []
    for configuration in configurations:
        if is_refine_configuration(configuration):
            needed += configurations_needed([first_stage_of(configuration)])
        elif configuration == ALL_SLICE_CONFIGURATION:
            needed.append(PARENT_CONFIGURATION)
        needed.append(configuration)
    return list(dict.fromkeys(needed))


def plan_rl(dataset: str | int, configurations: list[str] | None = None, plans_name: str = "nnUNetPlans",
            num_processes: int = 1, rl_u2net: bool = False,
            previous_stage_trainer: str | None = None) -> list[Path]:
    """Plan (where needed) and write the ``rl`` block into each requested configuration of the plans.

    Our configurations among ``configurations`` are (re)written into the plans after nnU-Net has planned and
    preprocessed the configurations they are built from: ``2d_allslice`` (:mod:`nnunet_rl.plans.all_slice_fusion`)
    from ``2d``; ``<X>_refine`` (:mod:`nnunet_rl.plans.classifier_guided`) chained to X, whose model
    ``previous_stage_trainer`` trains (None: the one the plans name already, else the first stage's usual one:
    ``nnUNetTrainerAllSliceFusion`` for ``2d_allslice``, ``nnUNetTrainer`` for the others). Every
    configuration's ``next_stage`` is then made to list the stages chained to it, also when X was rewritten.
    ``rl_u2net``: plan ``nnUNetPlans_RLU2Net`` instead with :class:`nnUNetPlannerRLU2Net`, nnU-Net's planner fitting
    the two-branch RL-U2Net (not one U-Net) into nnU-Net's GPU memory target; train with
    ``nnUNetv2_train ... -tr nnUNetTrainerRLU2Net -p nnUNetPlans_RLU2Net``.
    """
    require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed")
    dataset_name = nnunet_dataset_name(dataset)
    if rl_u2net:
        plans_name = RL_U2NET_PLANS
        channels = load_json(str(Path(str(nnUNet_raw)) / dataset_name / "dataset.json"))["channel_names"]
        if len(channels) < 2:
            raise NnunetRLError(f"--rl-u2net plans a two-branch network, which needs two or more input channels; "
                                f"{dataset_name} has {list(channels.values())}")
    needed = None if configurations is None else configurations_needed(configurations)
    ours = [c for c in needed or [] if c == ALL_SLICE_CONFIGURATION or is_refine_configuration(c)]
    nnunet_configurations = None if needed is None else [c for c in needed if c not in ours]
    plans_file = run_nnunet_planning_where_missing(dataset_name, nnunet_configurations, plans_name, num_processes)
    plans = load_json(str(plans_file))
    folder = plans_file.parent
    for configuration in ours:
        if is_refine_configuration(configuration):
            add_refine_configuration(plans, configuration, previous_stage_trainer)
        else:
            plans["configurations"][configuration] = all_slice_configuration(
                plans, load_json(str(folder / "dataset_fingerprint.json")))
    chain_next_stages(plans)
    block = derive_rl_block(load_json(str(folder / "dataset.json")), folder / "gt_segmentations")
    for configuration in configurations or plans["configurations"]:
        plans["configurations"][configuration][RL_BLOCK_KEY] = block
    save_json(plans, str(plans_file), sort_keys=False)
    return [plans_file]

"""``nnunet-rl plan``: nnU-Net's fingerprint/plan/preprocess where missing, then the ``rl`` block per configuration."""
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                   preprocess)
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name as nnunet_dataset_name, require_nnunet_folders
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY, derive_rl_block

RL_U2NET_PLANS = "nnUNetPlans_RLU2Net"
# nnU-Net plans for an 8 GB GPU by default; RL-U2Net (two branches, CMA) takes 2.16x stock's peak memory on the same
# plans and 2.65x at smaller patches (docs/benchmarks.md: 18.1 vs 8.4 GiB at 128^3; 7.96 GiB at the 96x96x80 patch
# planned for 8/3 GB). Planning for a third of the target keeps RL-U2Net within what nnU-Net planned stock for.
RL_U2NET_MEMORY_FRACTION = 1 / 3
NNUNET_DEFAULT_MEMORY_TARGET_GB = 8


def run_nnunet_planning_where_missing(dataset_name: str, configurations: list[str] | None, plans_name: str,
                                      num_processes: int, gpu_memory_target_gb: float | None = None) -> Path:
    """Run nnU-Net's own fingerprinting, planning and preprocessing for whatever is not there yet."""
    dataset_id = convert_dataset_name_to_id(dataset_name)
    folder = Path(str(nnUNet_preprocessed)) / dataset_name
    if not (folder / "dataset_fingerprint.json").is_file():
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        if plans_name not in ("nnUNetPlans", RL_U2NET_PLANS):
            raise NnunetRLError(f"{plans_file} does not exist; only nnUNetPlans and {RL_U2NET_PLANS} are planned "
                                f"here (use nnUNetv2_plan_experiment -overwrite_plans_name {plans_name} for others)")
        plan_experiments([dataset_id], gpu_memory_target_in_gb=gpu_memory_target_gb,
                         overwrite_plans_name=None if plans_name == "nnUNetPlans" else plans_name)
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


def plan_rl(dataset: str | int, configurations: list[str] | None = None, plans_name: str = "nnUNetPlans",
            num_processes: int = 1, rl_u2net: bool = False) -> list[Path]:
    """Plan (where needed) and write the ``rl`` block into each requested configuration of the plans.

    ``rl_u2net``: plan ``nnUNetPlans_RLU2Net`` instead, nnU-Net's planner with a third of its GPU memory target
    (smaller patch or batch), so that the two-branch RL-U2Net fits the memory stock nnU-Net was planned for; train
    with ``nnUNetv2_train ... -tr nnUNetTrainerRLU2Net -p nnUNetPlans_RLU2Net``.
    """
    require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed")
    dataset_name = nnunet_dataset_name(dataset)
    if rl_u2net:
        plans_name = RL_U2NET_PLANS
    target = NNUNET_DEFAULT_MEMORY_TARGET_GB * RL_U2NET_MEMORY_FRACTION if rl_u2net else None
    plans_file = run_nnunet_planning_where_missing(dataset_name, configurations, plans_name, num_processes, target)
    plans = load_json(str(plans_file))
    folder = plans_file.parent
    block = derive_rl_block(load_json(str(folder / "dataset.json")), folder / "gt_segmentations")
    for configuration in configurations or plans["configurations"]:
        plans["configurations"][configuration][RL_BLOCK_KEY] = block
    save_json(plans, str(plans_file), sort_keys=False)
    return [plans_file]

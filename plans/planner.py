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


def run_nnunet_planning_where_missing(dataset_name: str, configurations: list[str] | None, plans_name: str,
                                      num_processes: int) -> Path:
    """Run nnU-Net's own fingerprinting, planning and preprocessing for whatever is not there yet."""
    dataset_id = convert_dataset_name_to_id(dataset_name)
    folder = Path(str(nnUNet_preprocessed)) / dataset_name
    if not (folder / "dataset_fingerprint.json").is_file():
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        if plans_name != "nnUNetPlans":
            raise NnunetRLError(f"{plans_file} does not exist; only the default nnUNetPlans are planned here "
                                f"(use nnUNetv2_plan_experiment -overwrite_plans_name {plans_name} for others)")
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


def plan_rl(dataset: str | int, configurations: list[str] | None = None, plans_name: str = "nnUNetPlans",
            num_processes: int = 1) -> list[Path]:
    """Plan (where needed) and write the ``rl`` block into each requested configuration of the plans."""
    require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed")
    dataset_name = nnunet_dataset_name(dataset)
    plans_file = run_nnunet_planning_where_missing(dataset_name, configurations, plans_name, num_processes)
    plans = load_json(str(plans_file))
    folder = plans_file.parent
    block = derive_rl_block(load_json(str(folder / "dataset.json")), folder / "gt_segmentations")
    for configuration in configurations or plans["configurations"]:
        plans["configurations"][configuration][RL_BLOCK_KEY] = block
    save_json(plans, str(plans_file), sort_keys=False)
    return [plans_file]

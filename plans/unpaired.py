"""``nnunet-rl plan-unpaired``: one set of plans for two single-modality datasets (MM-WHS CT and MRI), the nnU-Net way.

nnU-Net plans and preprocesses the primary dataset (by default with
:class:`~nnunet_rl.plans.planner.nnUNetPlannerRLU2Net`, whose memory estimate is the dual-branch network's, the
auxiliary dataset's channels included); its plans are moved onto the auxiliary dataset with nnU-Net's
``move_plans_between_datasets`` (the ``nnUNetv2_move_plans_between_datasets`` command), so both share spacing, axis
order, patch size, batch size and topology; the intensity normalisation stays the auxiliary modality's own (nnU-Net's
scheme for its channel names, its own fingerprint's intensities), because moved plans would normalise an MRI with CT
statistics. nnU-Net then preprocesses the auxiliary dataset with the moved plans (not again when a rerun finds them
unchanged apart from the rl block and the data there), and both plans get the same rl block naming the two datasets
(``rl_u2net.unpaired``), which ``nnUNetTrainerRLU2Net_unpaired`` reads.
"""
import copy
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
    move_plans_between_datasets
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name as nnunet_dataset_name, require_nnunet_folders
from nnunet_rl.plans.planner import RL_U2NET_PLANS, run_nnunet_planning_where_missing
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY, derive_rl_block
from nnunet_rl.unpaired import UNPAIRED_KEY, UnpairedDatasets, UnpairedSide, check_same_labels


def auxiliary_plans_name(plans_name: str, primary_dataset: str) -> str:
    """The moved plans' identifier in the auxiliary dataset, e.g. ``nnUNetPlans_from601``: the auxiliary dataset's
    own ``nnUNetPlans`` (for stock nnU-Net on that modality) stays untouched."""
    return f"{plans_name}_from{convert_dataset_name_to_id(primary_dataset):03d}"


def _own_normalisation(plans: dict, auxiliary_id: int, configurations: list[str]) -> None:
    """Give the moved plans the auxiliary modality's normalisation, as nnU-Net's planner would plan it."""
    planner = ExperimentPlanner(auxiliary_id)
    schemes, use_mask = planner.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    plans["foreground_intensity_properties_per_channel"] = \
        planner.dataset_fingerprint["foreground_intensity_properties_per_channel"]
    for configuration in configurations:
        plans["configurations"][configuration].update(normalization_schemes=schemes, use_mask_for_norm=use_mask)


def plan_unpaired(primary: str | int, auxiliary: str | int, configurations: list[str],
                  plans_name: str = RL_U2NET_PLANS, num_processes: int = 1) -> list[Path]:
    """Plan and preprocess ``primary`` (where missing), move its plans onto ``auxiliary`` and preprocess that with
    them (where the moved plans changed or the data are missing), and write the rl block naming both into both plans
    files (returned: primary's, then auxiliary's)."""
    _, preprocessed = require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed")
    primary_name, auxiliary_name = nnunet_dataset_name(primary), nnunet_dataset_name(auxiliary)
    if primary_name == auxiliary_name:
        raise NnunetRLError(f"unpaired training needs two different datasets, got {primary_name} twice")
    raw_jsons = {name: _raw_dataset_json(name) for name in (primary_name, auxiliary_name)}
    check_same_labels(raw_jsons[primary_name], raw_jsons[auxiliary_name], primary_name, auxiliary_name)
    primary_file = run_nnunet_planning_where_missing(primary_name, configurations, plans_name, num_processes,
                                                     auxiliary_input_channels=len(raw_jsons[auxiliary_name]
                                                                                  ["channel_names"]))
    primary_plans = load_json(str(primary_file))

    auxiliary_id = convert_dataset_name_to_id(auxiliary_name)
    auxiliary_folder = preprocessed / auxiliary_name
    if not (auxiliary_folder / "dataset_fingerprint.json").is_file():
        extract_fingerprints([auxiliary_id], num_processes=num_processes, check_dataset_integrity=True)
    target_plans = auxiliary_plans_name(plans_name, primary_name)
    auxiliary_file = auxiliary_folder / f"{target_plans}.json"
    previous = load_json(str(auxiliary_file)) if auxiliary_file.is_file() else None
    move_plans_between_datasets(primary_name, auxiliary_name, plans_name, target_plans)
    auxiliary_plans = load_json(str(auxiliary_file))
    _own_normalisation(auxiliary_plans, auxiliary_id, configurations)

    datasets = UnpairedDatasets(
        primary=UnpairedSide(primary_name, plans_name, _channels(raw_jsons[primary_name])),
        auxiliary=UnpairedSide(auxiliary_name, target_plans, _channels(raw_jsons[auxiliary_name])))
    for configuration in configurations:
        block = copy.deepcopy(primary_plans["configurations"][configuration].get(RL_BLOCK_KEY)) or \
            derive_rl_block(load_json(str(primary_file.parent / "dataset.json")),
                            primary_file.parent / "gt_segmentations")
        block.setdefault("rl_u2net", {})[UNPAIRED_KEY] = datasets.as_section_value()
        primary_plans["configurations"][configuration][RL_BLOCK_KEY] = block
        auxiliary_block = copy.deepcopy(block)
        auxiliary_block["dataset"] = derive_rl_block(raw_jsons[auxiliary_name], None)["dataset"]
        auxiliary_plans["configurations"][configuration][RL_BLOCK_KEY] = auxiliary_block
    save_json(primary_plans, str(primary_file), sort_keys=False)
    save_json(auxiliary_plans, str(auxiliary_file), sort_keys=False)
    # nnU-Net's planner copies dataset.json into the preprocessed folder; its preprocessing reads it from there
    save_json(raw_jsons[auxiliary_name], str(auxiliary_folder / "dataset.json"), sort_keys=False)
    stale = [configuration for configuration in configurations
             if previous is None or _without_rl_block(previous, configuration) !=
             _without_rl_block(auxiliary_plans, configuration) or not
             (auxiliary_folder / auxiliary_plans["configurations"][configuration]["data_identifier"]).is_dir()]
    if stale:  # nnU-Net's preprocessing deletes and rewrites the configuration's folder
        preprocess([auxiliary_id], target_plans, stale, [num_processes] * len(stale))
    return [primary_file, auxiliary_file]


def _without_rl_block(plans: dict, configuration: str) -> dict:
    """What preprocessing reads of ``configuration``: the plans without the configurations but this one, whose rl
    block is left out (absent: a configuration never planned)."""
    if configuration not in plans["configurations"]:
        return {}
    own = {key: value for key, value in plans["configurations"][configuration].items() if key != RL_BLOCK_KEY}
    return {**{key: value for key, value in plans.items() if key != "configurations"}, configuration: own}


def _raw_dataset_json(dataset: str) -> dict:
    file = Path(str(nnUNet_raw)) / dataset / "dataset.json"
    if not file.is_file():
        raise NnunetRLError(f"{file} not found: convert the dataset first (nnunet-rl convert-mmwhs)")
    return load_json(str(file))


def _channels(dataset_json: dict) -> tuple[str, ...]:
    names = dataset_json["channel_names"]
    return tuple(names[key] for key in sorted(names, key=int))

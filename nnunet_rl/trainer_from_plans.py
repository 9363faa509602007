"""A trainer constructed from a planned dataset the way ``nnUNetv2_train`` constructs it, for the tests and the
benchmarks (which build trainers in this process rather than through the command line)."""
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_rl.nnunet_folders import require_nnunet_folders


def trainer_from_plans(dataset: str, trainer_class: type, configuration: str = "3d_fullres", fold: int | str = 0,
                       plans: str = "nnUNetPlans", device: torch.device | str = "cpu"):
    """``trainer_class`` for ``configuration`` and ``fold`` of the planned ``dataset`` (its name) in
    ``$nnUNet_preprocessed``, with the plans ``plans`` (nnU-Net's ``run_training`` adds ``continue_training``)."""
    folder = Path(require_nnunet_folders("nnUNet_preprocessed")[0]) / dataset
    plans_dict = load_json(str(folder / f"{plans}.json"))
    plans_dict["continue_training"] = False
    return trainer_class(plans=plans_dict, configuration=configuration, fold=fold,
                         dataset_json=load_json(str(folder / "dataset.json")), device=torch.device(device))

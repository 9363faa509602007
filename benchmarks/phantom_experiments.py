"""What the learning experiments on synthetic phantoms share: their own nnU-Net folders, in-process trainers, the report.

``das_learning.py`` and ``pixel_rl_learning.py`` run nnU-Net's training in this process (so that they can wrap a
trainer class with a control or a recorder) on a dataset they make and plan in a temporary folder.
"""
import json
import os
from pathlib import Path

import torch


def planned_phantoms(base: Path, kind: str, dataset_id: int, configurations: list[str], **make_options) -> str:
    """nnU-Net's folder variables set to folders under ``base`` (for this process), a ``make-dataset`` phantom dataset
    made there and planned for ``configurations`` by ``nnunet-rl plan``; its name."""
    from nnunet_rl.datasets.synthetic import make_dataset
    from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES
    from nnunet_rl.plans.planner import plan_rl
    for name in NNUNET_FOLDER_VARIABLES:
        (base / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(base / name)
    folder = make_dataset(kind, dataset_id, **make_options)
    plan_rl(folder.name, configurations)
    return folder.name


def trainer_for(dataset: str, trainer_class: type, configuration: str):
    """A CPU trainer of fold 0 for a planned dataset, constructed as nnUNetv2_train constructs it."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["continue_training"] = False
    return trainer_class(plans, configuration, 0, load_json(str(folder / "dataset.json")), torch.device("cpu"))


def report(result: dict, output: Path | None) -> None:
    """The result as JSON on stdout, and in ``output`` when given."""
    print(json.dumps(result, indent=2))
    if output:
        output.write_text(json.dumps(result, indent=2))

"""Shared fixtures: nnU-Net folders in a temporary directory and one tiny planned dataset per session."""
import os

import pytest

os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_n_proc_DA", "1")
os.environ.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net's default spawns 8 export processes: minutes on 2 cores

from helpers import PLANNED_DATASET_ID, set_nnunet_folders  # noqa: E402 (after the settings)


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory) -> str:
    """A 6-case 32^3 two-channel synthetic dataset, planned and preprocessed for 2d and 3d_fullres.

    The nnU-Net folder variables stay set for the session (nnU-Net reads them at call time).
    """
    from nnunet_rl.datasets.synthetic import make_dataset
    from nnunet_rl.plans.planner import plan_rl

    set_nnunet_folders(tmp_path_factory.mktemp("nnunet"))
    folder = make_dataset("multimodal", PLANNED_DATASET_ID, cases=6, size=32)
    plan_rl(folder.name, ["2d", "3d_fullres"])
    return folder.name

"""Shared fixtures: nnU-Net folders in a temporary directory and one tiny planned dataset per session."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_n_proc_DA", "1")
os.environ.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net's default spawns 8 export processes: minutes on 2 cores

from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES as NNUNET_FOLDERS  # noqa: E402 (after the settings)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PLANNED_DATASET_ID = 951


def set_nnunet_folders(base: Path) -> dict[str, str]:
    """Point nnU-Net's three folder variables at subfolders of ``base`` (in this process); returns them."""
    folders = {name: str(base / name) for name in NNUNET_FOLDERS}
    for name, folder in folders.items():
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.environ[name] = folder
    return folders


def free_port() -> int:
    """A free local TCP port for a gloo process group."""
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _gloo_rank(rank: int, port: int, work, folder: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        work(rank, folder)
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(work, folder: Path) -> list[dict]:
    """Run ``work(rank, folder)`` (a module-level function) in two CPU processes joined by a gloo process group;
    each rank saves its results to ``folder/rank<r>.pt``, which are returned in rank order."""
    import torch
    import torch.multiprocessing as mp
    mp.spawn(_gloo_rank, args=(free_port(), work, str(folder)), nprocs=2)
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def make_trainer(dataset: str, trainer_class, configuration: str = "3d_fullres"):
    """A trainer on the CPU for a planned dataset, constructed as nnUNetv2_train constructs it."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["continue_training"] = False
    return trainer_class(plans, configuration, 0, load_json(str(folder / "dataset.json")), torch.device("cpu"))


def started_trainer(dataset: str, trainer_class, configuration: str):
    """For a module-scoped fixture: a :func:`make_trainer` trainer, initialised and started as nnU-Net's
    ``run_training`` starts it, ended after the module."""
    trainer = make_trainer(dataset, trainer_class, configuration)
    trainer.initialize()
    trainer.on_train_start()
    yield trainer
    trainer.on_train_end()


def cloned_state(module) -> dict:
    """A copy of ``module``'s state dict, to compare with after a step."""
    return {key: value.clone() for key, value in module.state_dict().items()}


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

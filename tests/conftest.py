"""Shared fixtures: nnU-Net folders in a temporary directory and one tiny planned dataset per session."""
import os

import pytest

os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_n_proc_DA", "1")
os.environ.setdefault("nnUNet_def_n_proc", "2")  # nnU-Net's default spawns 8 export processes: minutes on 2 cores

from helpers import PLANNED_DATASET_ID, free_port, set_nnunet_folders  # noqa: E402 (after the settings)


def pytest_configure(config):
    """Under pytest-xdist each worker's torch gets its share of the cores.

    torch's default, one thread per core in every process, oversubscribes the cores when `make test` runs two workers
    side by side: on 2 cores two training processes ran 2x slower each than with one thread each (docs/benchmarks.md).
    The nnU-Net commands the tests start (`nnUNetv2_train -device cpu`, `nnUNetv2_predict -device cpu`) set their own
    count, a thread per core, as they do for users; other subprocesses inherit ``OMP_NUM_THREADS``.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


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


# The longest test files (docs/benchmarks.md, "End to end"), run first: `make test` hands each file to one of two
# pytest-xdist workers in collection order, so a long file collected late would run alone at the end.
LONGEST_FIRST = ("test_e2e.py", "test_rl_deep_supervision_trainer.py", "test_das_learning.py", "test_two_stage_e2e.py",
                 "test_rl_u2net_unpaired.py")


@pytest.fixture
def single_rank_process_group():
    """A gloo process group of one CPU rank in this process, for nnU-Net's DDP wrapper."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def pytest_collection_modifyitems(items):
    """The files of :data:`LONGEST_FIRST` first, in that order; every file keeps its own tests' order."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

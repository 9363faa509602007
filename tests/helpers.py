"""What the tests share besides fixtures (conftest.py holds those): nnU-Net folders, two-process gloo runs, started
trainers, state snapshots, small network topologies."""
import os
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES as NNUNET_FOLDERS
from nnunet_rl.rl_xalign import activity_correlation, activity_map
from nnunet_rl.trainer_from_plans import trainer_from_plans

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
    import torch.multiprocessing as mp
    mp.spawn(_gloo_rank, args=(free_port(), work, str(folder)), nprocs=2)
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def ddp_steps(network, inputs, objective, steps: int = 2) -> None:
    """nnU-Net's DDP wrapper (no find_unused_parameters) around ``network``; ``steps`` forward/backward passes on
    ``inputs``, the loss being nnU-Net's outputs plus ``objective(bare network, outputs)`` computed outside forward,
    as the trainers' losses do (in a process group: the ``single_rank_process_group`` fixture)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    wrapped = DDP(network)
    for _ in range(steps):
        outputs = wrapped(inputs)
        (sum(output.mean() for output in outputs) + objective(network, outputs)).backward()


def started_trainer(dataset: str, trainer_class, configuration: str):
    """For a module-scoped fixture: a :func:`trainer_from_plans` trainer, initialised and started as nnU-Net's
    ``run_training`` starts it, ended after the module."""
    trainer = trainer_from_plans(dataset, trainer_class, configuration)
    trainer.initialize()
    trainer.on_train_start()
    yield trainer
    trainer.on_train_end()


def resumed_after_an_rl_step(trainer, dataset: str, folder: Path, fallback: int):
    """A per-voxel agents' trainer (PixelRL, MRL-Seg) after one training step of its RL phase, saved as nnU-Net's
    checkpoint and loaded into a fresh trainer of its class, as ``--c`` does: the agents' module (``rl_module``), their
    Adam moments and the action sampler's next draw (``fallback``: the action of a tied draw) come back exactly.
    Returns the resumed trainer for the component's own checks."""
    import torch

    from nnunet_rl.voxel_actor_critic import sample_actions
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))
    path = str(folder / "checkpoint.pth")
    trainer.save_checkpoint(path)
    resumed = trainer_from_plans(dataset, type(trainer), trainer.configuration_name)
    resumed.load_checkpoint(path)
    for key, value in trainer.rl_module.state_dict().items():
        assert torch.equal(value, resumed.rl_module.state_dict()[key]), key
    saved_adam = trainer.optimizer.adam.state_dict()["state"]
    resumed_adam = resumed.optimizer.adam.state_dict()["state"]
    assert saved_adam and saved_adam.keys() == resumed_adam.keys()
    for index, moments in saved_adam.items():
        assert torch.equal(moments["exp_avg"], resumed_adam[index]["exp_avg"])
        assert torch.equal(moments["exp_avg_sq"], resumed_adam[index]["exp_avg_sq"])
    logits = torch.zeros(1, 2, 32, 32)
    assert torch.equal(sample_actions(logits, trainer.action_generator, fallback=fallback),
                       sample_actions(logits, resumed.action_generator, fallback=fallback))
    return resumed


def cloned_state(module) -> dict:
    """A copy of ``module``'s state dict, to compare with after a step."""
    return {key: value.clone() for key, value in module.state_dict().items()}


def wandb_history(run_file: Path) -> dict[str, list[float]]:
    """The values an offline W&B run logged, per key in order, read from its ``run-<id>.wandb`` file: W&B's 7-byte
    header, then LevelDB's log format (32 KiB blocks of records: crc32c, 2-byte length, type full/first/middle/last)
    holding W&B's protobuf records; the history records carry the logged values as JSON."""
    import json

    from wandb.proto import wandb_internal_pb2
    data, block, position, pending, history = run_file.read_bytes(), 32768, 7, b"", {}
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            for item in record.history.item if record.WhichOneof("record_type") == "history" else []:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return history


def unet_kwargs(dim: int) -> dict:
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    return dict(input_channels=2, n_stages=3, features_per_stage=[8, 16, 32], conv_op=conv, kernel_sizes=3,
                strides=[1, 2, 2], num_classes=3, conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=True)


def branch_kwargs(architecture, dim: int) -> dict:
    """A small planned topology in the plans' arch_kwargs form (classes instead of dotted names: nothing to import)."""
    kwargs = {**unet_kwargs(dim), "n_conv_per_stage_decoder": 1}
    for key in ("input_channels", "num_classes", "deep_supervision"):
        kwargs.pop(key)
    kwargs["n_blocks_per_stage" if architecture is ResidualEncoderUNet else "n_conv_per_stage"] = 1
    return kwargs


def feature_similarity(primary: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """S_similarity of two feature maps: the correlation of their activity maps."""
    return activity_correlation(activity_map(primary), activity_map(aligned))

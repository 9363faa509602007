"""Keeping RL state identical across DDP ranks: average what differs between them.

Without an initialised process group (one GPU, CPU tests) this is a no-op.
"""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks (a new tensor); ``tensor`` itself when not distributed."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()

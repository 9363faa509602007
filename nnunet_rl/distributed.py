"""Keeping RL state identical across DDP ranks: average what differs, broadcast what must start equal.

Without an initialised process group (one GPU, CPU tests) both functions are no-ops.
"""
import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks (a new tensor); ``tensor`` itself when not distributed."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s values, in place; returns it."""
    if is_distributed():
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=src)
    return module

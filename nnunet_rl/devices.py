"""Moving small CPU tensors (indices, matrices) to the device inside a training step without stalling it."""
import torch


def copy_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``, without waiting for the device.

    A CUDA copy from pageable memory synchronises the stream (torch's ``copy_`` with non_blocking=False does), so
    every queued kernel must finish before the CPU goes on and the GPU then idles while the next kernels are
    launched. From pinned memory with non_blocking=True the copy is queued like a kernel; torch's pinned-memory
    cache keeps the source alive until the copy has run.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

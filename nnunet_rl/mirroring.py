"""Mirroring augmentation that keeps RL-U2Net's inter-modal rotation consistent.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), eq. 6 (PoseAlign).

nnU-Net mirrors both modalities of a sample together. When the auxiliary modality is turned by a rotation relative to
the primary one, PoseAlign must apply some R to re-align them; on the sample mirrored by F (a diagonal ±1 matrix,
F = F⁻¹) the same content needs F·R·F instead, another cube rotation. So RL-U2Net's trainer mirrors the samples
itself (nnU-Net's ``MirrorTransform`` is left out of its pipeline): :func:`draw_mirroring` draws the flips as
``MirrorTransform`` does (each allowed axis with probability 1/2, per sample), :func:`mirror_batch` applies them, and
each PoseAlign turns a mirrored sample by the conjugate of its chosen rotation (:meth:`Mirroring.conjugated`). The
policy therefore chooses rotations in the dataset's own frame.

At prediction nnU-Net's test-time mirroring cannot tell the network which flip it applied; :func:`commuting_axes`
keeps the axes whose flips commute with every module's greedy rotation (F·R·F = R), for which mirroring is exact.
"""
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np
import torch

from nnunet_rl.rotations import cube_rotations, rotation_index


class FlipGroup(NamedTuple):
    """Samples ``start:stop`` of a batch, all mirrored along the spatial ``axes`` (0-based, nnU-Net's mirror axes)."""
    start: int
    stop: int
    axes: tuple[int, ...]


def flip_matrix(axes: Sequence[int], dim: int) -> np.ndarray:
    """F: the diagonal matrix with −1 on the flipped axes (a reflection when an odd number of axes is flipped)."""
    return np.diag([-1 if axis in axes else 1 for axis in range(dim)])


@lru_cache(maxsize=None)
def conjugation_table(axes: tuple[int, ...], dim: int) -> torch.Tensor:
    """For every rotation index i of ``cube_rotations(dim)``, the index of F·R_i·F, a CPU LongTensor."""
    flip = flip_matrix(axes, dim)
    return torch.tensor([rotation_index(flip @ rotation @ flip) for rotation in cube_rotations(dim)])


class Mirroring(NamedTuple):
    """The flips of one training batch: consecutive groups of samples sharing their flipped axes."""
    groups: tuple[FlipGroup, ...]
    dim: int

    def conjugated(self, actions: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        """The rotation indices that act on samples mirrored along ``axes`` as ``actions`` act on unmirrored ones."""
        return conjugation_table(axes, self.dim)[actions] if axes else actions

    def changes(self, actions: torch.Tensor) -> bool:
        """Whether some group needs other rotation indices than ``actions`` (never for the identity or rotations
        that commute with the flips drawn)."""
        return any(not torch.equal(self.conjugated(actions, group.axes), actions) for group in self.groups)


def draw_mirroring(batch_size: int, allowed_axes: Sequence[int], dim: int, generator: torch.Generator) -> Mirroring:
    """Each sample flips each allowed axis with probability 1/2 (nnU-Net's ``MirrorTransform``). The flip patterns
    are drawn independently and then sorted, so that equal ones are consecutive: batches arrive in random order, so
    which sample gets which pattern does not matter, and each group is a slice (no gather on the device)."""
    draws = torch.rand(batch_size, len(allowed_axes), generator=generator) < 0.5
    patterns = sorted(tuple(axis for axis, flip in zip(allowed_axes, row) if flip) for row in draws.tolist())
    groups, start = [], 0
    for stop in range(1, batch_size + 1):
        if stop == batch_size or patterns[stop] != patterns[start]:
            groups.append(FlipGroup(start, stop, patterns[start]))
            start = stop
    return Mirroring(tuple(groups), dim)


def mirror_batch(x: torch.Tensor, mirroring: Mirroring) -> torch.Tensor:
    """``x`` (B, C, *spatial) with each group's samples flipped along its axes."""
    if all(not group.axes for group in mirroring.groups):
        return x
    return torch.cat([x[group.start:group.stop].flip([2 + axis for axis in group.axes])
                      for group in mirroring.groups])


def commuting_axes(allowed_axes: Sequence[int] | None, rotations: Sequence[int], dim: int) -> tuple[int, ...] | None:
    """The allowed mirror axes whose flips commute with every rotation (index into ``cube_rotations(dim)``).

    Products of such flips commute too, so nnU-Net's test-time mirroring over every combination of these axes feeds
    each flipped input the rotation it needs. ``None`` stays ``None`` (no mirroring).
    """
    if allowed_axes is None:
        return None
    rotations = torch.as_tensor(list(rotations), dtype=torch.long)
    return tuple(axis for axis in allowed_axes
                 if torch.equal(conjugation_table((axis,), dim)[rotations], rotations))


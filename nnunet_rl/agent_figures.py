"""Figures of one validation patch for the per-voxel agents' trainers (``nnUNetTrainerMRLSeg``'s masks,
``nnUNetTrainerPixelRL``'s actions).

Each trainer keeps, per RL validation epoch, the first patch of its first validation batch as 2D arrays
(:func:`middle_plane`: small, on the CPU) and draws it at the end of training as one figure of titled panels
(:func:`plot_panels`). PixelRL's panels (:func:`actions_patch`, :func:`action_panels`) colour the voxels the
refinement set to background by eq. 12's verdict: a false positive removed (reward +2) or a true positive removed
(reward −2).
"""
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch

UNCHANGED, FALSE_POSITIVE_REMOVED, TRUE_POSITIVE_REMOVED, OTHER_REMOVED = 0, 1, 2, 3
REMOVAL_NAMES = {FALSE_POSITIVE_REMOVED: "false_positive", TRUE_POSITIVE_REMOVED: "true_positive",
                 OTHER_REMOVED: "other"}
REMOVAL_COLOURS = np.array([[0.0, 0.0, 0.0],  # unchanged: black
                            [0.1, 0.8, 0.1],  # false positive removed (right): green
                            [0.9, 0.1, 0.1],  # true positive removed (wrong): red
                            [0.9, 0.8, 0.1]])  # another foreground label or the ignore label removed: yellow


class Panel(NamedTuple):
    """One panel of :func:`plot_panels`: a 2D array drawn in grey (between ``value_range``, None: its own minimum and
    maximum), or an (H, W, 3) array drawn as RGB."""
    title: str
    image: np.ndarray
    value_range: tuple[float, float] | None = None


def middle_plane(volume: torch.Tensor) -> np.ndarray:
    """The first sample of a batch (B, *spatial) as a 2D float array on the CPU: 2D as it is, 3D its middle plane
    along the first spatial axis."""
    volume = volume[0]
    return (volume[volume.shape[0] // 2] if volume.ndim == 3 else volume).float().cpu().numpy()


def plot_panels(panels: list, filename: str, columns: int | None = None) -> None:
    """``panels`` (:class:`Panel` or (title, image) tuples) side by side, ``columns`` to a row (None: one row), saved
    to ``filename``."""
    panels = [Panel(*panel) for panel in panels]
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, panel in zip(axes.flat, panels):
        limits = {} if panel.value_range is None else dict(zip(("vmin", "vmax"), panel.value_range))
        axis.imshow(panel.image, cmap="gray", interpolation="nearest", **limits)
        axis.set_title(panel.title)
    figure.tight_layout()
    figure.savefig(filename)
    plt.close(figure)


def removals(before: np.ndarray, after: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per voxel, what setting it to background from ``before`` to ``after`` did against ``reference`` (label maps of
    one shape): :data:`UNCHANGED` (not set to background there), :data:`FALSE_POSITIVE_REMOVED` (the reference is
    background: right), :data:`TRUE_POSITIVE_REMOVED` (the reference is the label it had: wrong) or
    :data:`OTHER_REMOVED` (the reference is another label, the ignore label included)."""
    removed = (before != 0) & (after == 0)
    classes = np.full(before.shape, OTHER_REMOVED, dtype=np.uint8)
    classes[reference == 0] = FALSE_POSITIVE_REMOVED
    classes[reference == before] = TRUE_POSITIVE_REMOVED
    classes[~removed] = UNCHANGED
    return classes


def removal_counts(classes: np.ndarray) -> dict[str, int]:
    """The voxels of each kind of :func:`removals`: ``false_positive``, ``true_positive`` and ``other``."""
    return {name: int((classes == kind).sum()) for kind, name in REMOVAL_NAMES.items()}


def actions_patch(data: torch.Tensor, reference: torch.Tensor, maps: list[torch.Tensor], num_classes: int) -> dict:
    """The first patch of a PixelRL validation batch as 2D arrays (3D: its middle plane): the input's first channel,
    the reference, f(0) and f(t_max) of the greedy episode ``maps``, the :func:`removals` of the whole refinement
    (``removed``) and of each step (``step_removed``), and their :func:`removal_counts`."""
    planes = [middle_plane(labels) for labels in maps]
    reference = middle_plane(reference)
    removed = removals(planes[0], planes[-1], reference)
    step_removed = [removals(before, after, reference) for before, after in zip(planes, planes[1:])]
    return {"input": middle_plane(data[:, 0]), "reference": reference, "initial": planes[0], "refined": planes[-1],
            "removed": removed, "counts": removal_counts(removed), "step_removed": step_removed,
            "step_counts": [removal_counts(classes) for classes in step_removed], "num_classes": num_classes}


def action_panels(patch: dict) -> list[Panel]:
    """PixelDRL-MG's Fig. 4 view of an :func:`actions_patch`: the input, the reference, f(0), f(t_max), the voxels the
    refinement set to background (green: false positives, right; red: true positives, wrong; yellow: another label),
    then the same per step."""
    labels = (0, max(patch["num_classes"] - 1, 1))

    def counted(counts: dict[str, int]) -> str:
        return f"FP {counts['false_positive']} / TP {counts['true_positive']}" + \
            (f" / other {counts['other']}" if counts["other"] else "")

    return [Panel("input", patch["input"]), Panel("reference", patch["reference"], labels),
            Panel("f(0)", patch["initial"], labels), Panel("f(t_max)", patch["refined"], labels),
            Panel(f"removed: {counted(patch['counts'])}", REMOVAL_COLOURS[patch["removed"]]),
            *(Panel(f"step {t + 1}: {counted(counts)}", REMOVAL_COLOURS[classes])
              for t, (classes, counts) in enumerate(zip(patch["step_removed"], patch["step_counts"])))]


def plot_actions(patch: dict, filename: str) -> None:
    """:func:`action_panels` of ``patch``, five to a row, saved to ``filename``."""
    plot_panels(action_panels(patch), filename, columns=5)

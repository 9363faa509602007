"""Extra per-epoch scalars for nnU-Net's logger: ``training_log`` checkpoints, ``progress.png`` and W&B.

nnU-Net's ``LocalLogger`` only accepts keys it already holds and plots up to the shortest list, so every
extra key is registered before training and gets exactly one value per epoch (NaN where a component had
nothing to report, e.g. an RL agent after its RL phase). Values go through ``MetaLogger.log`` so W&B
(``nnUNet_wandb_enabled=1``) receives them under the same names.

In ``progress.png`` the extra keys are drawn on one axis per order of magnitude (:func:`scale_groups`), so that a
loss near 10 does not flatten a probability or a reward near 0.1 into a line.
"""
import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

matplotlib.use("agg")

RL_AXIS_HEIGHT_INCHES = 12  # per axis; nnU-Net's progress figure is 30 x 54 inches for its three panels


def magnitude(values) -> int:
    """The power of ten bounding the largest finite |value| (0 for values within [-1, 1] or none finite)."""
    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite)]
    largest = finite.max() if finite.size else 0.0
    return max(0, math.ceil(math.log10(largest))) if largest > 0 else 0


def scale_groups(series: dict[str, list[float]]) -> dict[int, list[str]]:
    """The keys of ``series`` grouped by :func:`magnitude` of their values, smallest first."""
    groups: dict[int, list[str]] = {}
    for key, values in series.items():
        groups.setdefault(magnitude(values), []).append(key)
    return dict(sorted(groups.items()))


class RLLocalLogger(LocalLogger):
    """nnU-Net's local logger plus registered extra keys and one more panel in ``progress.png``."""

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys: list[str] = []

    def register(self, key: str) -> None:
        if key not in self.my_fantastic_logging:
            self.my_fantastic_logging[key] = []
        if key not in self.extra_keys:
            self.extra_keys.append(key)

    def fill_missing(self, epoch: int) -> None:
        """Give every extra key a value up to ``epoch`` (NaN), so the plot's shortest-list rule keeps working."""
        for key in self.extra_keys:
            values = self.my_fantastic_logging[key]
            values.extend([math.nan] * (epoch + 1 - len(values)))

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging["epoch_end_timestamps"])
        for key in self.extra_keys:
            self.my_fantastic_logging.setdefault(key, [])
        self.fill_missing(epochs - 1)

    def plot_progress_png(self, output_folder):
        super().plot_progress_png(output_folder)
        if self.extra_keys:
            append_panel(f"{output_folder}/progress.png", self._rl_panel())

    def _rl_panel(self) -> np.ndarray:
        """The extra panel, one axis per :func:`scale_groups` group, as an RGBA image as wide as nnU-Net's figure."""
        epochs = min(len(v) for v in self.my_fantastic_logging.values())
        groups = scale_groups({key: self.my_fantastic_logging[key][:epochs] for key in self.extra_keys})
        fig, axes = plt.subplots(len(groups), 1, figsize=(30, RL_AXIS_HEIGHT_INCHES * len(groups)), squeeze=False)
        for ax, (power, keys) in zip(axes[:, 0], groups.items()):
            for key in keys:
                ax.plot(range(epochs), self.my_fantastic_logging[key][:epochs], label=key, linewidth=4)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"RL telemetry, |value| ≤ {10 ** power:g}")
            ax.legend(loc=(0, 1), ncol=3)
        fig.tight_layout()
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba()).astype(np.float32) / 255
        plt.close(fig)
        return image


def append_panel(png_path: str, panel: np.ndarray) -> None:
    """Append ``panel`` below the image in ``png_path`` (widths are matched by padding with white)."""
    image = plt.imread(png_path)
    if image.shape[2] == 3:
        image = np.concatenate([image, np.ones(image.shape[:2] + (1,), image.dtype)], axis=2)
    width = max(image.shape[1], panel.shape[1])
    stacked = np.concatenate([_pad_width(image, width), _pad_width(panel, width)], axis=0)
    plt.imsave(png_path, stacked)


def _pad_width(image: np.ndarray, width: int) -> np.ndarray:
    return np.pad(image, ((0, 0), (0, width - image.shape[1]), (0, 0)), constant_values=1.0)

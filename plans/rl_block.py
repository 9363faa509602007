"""The ``rl`` block that ``nnunet-rl plan`` writes into each configuration of an nnU-Net plans file.

Layout (version 1)::

    "rl": {
        "version": 1,
        "dataset": {                          # derived from the dataset, never a paper default
            "primary_channels": ["CT"],       # channel 0 by default
            "auxiliary_channels": ["MRI"],    # all other channels
            "label_fractions": {"LV": 0.04, ...}   # mean voxel fraction per foreground label
        },
        "<component>": {...}                  # one section per RL component, paper defaults
    }

Trainers read the block once; when a plans file has none (stock ``nnUNetPlans``), they derive the same
block on the fly, so stock plans work unchanged and a planned block only pins the values.
"""
from pathlib import Path

import numpy as np
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_rl.errors import NnunetRLError

RL_BLOCK_KEY = "rl"
RL_BLOCK_VERSION = 1
MAX_CASES_FOR_LABEL_FRACTIONS = 50  # enough for a stable mean; keeps planning fast on large datasets

# One section per RL component: {component: {hyperparameter: paper default}}. Each component adds its own entry
# (with the paper's equation or table in a comment) when it lands; `nnunet-rl plan` writes them all.
PAPER_DEFAULTS: dict[str, dict] = {}


def channel_split(channel_names: dict, auxiliary: list[str] | None = None) -> dict:
    """Primary/auxiliary channel groups by name; default: channel 0 primary, the rest auxiliary."""
    names = [channel_names[k] for k in sorted(channel_names, key=int)]
    if auxiliary is None:
        auxiliary = names[1:]
    unknown = sorted(set(auxiliary) - set(names))
    if unknown:
        raise NnunetRLError(f"auxiliary channels {unknown} are not among the dataset's channels {names}")
    return {"primary_channels": [n for n in names if n not in auxiliary], "auxiliary_channels": list(auxiliary)}


def label_fractions(gt_folder: Path, dataset_json: dict) -> dict[str, float] | None:
    """Mean voxel fraction of each foreground label over (up to 50) reference segmentations; None without data."""
    files = sorted(Path(gt_folder).glob(f"*{dataset_json['file_ending']}"))[:MAX_CASES_FOR_LABEL_FRACTIONS]
    labels = {name: value for name, value in dataset_json["labels"].items()
              if isinstance(value, int) and name not in ("background", "ignore")}
    if not files or not labels:
        return None
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(files[0]))()
    fractions = np.zeros(max(labels.values()) + 1)
    for file in files:
        segmentation, _ = reader.read_seg(str(file))
        counts = np.bincount(segmentation.astype(np.int64).ravel(), minlength=fractions.size)[:fractions.size]
        fractions += counts / segmentation.size
    return {name: float(fractions[value] / len(files)) for name, value in labels.items()}


def derive_rl_block(dataset_json: dict, gt_folder: Path | None) -> dict:
    """The block ``nnunet-rl plan`` writes, and the fallback trainers use when the plans have none."""
    return {
        "version": RL_BLOCK_VERSION,
        "dataset": {
            **channel_split(dataset_json["channel_names"]),
            "label_fractions": label_fractions(gt_folder, dataset_json) if gt_folder is not None else None,
        },
        **{component: dict(defaults) for component, defaults in PAPER_DEFAULTS.items()},
    }


def rl_section(block: dict, component: str) -> dict:
    """A component's hyperparameters: its paper defaults, overridden by the values in the block.

    A key the component does not know is refused, so a typo in an edited plans file cannot pass silently.
    """
    defaults = PAPER_DEFAULTS[component]
    given = block.get(component, {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise NnunetRLError(f"unknown {component} hyperparameters {unknown} in the plans' rl block; "
                            f"known: {sorted(defaults)}")
    return {**defaults, **given}


def read_rl_block(configuration_manager: ConfigurationManager, dataset_json: dict,
                  gt_folder: Path | None) -> dict:
    """The configuration's ``rl`` block, or the derived one when the plans have none."""
    block = configuration_manager.configuration.get(RL_BLOCK_KEY)
    if block is None:
        return derive_rl_block(dataset_json, gt_folder)
    if block.get("version") != RL_BLOCK_VERSION:
        raise NnunetRLError(f"the plans' rl block has version {block.get('version')}, this nnunet_rl reads "
                            f"version {RL_BLOCK_VERSION}: rerun `nnunet-rl plan`")
    return block

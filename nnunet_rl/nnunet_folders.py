"""nnU-Net's folder variables and dataset names, with errors a user can act on.

Imported at every Python start by the discovery hook (via :mod:`nnunet_rl.discovery`): keep it free of heavy imports.
"""
import os
from pathlib import Path

from nnunet_rl.errors import NnunetRLError

NNUNET_FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_nnunet_folders(*names: str) -> list[Path]:
    """The folders of the named variables (e.g. "nnUNet_raw"); one error naming every unset one."""
    unset = [name for name in names if not os.environ.get(name)]
    if unset:
        raise NnunetRLError(f"{' and '.join(unset)} not set: export nnU-Net's folder variables as for training "
                            f"(nnU-Net's documentation/setting_up_paths.md)")
    return [Path(os.environ[name]) for name in names]


def dataset_name(dataset: int | str) -> str:
    """nnU-Net's DatasetXXX_Name for a dataset ID or name."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name  # keeps this module light
    try:
        return maybe_convert_to_dataset_name(dataset)
    except (ValueError, RuntimeError) as error:
        raise NnunetRLError(f"cannot resolve dataset {dataset!r}: {error}") from error

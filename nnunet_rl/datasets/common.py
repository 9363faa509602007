"""Helpers shared by the dataset tools: where datasets go, which IDs are free, atomic writing, NIfTI output."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES, require_nnunet_folders

MAX_DATASET_ID = 999

# Labels of the heart datasets (synthetic multimodal and MM-WHS), shared so that models transfer between them.
HEART_LABELS = {"background": 0, "LV": 1, "RV": 2, "LA": 3, "RA": 4, "myocardium": 5, "aorta": 6,
                "pulmonary_artery": 7}


def raw_root() -> Path:
    """The nnU-Net raw folder, $nnUNet_raw."""
    return require_nnunet_folders("nnUNet_raw")[0]


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset, e.g. Dataset005_SynthHeartMM."""
    return f"Dataset{dataset_id:03d}_{name}"


def _check_id_range(dataset_id: int) -> None:
    if not 1 <= dataset_id <= MAX_DATASET_ID:
        raise NnunetRLError(f"dataset ID {dataset_id} is outside 1..{MAX_DATASET_ID}")


def folders_using_id(dataset_id: int) -> list[Path]:
    """Dataset<ID:03d>_* folders in $nnUNet_raw and, where set, $nnUNet_preprocessed and $nnUNet_results."""
    roots = [Path(os.environ[v]) for v in NNUNET_FOLDER_VARIABLES if os.environ.get(v)]
    return sorted(p for root in roots if root.is_dir()
                  for p in root.glob(dataset_folder_name(dataset_id, "*")) if p.is_dir())


def ensure_id_free(dataset_id: int) -> None:
    """Refuse a dataset ID outside 1..999 or one that a Dataset folder already uses."""
    _check_id_range(dataset_id)
    used = folders_using_id(dataset_id)
    if used:
        raise NnunetRLError(f"dataset ID {dataset_id} is already used by {', '.join(map(str, used))}; pick another "
                            f"--id (the first free one from {dataset_id} is {free_dataset_id(dataset_id)}) or remove "
                            f"that folder")


def free_dataset_id(start: int) -> int:
    """The first dataset ID >= start that no Dataset folder uses."""
    _check_id_range(start)
    for dataset_id in range(start, MAX_DATASET_ID + 1):
        if not folders_using_id(dataset_id):
            return dataset_id
    raise NnunetRLError(f"every dataset ID from {start} to {MAX_DATASET_ID} is in use")


def write_dataset_atomically(dataset_id: int, name: str, fill: Callable[[Path], None]) -> Path:
    """Let fill write a dataset into an empty temporary folder in $nnUNet_raw, then move that folder to
    $nnUNet_raw/Dataset<ID>_<name> and return its path.

    On any error the temporary folder is removed, so a dataset folder is either complete or absent.
    """
    ensure_id_free(dataset_id)
    root = raw_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / dataset_folder_name(dataset_id, name)
    # the leading dot keeps nnU-Net (which looks for Dataset*) from ever seeing the unfinished folder
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        fill(temporary)
        ensure_id_free(dataset_id)  # something may have taken the ID while we were writing
        temporary.rename(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def write_image(array: np.ndarray, path: Path, spacing: Sequence[float]) -> None:
    """Write a 2D or 3D array as an image; spacing is in array-axis order (SimpleITK wants it reversed)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in reversed(spacing)])
    sitk.WriteImage(image, str(path), useCompression=True)


def write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """Write an array with the origin, direction and spacing of a reference image of the same size."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)

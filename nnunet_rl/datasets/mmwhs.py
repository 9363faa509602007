"""Convert MM-WHS 2017 (Multi-Modality Whole Heart Segmentation) into an nnU-Net v2 raw dataset.

Source: files named ``<modality>_<split>_<number>_<image|label>.nii.gz`` anywhere under the source folder (flat, or
in the ct_train / ct_test / mr_train / mr_test folders of the download), e.g. ``ct_train_1001_image.nii.gz`` with
``ct_train_1001_label.nii.gz``, and test images ``ct_test_2001_image.nii.gz`` without labels.

Output: ``Dataset<ID>_MMWHS_CT`` (channel_names ``{"0": "CT"}``) or ``Dataset<ID>_MMWHS_MR`` (``{"0": "MRI"}``);
case ``ct_train_1001`` becomes ``ct_1001`` in imagesTr/labelsTr, test images go to imagesTs (test labels, where
present, to labelsTs). Images are copied with their origin, direction and spacing; labels keep theirs.

Label map (MM-WHS value -> nnU-Net label; names as in ``common.HEART_LABELS``)::

    0 background -> 0      500 LV -> 1    600 RV -> 2    420 LA -> 3    550 RA -> 4
    205 myocardium -> 5    820 ascending aorta -> 6      850 pulmonary artery -> 7
    421 -> 3 (a stray LA value in some label files; converted with a warning naming the file)

Any other value, a training image without its label, a label without its image or an unreadable file stops the
conversion with one error listing every problem, and nothing is left in $nnUNet_raw.
"""
import re
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from nnunet_rl.datasets.common import HEART_LABELS, write_dataset_atomically, write_like
from nnunet_rl.errors import NnunetRLError

LABEL_MAP = {0: 0, 500: 1, 600: 2, 420: 3, 550: 4, 205: 5, 820: 6, 850: 7}
STRAY_LABEL_MAP = {421: 3}
FULL_LABEL_MAP = {**LABEL_MAP, **STRAY_LABEL_MAP}
CHANNEL_NAMES = {"ct": "CT", "mr": "MRI"}
FILE_PATTERN = re.compile(
    r"(?P<modality>ct|mr)_(?P<split>train|test)_(?P<number>\d+)_(?P<kind>image|label)\.nii\.gz")
CaseFiles = dict[str, list[Path]]  # "image" / "label" -> the files found (more than one is a problem)


def _checked_modality(modality: str) -> str:
    if modality.lower() not in CHANNEL_NAMES:
        raise NnunetRLError(f"unknown modality {modality!r}; MM-WHS has 'ct' and 'mr'")
    return modality.lower()


def _find_cases(source: Path, modality: str) -> dict[tuple[str, str], CaseFiles]:
    """(split, number) -> the case's files, for every MM-WHS file of the modality under source."""
    if not source.is_dir():
        raise NnunetRLError(f"MM-WHS source {source} is not a folder")
    cases = defaultdict(lambda: defaultdict(list))
    for path in sorted(source.rglob("*.nii.gz")):
        match = FILE_PATTERN.fullmatch(path.name)
        if match and match["modality"] == modality:
            cases[match["split"], match["number"]][match["kind"]].append(path)
    if not any(split == "train" for split, _ in cases):
        other = [p.name for p in source.rglob("*.nii.gz") if FILE_PATTERN.fullmatch(p.name)]
        raise NnunetRLError(f"no {modality}_train_<number>_image.nii.gz files under {source}"
                            + (f" (found other MM-WHS files, e.g. {other[0]}: wrong --modality?)" if other else ""))
    return cases


def _case_file_pair(split: str, files: CaseFiles) -> tuple[Path, Path | None]:
    """The case's image and label file (None for a test case without one)."""
    for kind, paths in files.items():
        if len(paths) > 1:
            raise NnunetRLError(f"several {kind} files for one case: {', '.join(map(str, paths))}")
    if not files["image"]:
        raise NnunetRLError(f"{files['label'][0]}: label without its image file")
    if split == "train" and not files["label"]:
        expected = files["image"][0].name.replace("_image.nii.gz", "_label.nii.gz")
        raise NnunetRLError(f"{files['image'][0]}: training image without its label file {expected}")
    return files["image"][0], (files["label"] or [None])[0]


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise NnunetRLError(f"{path}: unreadable ({str(e).strip().splitlines()[-1]})") from e


def _mapped_labels(label: np.ndarray, path: Path) -> np.ndarray:
    """MM-WHS label values -> nnU-Net labels via LABEL_MAP, 421 via STRAY_LABEL_MAP with a warning."""
    values, inverse = np.unique(label, return_inverse=True)
    unknown = [v for v in values.tolist() if v not in FULL_LABEL_MAP]
    if unknown:
        raise NnunetRLError(f"{path}: unknown label values {unknown} (MM-WHS has {sorted(FULL_LABEL_MAP)})")
    for value in STRAY_LABEL_MAP.keys() & set(values.tolist()):
        warnings.warn(f"{path}: stray label value {value} converted to {STRAY_LABEL_MAP[value]} (LA)", stacklevel=2)
    lookup = np.array([FULL_LABEL_MAP[v] for v in values.tolist()], dtype=np.uint8)
    return lookup[inverse].reshape(label.shape)


def _convert_case(folder: Path, split: str, case: str, files: CaseFiles) -> None:
    """Copy one case's image and write its mapped label, raising NnunetRLError on any problem."""
    image_path, label_path = _case_file_pair(split, files)
    image = _read(image_path)
    suffix = "Tr" if split == "train" else "Ts"
    if label_path is not None:
        label = _read(label_path)
        if label.GetSize() != image.GetSize():
            raise NnunetRLError(f"{label_path}: size {label.GetSize()} differs from its image's {image.GetSize()}")
        (folder / f"labels{suffix}").mkdir(exist_ok=True)
        write_like(_mapped_labels(sitk.GetArrayViewFromImage(label), label_path), label,
                   folder / f"labels{suffix}" / f"{case}.nii.gz")
    (folder / f"images{suffix}").mkdir(exist_ok=True)
    sitk.WriteImage(image, str(folder / f"images{suffix}" / f"{case}_0000.nii.gz"), useCompression=True)


def _fill(folder: Path, source: Path, modality: str, cases: dict[tuple[str, str], CaseFiles]) -> None:
    """Convert every case into folder and write dataset.json, or raise one error listing all problems."""
    problems = []
    for (split, number), files in tqdm(sorted(cases.items()), desc="MM-WHS cases", unit="case"):
        try:
            _convert_case(folder, split, f"{modality}_{number}", files)
        except NnunetRLError as e:
            problems.append(str(e))
    if problems:
        raise NnunetRLError(f"cannot convert MM-WHS {modality} from {source}; nothing was written:\n  "
                            + "\n  ".join(problems))
    generate_dataset_json(str(folder), {"0": CHANNEL_NAMES[modality]}, dict(HEART_LABELS),
                          sum(split == "train" for split, _ in cases), ".nii.gz",
                          dataset_name=f"MMWHS_{modality.upper()}",
                          description=f"MM-WHS 2017 whole-heart segmentation, {modality.upper()}",
                          license="see the MM-WHS 2017 challenge data terms", converted_by="nnunet-rl convert-mmwhs",
                          nnunet_rl={"mmwhs_label_map": {str(k): v for k, v in FULL_LABEL_MAP.items()}})


def convert_mmwhs(source: Path, modality: str, dataset_id: int) -> Path:
    """Convert the MM-WHS 2017 files of one modality ('ct' or 'mr') under source; returns the new
    $nnUNet_raw/Dataset<ID>_MMWHS_CT or _MMWHS_MR folder."""
    source, modality = Path(source), _checked_modality(modality)
    cases = _find_cases(source, modality)
    return write_dataset_atomically(dataset_id, f"MMWHS_{modality.upper()}",
                                    partial(_fill, source=source, modality=modality, cases=cases))

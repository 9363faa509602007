"""Synthetic nnU-Net v2 raw datasets, small enough that nnU-Net trains a few iterations in seconds on a CPU.

Kinds:

* ``multimodal`` -> ``Dataset<ID>_SynthHeartMM``: whole-heart-like phantoms with the MM-WHS labels
  (``common.HEART_LABELS``: LV, RV, LA, RA, myocardium as a shell around the LV, aorta and pulmonary artery as tubes
  leaving the ventricles), per-case jitter of size and position. Two co-registered channels ``{"0": "CT", "1": "MRI"}``
  with different intensities (in a different order) per structure, partial-volume blur and noise, and a smooth
  multiplicative bias field on the MRI.
* ``imbalanced`` -> ``Dataset<ID>_SynthLesion``: one channel ``{"0": "MRI"}``, labels background, organ, lesion: one
  organ with small lesions inside it covering 0.1-2 % of the volume.

Files: ``imagesTr/case_000_0000.nii.gz`` (one file per channel), ``labelsTr/case_000.nii.gz``; the held-out cases
(about 20 %, at least 2) go to imagesTs/labelsTs and are numbered after the training cases. 3D cases are cubes with
spacing (1.5, 1, 1) (thick axis first), or (1, 1, 1) when the MRI is rotated; 2D cases are stored as NIfTI of shape
(1, S, S) with spacing (999, 1, 1), nnU-Net's convention for 2D data in NIfTI.

Rotated auxiliary channel (multimodal, ``rotate_aux`` ``fixed`` or ``random``): the MRI channel (channel "1") of a
case is ``rotate_array(aligned_mri, matrix)``, the labels and the CT stay aligned. dataset.json records it under
``nnunet_rl.aux_rotation``; ``index`` and ``inverse_index`` point into ``nnunet_rl.rotations.cube_rotations(dim)``::

    fixed:  {"mode": "fixed", "channel": "1", "index": k, "matrix": M, "inverse_index": j, "inverse_matrix": M^T}
            one non-identity rotation for every case, training and test
    random: {"mode": "random", "channel": "1", "cases": {"case_000": {"index": ..., "matrix": ...,
            "inverse_index": ..., "inverse_matrix": ...}, ...}}, drawn uniformly from the group (identity included)

PoseAlign re-aligns the MRI with the CT and the labels by applying the inverse:
``rotate_array(mri, inverse_matrix)``. Everything is reproducible from the seed.
"""
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from nnunet_rl.datasets.common import HEART_LABELS, write_dataset_atomically, write_image
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.rotations import cube_rotations, rotate_array, rotation_index

DEFAULT_SIZE = {2: 64, 3: 32}
DEFAULT_CASES = {2: 20, 3: 10}
MIN_SIZE = {2: 32, 3: 16}  # below this the vessels and lesions shrink to a voxel or vanish
MIN_CASES = 5  # one per fold of nnU-Net's 5-fold cross-validation
TEST_FRACTION = 0.2
MIN_TEST_CASES = 2
ROTATE_AUX_MODES = ("none", "fixed", "random")
AUX_CHANNEL = 1  # the MRI of the multimodal kind

SPACING_3D = (1.5, 1.0, 1.0)  # anisotropic, thick axis first as in nnU-Net
SPACING_3D_ISOTROPIC = (1.0, 1.0, 1.0)  # cube rotations keep the geometry only on an isotropic grid
SPACING_2D = (999.0, 1.0, 1.0)  # (1, S, S) arrays: the singleton axis is the "slice" axis

# Heart geometry in normalised coordinates ([-1, 1] across the image), array-axis order; 2D uses the last two axes.
# Chambers: (centre, radii) of ellipsoids. Vessels: (start, end, radius) of tubes running from the ventricles
# towards negative axis 1. Later structures in HEART_PAINT_ORDER overwrite earlier ones where they overlap.
HEART_CHAMBERS = {
    "RA": ((0.0, -0.30, -0.35), (0.20, 0.20, 0.20)),
    "LA": ((0.0, -0.35, 0.25), (0.20, 0.18, 0.20)),
    "RV": ((0.05, 0.20, -0.30), (0.28, 0.30, 0.20)),
    "LV": ((0.05, 0.15, 0.15), (0.30, 0.30, 0.22)),
}
HEART_VESSELS = {
    "aorta": ((0.05, 0.0, 0.10), (-0.15, -0.85, 0.0), 0.10),
    "pulmonary_artery": ((0.05, 0.05, -0.30), (-0.15, -0.85, -0.20), 0.10),
}
MYOCARDIUM_THICKNESS = 0.09
HEART_PAINT_ORDER = ("RA", "LA", "RV", "aorta", "pulmonary_artery", "myocardium", "LV")

# Mean intensity per label value (background first); the two orders differ on purpose.
CT_INTENSITIES = (-100, 320, 260, 300, 240, 90, 380, 220)
MRI_INTENSITIES = (80, 500, 650, 420, 700, 180, 300, 560)
HEART_NOISE = 25.0

LESION_LABELS = {"background": 0, "organ": 1, "lesion": 2}
LESION_INTENSITIES = (100, 400, 250)
LESION_NOISE = 30.0
LESION_TARGET_FRACTION = (0.002, 0.01)  # each case draws a target lesion fraction of the volume from this range
MAX_LESION_FRACTION = 0.02
LESION_RADIUS = (0.02, 0.045)  # in units of the image edge length; at least one voxel

PARTIAL_VOLUME_SIGMA = 0.6  # voxels


def _normalised_grid(shape: tuple[int, ...]) -> np.ndarray:
    """Coordinates in [-1, 1] along every axis, shape (len(shape), *shape)."""
    return np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))


def _column(vector) -> np.ndarray:
    """A coordinate vector shaped to broadcast against a grid of the same dimension."""
    vector = np.asarray(vector, dtype=float)
    return vector.reshape(-1, *[1] * len(vector))


def _ellipsoid(grid: np.ndarray, centre, radii) -> np.ndarray:
    return (((grid - _column(centre)) / _column(radii)) ** 2).sum(0) <= 1


def _tube(grid: np.ndarray, start, end, radius: float) -> np.ndarray:
    """Points within radius of the segment from start to end."""
    start, axis = _column(start), _column(np.subtract(end, start))
    t = np.clip(((grid - start) * axis).sum(0) / (axis ** 2).sum(), 0, 1)
    return ((grid - start - t * axis) ** 2).sum(0) <= radius ** 2


def _heart_label(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """One jittered heart phantom as a label map (HEART_LABELS)."""
    dim = len(grid)
    scale, shift = rng.uniform(0.9, 1.1, 3), rng.uniform(-0.06, 0.06, 3)

    def place(point):
        return ((np.asarray(point) + rng.uniform(-0.03, 0.03, 3)) * scale + shift)[-dim:]

    def stretch(radii):
        return (np.asarray(radii) * rng.uniform(0.9, 1.1, 3) * scale)[-dim:]

    chambers = {name: (place(centre), stretch(radii)) for name, (centre, radii) in HEART_CHAMBERS.items()}
    masks = {name: _ellipsoid(grid, *ellipsoid) for name, ellipsoid in chambers.items()}
    lv_centre, lv_radii = chambers["LV"]
    masks["myocardium"] = _ellipsoid(grid, lv_centre, lv_radii + MYOCARDIUM_THICKNESS)  # the LV hollows it out
    for name, (start, end, radius) in HEART_VESSELS.items():
        masks[name] = _tube(grid, place(start), place(end), radius * scale.mean())
    label = np.zeros(grid.shape[1:], dtype=np.uint8)
    for name in HEART_PAINT_ORDER:
        label[masks[name]] = HEART_LABELS[name]
    return label


def _bias_field(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field of roughly 0.7..1.4: exp of a random quadratic in the coordinates."""
    linear, quadratic = rng.uniform(-0.2, 0.2, len(grid)), rng.uniform(-0.15, 0.15, len(grid))
    return np.exp(np.tensordot(linear, grid, 1) + np.tensordot(quadratic, grid ** 2, 1))


def _render(rng: np.random.Generator, label: np.ndarray, intensities, noise: float, bias=1.0) -> np.ndarray:
    """Intensity per label, partial-volume blur, multiplicative bias, additive Gaussian noise."""
    clean = gaussian_filter(np.asarray(intensities, dtype=np.float32)[label], PARTIAL_VOLUME_SIGMA)
    return (clean * bias + rng.normal(0, noise, label.shape)).astype(np.float32)


def _heart_case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    grid = _normalised_grid(shape)
    label = _heart_label(rng, grid)
    ct = _render(rng, label, CT_INTENSITIES, HEART_NOISE)
    mri = _render(rng, label, MRI_INTENSITIES, HEART_NOISE, bias=_bias_field(rng, grid))
    return label, [ct, mri]


def _add_lesions(rng: np.random.Generator, organ: np.ndarray) -> np.ndarray:
    """Balls inside the organ until they cover a random target fraction of the volume (never above the maximum)."""
    target = rng.uniform(*LESION_TARGET_FRACTION)
    indices = np.indices(organ.shape)
    organ_voxels = np.argwhere(organ)
    lesions = np.zeros_like(organ)
    while lesions.mean() < target:
        centre = organ_voxels[rng.integers(len(organ_voxels))]
        radius = max(1.0, rng.uniform(*LESION_RADIUS) * min(organ.shape))
        candidate = lesions | (organ & (((indices - _column(centre)) ** 2).sum(0) <= radius ** 2))
        if candidate.mean() <= MAX_LESION_FRACTION:
            lesions = candidate
    return lesions


def _lesion_case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    grid = _normalised_grid(shape)
    organ = _ellipsoid(grid, rng.uniform(-0.1, 0.1, len(shape)), rng.uniform(0.45, 0.65, len(shape)))
    label = organ.astype(np.uint8)
    label[_add_lesions(rng, organ)] = LESION_LABELS["lesion"]
    return label, [_render(rng, label, LESION_INTENSITIES, LESION_NOISE)]


class _Kind(NamedTuple):
    name: str
    channel_names: dict
    labels: dict
    make_case: Callable[[np.random.Generator, tuple[int, ...]], tuple[np.ndarray, list[np.ndarray]]]


KINDS = {
    "multimodal": _Kind("SynthHeartMM", {"0": "CT", "1": "MRI"}, HEART_LABELS, _heart_case),
    "imbalanced": _Kind("SynthLesion", {"0": "MRI"}, LESION_LABELS, _lesion_case),
}


def _check_choices(kind: str, dim: int, rotate_aux: str) -> None:
    if kind not in KINDS:
        raise NnunetRLError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if dim not in DEFAULT_SIZE:
        raise NnunetRLError(f"dim must be 2 or 3, not {dim}")
    if rotate_aux not in ROTATE_AUX_MODES:
        raise NnunetRLError(f"unknown rotate_aux {rotate_aux!r}; choose one of {', '.join(ROTATE_AUX_MODES)}")
    if rotate_aux != "none" and kind != "multimodal":
        raise NnunetRLError(f"rotate_aux {rotate_aux!r} needs a second channel to rotate: use kind 'multimodal' "
                            f"(kind {kind!r} has one channel)")


def _check_counts(dim: int, cases: int, size: int) -> None:
    if cases < MIN_CASES:
        raise NnunetRLError(f"cases must be at least {MIN_CASES} (one per fold of nnU-Net's 5-fold "
                            f"cross-validation), not {cases}")
    if size < MIN_SIZE[dim]:
        raise NnunetRLError(f"size must be at least {MIN_SIZE[dim]} in {dim}D (smaller structures vanish), "
                            f"not {size}")


def _aux_rotation_indices(mode: str, rng: np.random.Generator, num_cases: int, group_size: int) -> list[int]:
    """Per case, the index of its MRI rotation: one non-identity rotation for all (fixed) or one each (random)."""
    if mode == "fixed":
        return [int(rng.integers(1, group_size))] * num_cases
    return [int(i) for i in rng.integers(0, group_size, num_cases)]


def _rotation_entry(rotations: list[np.ndarray], index: int) -> dict:
    inverse = rotations[index].T
    return {"index": index, "matrix": rotations[index].tolist(),
            "inverse_index": rotation_index(inverse), "inverse_matrix": inverse.tolist()}


def _aux_rotation_record(mode: str, dim: int, cases: list[str], indices: list[int]) -> dict:
    """The dataset.json entry nnunet_rl.aux_rotation (see the module docstring)."""
    rotations = cube_rotations(dim)
    record = {"mode": mode, "channel": str(AUX_CHANNEL),
              "meaning": f"channel {AUX_CHANNEL} = rotate_array(aligned image, matrix); rotate_array(channel "
                         f"{AUX_CHANNEL}, inverse_matrix) re-aligns it with the labels; indices into "
                         f"nnunet_rl.rotations.cube_rotations({dim})"}
    if mode == "fixed":
        return {**record, **_rotation_entry(rotations, indices[0])}
    return {**record, "cases": {case: _rotation_entry(rotations, i) for case, i in zip(cases, indices)}}


def _write_case(folder: Path, split: str, case: str, label: np.ndarray, channels: list[np.ndarray],
                spacing: tuple[float, ...]) -> None:
    """Write one case into images<split>/labels<split>; 2D arrays get nnU-Net's singleton first axis."""
    if label.ndim == 2:
        label, channels = label[None], [image[None] for image in channels]
    for channel, image in enumerate(channels):
        write_image(image, folder / f"images{split}" / f"{case}_{channel:04d}.nii.gz", spacing)
    write_image(label, folder / f"labels{split}" / f"{case}.nii.gz", spacing)


def _fill(folder: Path, kind: str, dim: int, cases: int, size: int, rotate_aux: str, seed: int) -> None:
    """Write all cases and dataset.json into folder."""
    spec = KINDS[kind]
    num_test = max(MIN_TEST_CASES, round(cases * TEST_FRACTION / (1 - TEST_FRACTION)))
    names = [f"case_{i:03d}" for i in range(cases + num_test)]
    dataset_rng, *case_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(1 + len(names))]
    rotations = cube_rotations(dim)
    rotation_indices = (None if rotate_aux == "none" else
                        _aux_rotation_indices(rotate_aux, dataset_rng, len(names), len(rotations)))
    spacing = SPACING_2D if dim == 2 else SPACING_3D if rotate_aux == "none" else SPACING_3D_ISOTROPIC
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    for i, (case, rng) in enumerate(tqdm(list(zip(names, case_rngs)), desc=f"{kind} cases", unit="case")):
        label, channels = spec.make_case(rng, (size,) * dim)
        if rotation_indices is not None:
            channels[AUX_CHANNEL] = rotate_array(channels[AUX_CHANNEL], rotations[rotation_indices[i]])
        _write_case(folder, "Tr" if i < cases else "Ts", case, label, channels, spacing)

    record = {"synthetic": {"kind": kind, "dim": dim, "size": size, "seed": seed, "test_cases": names[cases:]}}
    if rotation_indices is not None:
        record["aux_rotation"] = _aux_rotation_record(rotate_aux, dim, names, rotation_indices)
    generate_dataset_json(str(folder), dict(spec.channel_names), dict(spec.labels), cases, ".nii.gz",
                          dataset_name=spec.name, description=f"synthetic {kind} dataset made by nnunet_rl",
                          license="synthetic data, free to use", converted_by="nnunet-rl make-dataset",
                          nnunet_rl=record)


def make_dataset(kind: str, dataset_id: int, dim: int = 3, cases: int | None = None, size: int | None = None,
                 rotate_aux: str = "none", seed: int = 0) -> Path:
    """Write the synthetic dataset Dataset<ID>_<Name> into $nnUNet_raw and return its folder.

    cases: training cases (default 10 in 3D, 20 in 2D); about a quarter as many more go to the test set (>= 2).
    size: edge length in voxels (default 32 in 3D, 64 in 2D). rotate_aux: none, fixed or random (multimodal only).
    """
    _check_choices(kind, dim, rotate_aux)
    cases = DEFAULT_CASES[dim] if cases is None else cases
    size = DEFAULT_SIZE[dim] if size is None else size
    _check_counts(dim, cases, size)
    return write_dataset_atomically(dataset_id, KINDS[kind].name,
                                    partial(_fill, kind=kind, dim=dim, cases=cases, size=size,
                                            rotate_aux=rotate_aux, seed=seed))

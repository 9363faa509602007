"""Synthetic nnU-Net v2 raw datasets, small enough that nnU-Net trains a few iterations in seconds on a CPU.

Kinds:

* ``multimodal`` -> ``Dataset<ID>_SynthHeartMM``: whole-heart-like phantoms with the MM-WHS labels
  (``common.HEART_LABELS``: LV, RV, LA, RA, myocardium as a shell around the LV, aorta and pulmonary artery as tubes
  leaving the ventricles), per-case jitter of size and position. Two co-registered channels ``{"0": "CT", "1": "MRI"}``
  with different intensities (in a different order) per structure, partial-volume blur and noise, and a smooth
  multiplicative bias field on the MRI.
* ``imbalanced`` -> ``Dataset<ID>_SynthLesion``: one channel ``{"0": "MRI"}``, labels background, organ, lesion: one
  organ with small lesions inside it covering 0.1-2 % of the volume.
* ``stacked`` -> ``Dataset<ID>_SynthCineStack``: short-axis cardiac cine-MR-like stacks of thick 2D slices (3D only),
  labels background, LV blood pool, myocardium, RV; 8-12 slices per case of ``size`` x ``size`` voxels, spacing
  (10, 1.5, 1.5) mm. Slice 0 is the base, the last slice the apex: the heart tapers towards the apex, the LV blood
  pool and the RV end before it (the apical slices are myocardium only), and in some cases the first slice lies
  above the base (bright atria, no label) or the last below the apex (nothing). One channel ``{"0": "cineMRI"}``:
  bright blood, dark myocardium, in-plane partial-volume blur, a bias field and noise. The stack the all-slice fusion
  transformer is for (:mod:`nnunet_rl.all_slice_fusion`).

Files: ``imagesTr/case_000_0000.nii.gz`` (one file per channel), ``labelsTr/case_000.nii.gz``; the held-out cases
(about 20 %, at least 2) go to imagesTs/labelsTs and are numbered after the training cases. 3D cases of the first two
kinds are cubes with spacing (1.5, 1, 1) (thick axis first), or (1, 1, 1) when the MRI is rotated; 2D cases are
stored as NIfTI of shape (1, S, S) with spacing (999, 1, 1), nnU-Net's convention for 2D data in NIfTI.

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

# Short-axis stack (kind "stacked"): slice 0 is the base, the last slice the apex. Geometry in normalised in-plane
# coordinates ([-1, 1] across the slice) as a function of t, the position from base (0) to apex (1).
STACK_LABELS = {"background": 0, "LV": 1, "myocardium": 2, "RV": 3}
STACK_SPACING = (10.0, 1.5, 1.5)  # mm: the large slice gap of cine MR stacks
STACK_SLICES = (8, 12)  # per case, both included
STACK_DEFAULT_SIZE = {3: 48}
STACK_MIN_SIZE = {3: 32}  # below this the myocardium ring is about a voxel thick
STACK_EMPTY_END_PROBABILITY = 0.4  # per end of the stack: a slice outside the heart (atria above, nothing below)
LV_CAVITY_END = (0.65, 0.8)  # t beyond which the LV blood pool is gone (myocardium only)
RV_END = (0.45, 0.65)  # t beyond which the RV is gone
APEX_TAPER = 0.55  # the heart's outer radius shrinks by this fraction from base to apex
ATRIUM = 4  # appearance index of the unlabelled atria above the base
STACK_INTENSITIES = (120, 480, 170, 450, 430)  # background, LV blood, myocardium, RV blood, atria
STACK_NOISE = 45.0


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


class _StackGeometry(NamedTuple):
    """One case's heart in a short-axis stack: its first and last heart slice, and its in-plane shape."""
    base: int
    apex: int
    lv_centre: np.ndarray  # at the base; it drifts by ``drift`` towards the apex
    drift: np.ndarray
    outer_radii: np.ndarray  # of the myocardium at the base
    wall: float  # myocardium thickness
    cavity_end: float
    rv_end: float
    rv_width: float


def _stack_geometry(rng: np.random.Generator, num_slices: int) -> _StackGeometry:
    empty_base, empty_apex = rng.random(2) < STACK_EMPTY_END_PROBABILITY
    return _StackGeometry(base=int(empty_base), apex=num_slices - 1 - int(empty_apex),
                          lv_centre=np.array([0.0, 0.15]) + rng.uniform(-0.08, 0.08, 2),
                          drift=rng.uniform(-0.08, 0.08, 2), outer_radii=rng.uniform(0.36, 0.44, 2),
                          wall=rng.uniform(0.09, 0.12), cavity_end=rng.uniform(*LV_CAVITY_END),
                          rv_end=rng.uniform(*RV_END), rv_width=rng.uniform(0.16, 0.22))


def _short_axis_slice(grid: np.ndarray, heart: _StackGeometry, t: float) -> np.ndarray:
    """The appearance map (STACK_LABELS values) of the slice at position t from base (0) to apex (1): the myocardium
    ring around the LV blood pool, the RV a crescent beside it; past ``cavity_end`` the myocardium is a solid cap,
    past ``rv_end`` there is no RV."""
    centre = heart.lv_centre + heart.drift * t
    outer = heart.outer_radii * (1 - APEX_TAPER * t ** 2)
    myocardium = _ellipsoid(grid, centre, outer)
    appearance = myocardium.astype(np.uint8) * STACK_LABELS["myocardium"]
    if t <= heart.cavity_end:
        appearance[_ellipsoid(grid, centre, outer - heart.wall)] = STACK_LABELS["LV"]
    if t <= heart.rv_end:
        width = heart.rv_width * np.sqrt(1 - t / heart.rv_end)
        rv_centre = centre - np.array([0.05, outer[1] + 0.5 * width])
        appearance[_ellipsoid(grid, rv_centre, (1.15 * outer[0], width + 0.5 * outer[1])) & ~myocardium] = \
            STACK_LABELS["RV"]
    return appearance


def _atria_slice(grid: np.ndarray, heart: _StackGeometry) -> np.ndarray:
    """The appearance of a slice above the base: both atria, bright as blood but not labelled."""
    appearance = np.zeros(grid.shape[1:], dtype=np.uint8)
    for side in (-1, 1):
        centre = heart.lv_centre + np.array([-0.05, 0.25 * side - 0.1])
        appearance[_ellipsoid(grid, centre, heart.outer_radii * 0.7)] = ATRIUM
    return appearance


def _stacked_case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A short-axis stack (see the module docstring): label and one cine-MR-like channel, rendered slice by slice
    (partial-volume blur in-plane only: the slices are 10 mm apart)."""
    num_slices, *in_plane = shape
    grid = _normalised_grid(tuple(in_plane))
    heart = _stack_geometry(rng, num_slices)
    appearance = np.zeros(shape, dtype=np.uint8)
    for z in range(num_slices):
        if heart.base <= z <= heart.apex:
            appearance[z] = _short_axis_slice(grid, heart, (z - heart.base) / (heart.apex - heart.base))
        elif z < heart.base:
            appearance[z] = _atria_slice(grid, heart)
    label = np.where(appearance == ATRIUM, 0, appearance).astype(np.uint8)
    bias = _bias_field(rng, _normalised_grid(shape))
    image = np.stack([_render(rng, slice_appearance, STACK_INTENSITIES, STACK_NOISE, bias=slice_bias)
                      for slice_appearance, slice_bias in zip(appearance, bias)])
    return label, [image]


def _cube_shape(rng: np.random.Generator, dim: int, size: int) -> tuple[int, ...]:
    return (size,) * dim


def _stack_shape(rng: np.random.Generator, dim: int, size: int) -> tuple[int, ...]:
    """A number of slices drawn from STACK_SLICES, each size x size."""
    return int(rng.integers(STACK_SLICES[0], STACK_SLICES[1] + 1)), size, size


class _Kind(NamedTuple):
    name: str
    channel_names: dict
    labels: dict
    make_case: Callable[[np.random.Generator, tuple[int, ...]], tuple[np.ndarray, list[np.ndarray]]]
    dims: tuple[int, ...] = (2, 3)
    default_size: dict = DEFAULT_SIZE
    min_size: dict = MIN_SIZE
    case_shape: Callable[[np.random.Generator, int, int], tuple[int, ...]] = _cube_shape
    spacing: tuple[float, ...] | None = None  # None: by dimension and rotation (see _fill)


KINDS = {
    "multimodal": _Kind("SynthHeartMM", {"0": "CT", "1": "MRI"}, HEART_LABELS, _heart_case),
    "imbalanced": _Kind("SynthLesion", {"0": "MRI"}, LESION_LABELS, _lesion_case),
    "stacked": _Kind("SynthCineStack", {"0": "cineMRI"}, STACK_LABELS, _stacked_case, dims=(3,),
                     default_size=STACK_DEFAULT_SIZE, min_size=STACK_MIN_SIZE, case_shape=_stack_shape,
                     spacing=STACK_SPACING),
}


def _check_choices(kind: str, dim: int, rotate_aux: str) -> None:
    if kind not in KINDS:
        raise NnunetRLError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if dim not in DEFAULT_SIZE:
        raise NnunetRLError(f"dim must be 2 or 3, not {dim}")
    if dim not in KINDS[kind].dims:
        raise NnunetRLError(f"kind {kind!r} is a stack of 2D slices, a 3D image: use --dim 3, not {dim}")
    if rotate_aux not in ROTATE_AUX_MODES:
        raise NnunetRLError(f"unknown rotate_aux {rotate_aux!r}; choose one of {', '.join(ROTATE_AUX_MODES)}")
    if rotate_aux != "none" and kind != "multimodal":
        raise NnunetRLError(f"rotate_aux {rotate_aux!r} needs a second channel to rotate: use kind 'multimodal' "
                            f"(kind {kind!r} has one channel)")


def _check_counts(kind: str, dim: int, cases: int, size: int) -> None:
    if cases < MIN_CASES:
        raise NnunetRLError(f"cases must be at least {MIN_CASES} (one per fold of nnU-Net's 5-fold "
                            f"cross-validation), not {cases}")
    min_size = KINDS[kind].min_size[dim]
    if size < min_size:
        raise NnunetRLError(f"size must be at least {min_size} in {dim}D (smaller structures vanish), not {size}")


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


def needed_rotations(dataset_json: dict) -> dict[str, int] | None:
    """For a dataset made with ``--rotate-aux fixed``: per receiving branch of RL-U2Net, the index of the rotation its
    PoseAlign needs (the primary branch turns the MRI features back by the inverse, the auxiliary branch turns the CT
    features by the known rotation; indices into ``cube_rotations``, in the dataset's array-axis order). None for any
    other dataset (no known rotation, or one per case)."""
    record = dataset_json.get("nnunet_rl", {}).get("aux_rotation")
    if record is None or record["mode"] != "fixed":
        return None
    return {"primary": record["inverse_index"], "auxiliary": record["index"]}


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
    spacing = spec.spacing or (SPACING_2D if dim == 2 else SPACING_3D if rotate_aux == "none" else
                               SPACING_3D_ISOTROPIC)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    for i, (case, rng) in enumerate(tqdm(list(zip(names, case_rngs)), desc=f"{kind} cases", unit="case")):
        label, channels = spec.make_case(rng, spec.case_shape(rng, dim, size))
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
    size: edge length in voxels (default 32 in 3D, 64 in 2D; for ``stacked`` the in-plane edge, default 48).
    rotate_aux: none, fixed or random (multimodal only).
    """
    _check_choices(kind, dim, rotate_aux)
    cases = DEFAULT_CASES[dim] if cases is None else cases
    size = KINDS[kind].default_size[dim] if size is None else size
    _check_counts(kind, dim, cases, size)
    return write_dataset_atomically(dataset_id, KINDS[kind].name,
                                    partial(_fill, kind=kind, dim=dim, cases=cases, size=size,
                                            rotate_aux=rotate_aux, seed=seed))

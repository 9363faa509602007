"""Metrics on shapes whose overlaps and surface distances are known by hand."""
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from nnunet_rl.metrics import (asd, boundary_band, boundary_iou, case_metrics, class_metrics, dice, hd95, iou,
                               surface, symmetric_surface_distances)


def box(shape, *slices):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slices)] = True
    return mask


def ball(radius_mm, spacing_mm, size=32):
    centre_mm = size // 2 * spacing_mm
    return ((np.indices((size,) * 3) * spacing_mm - centre_mm) ** 2).sum(0) <= radius_mm ** 2


def nested_cubes():
    """Reference: 10^3 cube; prediction: the 8^3 cube one voxel inside it."""
    return box((16,) * 3, *[slice(4, 12)] * 3), box((16,) * 3, *[slice(3, 13)] * 3)


# ---------------------------------------------------------------- overlap

def test_dice_and_iou_of_squares_overlapping_by_half():
    prediction, reference = box((8, 8), slice(0, 4), slice(0, 4)), box((8, 8), slice(2, 6), slice(0, 4))
    assert dice(prediction, reference) == 0.5  # 2 * 8 / (16 + 16)
    assert iou(prediction, reference) == pytest.approx(1 / 3)  # 8 / 24


def test_dice_and_iou_of_nested_cubes():
    prediction, reference = nested_cubes()
    assert dice(prediction, reference) == pytest.approx(2 * 512 / (512 + 1000))
    assert iou(prediction, reference) == pytest.approx(512 / 1000)


# ---------------------------------------------------------------- surface

def test_surface_of_a_cube_is_its_shell():
    cube = box((5, 5, 5), *[slice(1, 4)] * 3)
    assert np.count_nonzero(surface(cube)) == 26
    assert not surface(cube)[2, 2, 2]


def test_surface_of_a_square_uses_4_neighbours():
    square = box((5, 5), slice(1, 4), slice(1, 4))
    assert np.count_nonzero(surface(square)) == 8


def test_outside_the_array_counts_as_background():
    assert np.count_nonzero(surface(np.ones((4, 4), dtype=bool))) == 12


# ---------------------------------------------------------------- surface distances

def test_single_voxels_offset_along_one_axis_use_that_axis_spacing():
    spacing = (3.0, 1.0, 0.5)
    voxel = box((8, 8, 8), slice(2, 3), slice(2, 3), slice(2, 3))
    along_axis_0 = box((8, 8, 8), slice(5, 6), slice(2, 3), slice(2, 3))
    along_axis_2 = box((8, 8, 8), slice(2, 3), slice(2, 3), slice(5, 6))
    assert hd95(voxel, along_axis_0, spacing) == asd(voxel, along_axis_0, spacing) == 9.0
    assert hd95(voxel, along_axis_2, spacing) == asd(voxel, along_axis_2, spacing) == 1.5


def test_disjoint_cubes_offset_by_5_voxels_with_anisotropic_spacing():
    # 2^3 cubes, 5 voxels apart along axis 2: in each direction 8 surface voxels are 4 voxels away, 8 are 5 away
    spacing = (1.0, 2.0, 0.5)
    prediction = box((8, 8, 12), slice(2, 4), slice(2, 4), slice(2, 4))
    reference = box((8, 8, 12), slice(2, 4), slice(2, 4), slice(7, 9))
    distances = np.sort(symmetric_surface_distances(prediction, reference, spacing))
    np.testing.assert_array_equal(distances, [2.0] * 8 + [2.5] * 8)
    assert hd95(prediction, reference, spacing) == 2.5
    assert asd(prediction, reference, spacing) == 2.25
    assert dice(prediction, reference) == 0.0


def test_nested_cubes_surface_distances():
    # prediction shell (296 voxels) all 1 voxel from the reference shell; reference shell: 384 face voxels at 1,
    # 96 edge voxels at sqrt(2), 8 corners at sqrt(3). Pooled: 680 x 1, 96 x sqrt(2), 8 x sqrt(3)
    prediction, reference = nested_cubes()
    spacing = (1.5, 1.5, 1.5)
    assert hd95(prediction, reference, spacing) == pytest.approx(1.5 * math.sqrt(2))
    expected_asd = 1.5 * (680 + 96 * math.sqrt(2) + 8 * math.sqrt(3)) / 784
    assert asd(prediction, reference, spacing) == pytest.approx(expected_asd)


def test_nested_squares_2d():
    # pooled: 60 distances of 1 voxel (28 prediction, 32 reference), 4 reference corners at sqrt(2); the 95th
    # percentile falls at index 0.95 * 63 = 59.85 between 1 and sqrt(2)
    prediction, reference = box((14, 14), slice(3, 11), slice(3, 11)), box((14, 14), slice(2, 12), slice(2, 12))
    spacing = (0.5, 0.5)
    assert hd95(prediction, reference, spacing) == pytest.approx(0.5 * (1 + 0.85 * (math.sqrt(2) - 1)))
    assert asd(prediction, reference, spacing) == pytest.approx(0.5 * (60 + 4 * math.sqrt(2)) / 64)


def test_surface_distances_scale_with_isotropic_spacing():
    prediction, reference = nested_cubes()
    assert hd95(prediction, reference, (2.0,) * 3) == pytest.approx(2 * hd95(prediction, reference, (1.0,) * 3))
    assert asd(prediction, reference, (2.0,) * 3) == pytest.approx(2 * asd(prediction, reference, (1.0,) * 3))


@pytest.mark.parametrize("spacing_mm", [1.0, 0.8])
def test_spheres_of_radius_r_and_r_plus_one_voxel_are_about_one_voxel_apart(spacing_mm):
    smaller, larger = ball(8 * spacing_mm, spacing_mm), ball(9 * spacing_mm, spacing_mm)
    assert 1.0 <= asd(smaller, larger, (spacing_mm,) * 3) / spacing_mm <= 1.15
    assert 1.0 <= hd95(smaller, larger, (spacing_mm,) * 3) / spacing_mm <= 1.5


def test_surface_distances_match_brute_force_on_blobs_with_anisotropic_spacing():
    rng = np.random.default_rng(0)
    prediction, reference = (gaussian_filter(rng.random((12, 20, 24)), 2) > 0.5 for _ in range(2))
    spacing = (2.5, 1.0, 0.7)
    expected = np.concatenate([_brute_force_distances(prediction, reference, spacing),
                               _brute_force_distances(reference, prediction, spacing)])
    assert hd95(prediction, reference, spacing) == pytest.approx(np.percentile(expected, 95))
    assert asd(prediction, reference, spacing) == pytest.approx(expected.mean())


def _brute_force_distances(source, target, spacing):
    """Distance (mm) of every surface voxel of ``source`` to the closest surface voxel of ``target``, pairwise."""
    coordinates = [np.argwhere(_surface_by_neighbours(mask)) * np.asarray(spacing) for mask in (source, target)]
    return cdist(*coordinates).min(axis=1)


def _surface_by_neighbours(mask):
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in mask.shape)
    has_background_neighbour = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            has_background_neighbour |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & has_background_neighbour


# ---------------------------------------------------------------- boundary IoU

def test_boundary_band_is_the_voxels_within_d_mm_of_the_surface():
    cube = box((11, 11, 11), *[slice(1, 10)] * 3)
    assert np.count_nonzero(boundary_band(cube, (1.0, 1.0, 1.0), 2.0)) == 9 ** 3 - 3 ** 3  # depths 0, 1, 2
    # 2 mm along axis 0 is one voxel (depths 0, 1), along axes 1, 2 two voxels (depths 0, 1, 2)
    assert np.count_nonzero(boundary_band(cube, (2.0, 1.0, 1.0), 2.0)) == 9 ** 3 - 5 * 3 * 3


def test_boundary_iou_of_identical_and_disjoint_masks():
    cube = box((12, 12, 12), *[slice(2, 8)] * 3)
    elsewhere = box((12, 12, 12), *[slice(9, 12)] * 3)
    assert boundary_iou(cube, cube, (1.0, 1.0, 1.0)) == 1.0
    assert boundary_iou(cube, elsewhere, (1.0, 1.0, 1.0)) == 0.0


def test_boundary_iou_of_nested_cubes():
    # d = 2 mm at 1.5 mm spacing: 2-voxel bands; prediction band 8^3 - 4^3 = 448, reference band 10^3 - 6^3 = 784,
    # their intersection is the prediction's shell (296)
    prediction, reference = nested_cubes()
    assert boundary_iou(prediction, reference, (1.5,) * 3, 2.0) == pytest.approx(296 / (448 + 784 - 296))


# ---------------------------------------------------------------- empty masks and label maps

def test_both_masks_empty():
    empty = np.zeros((6, 6, 6), dtype=bool)
    assert class_metrics(empty, empty, (1.0, 1.0, 1.0)) == {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "ASD": 0.0,
                                                             "BoundaryIoU": 1.0}


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_exactly_one_mask_empty(empty_side):
    empty, cube = np.zeros((6, 6, 6), dtype=bool), box((6, 6, 6), *[slice(1, 4)] * 3)
    prediction, reference = (empty, cube) if empty_side == "prediction" else (cube, empty)
    metrics = class_metrics(prediction, reference, (1.0, 1.0, 1.0))
    assert (metrics["Dice"], metrics["IoU"], metrics["BoundaryIoU"]) == (0.0, 0.0, 0.0)
    assert math.isnan(metrics["HD95"]) and math.isnan(metrics["ASD"])


def test_class_metrics_equal_the_single_metric_functions():
    prediction, reference = nested_cubes()
    spacing = (2.0, 1.0, 0.5)
    assert class_metrics(prediction, reference, spacing, 1.5) == pytest.approx({
        "Dice": dice(prediction, reference), "IoU": iou(prediction, reference),
        "HD95": hd95(prediction, reference, spacing), "ASD": asd(prediction, reference, spacing),
        "BoundaryIoU": boundary_iou(prediction, reference, spacing, 1.5)})


def test_case_metrics_per_label():
    reference = np.zeros((16, 16, 16), dtype=np.uint8)
    reference[3:13, 3:13, 3:13] = 1
    prediction = np.zeros_like(reference)
    prediction[4:12, 4:12, 4:12] = 1
    prediction[0, 0, 0] = 2
    metrics = case_metrics(prediction, reference, [1, 2, 3], (1.0, 1.0, 1.0))
    assert list(metrics) == [1, 2, 3]
    assert metrics[1]["HD95"] == pytest.approx(math.sqrt(2))
    assert metrics[2]["Dice"] == 0.0 and math.isnan(metrics[2]["HD95"])
    assert metrics[3]["Dice"] == 1.0 and metrics[3]["HD95"] == 0.0


def test_case_metrics_rejects_mismatched_grids():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4)), np.zeros((4, 5)), [1], (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((4, 4)), np.zeros((4, 4)), [1], (1.0, 1.0, 1.0))

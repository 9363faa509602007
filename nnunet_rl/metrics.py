"""Per-class segmentation metrics that nnU-Net's evaluation lacks, in physical units, for 2D and 3D masks.

Dice, IoU, HD95, ASD (average symmetric surface distance) and boundary IoU. Conventions (see docs/metrics.md):

- ``spacing`` is the voxel size in mm in array-axis order (as nnU-Net's readers return it); distances are in mm.
- The surface of a mask is its foreground voxels with at least one face-adjacent (4-neighbour in 2D, 6-neighbour in
  3D) background voxel; outside the array counts as background. Distances are measured between voxel centres.
- HD95 is the 95th percentile (numpy's linear interpolation) of the surface distances of both directions pooled into
  one set; ASD is the mean of that pooled set.
- Boundary IoU (Cheng et al. 2021) is the IoU of the two boundary bands: the voxels of a mask within ``distance_mm``
  (default 2 mm) of its own surface.
- Empty masks: both empty gives Dice = IoU = boundary IoU = 1 and HD95 = ASD = 0; exactly one empty gives
  Dice = IoU = boundary IoU = 0 and HD95 = ASD = NaN (no surface to measure a distance to).
"""
from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

METRICS = ("Dice", "IoU", "HD95", "ASD", "BoundaryIoU")
DEFAULT_BOUNDARY_DISTANCE_MM = 2.0


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """2|P and R| / (|P| + |R|) of two boolean masks; 1 if both are empty."""
    total = np.count_nonzero(prediction) + np.count_nonzero(reference)
    if total == 0:
        return 1.0
    return float(2 * np.count_nonzero(prediction & reference) / total)


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """|P and R| / |P or R| of two boolean masks; 1 if both are empty."""
    union = np.count_nonzero(prediction | reference)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(prediction & reference) / union)


def surface(mask: np.ndarray) -> np.ndarray:
    """The foreground voxels of ``mask`` with a face-adjacent background voxel (outside the array is background)."""
    face_neighbours = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=face_neighbours, border_value=0)


def distance_to_surface(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every voxel centre to the nearest surface voxel centre of ``mask``; inf if it is empty."""
    contour = surface(mask)
    if not contour.any():
        return np.full(mask.shape, np.inf)
    return distance_transform_edt(~contour, sampling=spacing)


def symmetric_surface_distances(prediction: np.ndarray, reference: np.ndarray,
                                spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) of every prediction surface voxel to the reference surface and of every reference surface
    voxel to the prediction surface, pooled into one array (inf towards an empty mask)."""
    return _pooled_surface_distances(prediction, reference, distance_to_surface(prediction, spacing),
                                     distance_to_surface(reference, spacing))


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile (mm) of the pooled symmetric surface distances; 0 if both masks are empty, NaN if one is."""
    return _hd95_of(symmetric_surface_distances(prediction, reference, spacing))


def asd(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean (mm) of the pooled symmetric surface distances; 0 if both masks are empty, NaN if one is."""
    return _asd_of(symmetric_surface_distances(prediction, reference, spacing))


def boundary_band(mask: np.ndarray, spacing: Sequence[float],
                  distance_mm: float = DEFAULT_BOUNDARY_DISTANCE_MM) -> np.ndarray:
    """The voxels of ``mask`` within ``distance_mm`` of its surface (the surface itself included)."""
    return _band(mask, distance_to_surface(mask, spacing), distance_mm)


def boundary_iou(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                 distance_mm: float = DEFAULT_BOUNDARY_DISTANCE_MM) -> float:
    """IoU of the boundary bands of width ``distance_mm`` (Cheng et al. 2021); 1 if both masks are empty."""
    return iou(boundary_band(prediction, spacing, distance_mm), boundary_band(reference, spacing, distance_mm))


def class_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                  boundary_distance_mm: float = DEFAULT_BOUNDARY_DISTANCE_MM) -> dict[str, float]:
    """All of ``METRICS`` for one pair of boolean masks; each mask's distance map is computed once and shared."""
    prediction_distance = distance_to_surface(prediction, spacing)
    reference_distance = distance_to_surface(reference, spacing)
    distances = _pooled_surface_distances(prediction, reference, prediction_distance, reference_distance)
    return {
        "Dice": dice(prediction, reference),
        "IoU": iou(prediction, reference),
        "HD95": _hd95_of(distances),
        "ASD": _asd_of(distances),
        "BoundaryIoU": iou(_band(prediction, prediction_distance, boundary_distance_mm),
                           _band(reference, reference_distance, boundary_distance_mm)),
    }


def case_metrics(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int], spacing: Sequence[float],
                 boundary_distance_mm: float = DEFAULT_BOUNDARY_DISTANCE_MM) -> dict[int, dict[str, float]]:
    """``class_metrics`` of every label in ``labels`` for two label maps of one case: {label: {metric: value}}."""
    _check_same_grid(prediction, reference, spacing)
    return {label: class_metrics(prediction == label, reference == label, spacing, boundary_distance_mm)
            for label in labels}


def _pooled_surface_distances(prediction: np.ndarray, reference: np.ndarray, prediction_distance: np.ndarray,
                              reference_distance: np.ndarray) -> np.ndarray:
    return np.concatenate([reference_distance[surface(prediction)], prediction_distance[surface(reference)]])


def _hd95_of(distances: np.ndarray) -> float:
    return _surface_statistic(distances, lambda d: np.percentile(d, 95))


def _asd_of(distances: np.ndarray) -> float:
    return _surface_statistic(distances, np.mean)


def _surface_statistic(distances: np.ndarray, statistic: Callable[[np.ndarray], float]) -> float:
    """``statistic`` of pooled surface distances: no distances (both masks empty) give 0, infinite ones (a distance
    towards an empty mask) NaN."""
    if distances.size == 0:
        return 0.0
    if np.isinf(distances).any():
        return float("nan")
    return float(statistic(distances))


def _band(mask: np.ndarray, distance: np.ndarray, distance_mm: float) -> np.ndarray:
    return mask & (distance <= distance_mm)


def _check_same_grid(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> None:
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for {reference.ndim}D label maps")

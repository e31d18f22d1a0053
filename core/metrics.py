"""The project's one Chamfer distance and one volume IoU: every figure that names them comes from here.

Conventions:

- Units: the project's normalisation (a shape fits [-1, 1]^3), so distances are in those units.
- Chamfer distance compares two *point samples* (area-uniform samples of two surfaces, or a sample and stored
  surface points) through nearest neighbours (``scipy.spatial.cKDTree``, exact):

      accuracy     = mean over a of min over b |a - b|      (how far the first sample strays from the second)
      completeness = mean over b of min over a |b - a|      (how much of the second the first misses)
      chamfer_l1   = (accuracy + completeness) / 2          "CD-L1" of Occupancy Networks / 3DShape2VecSet / Dora
      chamfer_l2   = (mean of squared distances a->b + mean of squared distances b->a) / 2

  Both are the *mean* of the two directions (PointFlow and point-cloud-utils *sum* them: twice these values), and
  "L1" means Euclidean, not squared, distances. Two concentric spheres of radii 0.5 and 0.6 give chamfer_l1 0.1 and
  chamfer_l2 0.01. Sampling sets a floor: two independent N-point samples of one surface of area A sit about
  0.5 * sqrt(A / N) apart, so compare meshes with samples drawn with the same seed where possible.
- Volume IoU compares two boolean occupancies on the same query points: |A and B| / |A or B|, 1.0 when both are
  empty (they agree). With points uniform in a box it estimates the volume IoU (standard error about
  sqrt(IoU (1 - IoU) / N_union)).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree


def as_points(points: Any, name: str = "points") -> np.ndarray:
    """``points`` as a float64 (N, 3) array; anything else is a ValueError naming ``name``."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {points.shape}")
    return points


def nearest(
    source: np.ndarray, target: np.ndarray, tree: cKDTree | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance and index of each source point's nearest target point (``tree``: target's, if built)."""
    distances, indices = (tree or cKDTree(target)).query(source, k=1)
    return distances, indices


def chamfer_distance(
    pred_points: Any, gt_points: Any, trees: tuple[cKDTree, cKDTree] | None = None
) -> dict[str, float]:
    """Symmetric Chamfer distance between two point samples (conventions at the top of this module).

    Returns ``chamfer_l1``, ``chamfer_l2``, ``accuracy`` (pred -> gt) and ``completeness`` (gt -> pred).
    ``trees``: the two samples' KD-trees, when a caller compares each sample many times (a distance matrix).
    """
    pred, gt = as_points(pred_points, "pred_points"), as_points(gt_points, "gt_points")
    if len(pred) == 0 or len(gt) == 0:
        raise ValueError(f"chamfer_distance needs non-empty samples (pred {len(pred)}, gt {len(gt)} points)")
    pred_tree, gt_tree = trees or (None, None)
    pred_to_gt, _ = nearest(pred, gt, gt_tree)
    gt_to_pred, _ = nearest(gt, pred, pred_tree)
    return {
        "chamfer_l1": float(0.5 * (pred_to_gt.mean() + gt_to_pred.mean())),
        "chamfer_l2": float(0.5 * ((pred_to_gt**2).mean() + (gt_to_pred**2).mean())),
        "accuracy": float(pred_to_gt.mean()),
        "completeness": float(gt_to_pred.mean()),
    }


def volume_iou(pred_occupancy: Any, gt_occupancy: Any) -> float:
    """|pred AND gt| / |pred OR gt| of two boolean occupancies on the same points (numpy or CPU torch), in [0, 1];
    1.0 when both are empty."""
    pred, gt = np.asarray(pred_occupancy, dtype=bool), np.asarray(gt_occupancy, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"occupancy shapes differ: pred {pred.shape}, gt {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)

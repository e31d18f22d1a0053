"""Dora-bench reconstruction metrics: surface distances, F-score, normals, sharp-edge errors, volume IoU, levels.

Conventions shared by every metric here:

- Shapes live in the project's normalisation: the ground truth fits [-1, 1]^3 (``MeshProcessor`` margin 0.95), so
  every distance is in those units (the bounding-box diagonal of the cube is 2*sqrt(3) ~ 3.46; a 256^3 grid over
  [-1.05, 1.05]^3 has voxels of 0.0082).
- Surface metrics compare point samples drawn area-uniformly from both surfaces (``sample_surface``; 100k points
  per surface by default in ``mesh_metrics``), nearest neighbours found with a ``scipy.spatial.cKDTree``.
- Chamfer distance and volume IoU are the project's one Chamfer and one IoU (``dora_shapegen.metrics``, which
  documents the conventions): "Chamfer-L1" is the *Euclidean* (not squared) nearest-neighbour
  distance, averaged over points, then over the two directions; "Chamfer-L2" the same with squared distances.
- Sampling floor: two *independent* N-point samples of one surface of area A sit ~0.5 * sqrt(A / N) apart on average
  (~0.005 for A = 10, N = 100k), which bounds how small Chamfer and how large F-score@0.005 can be. ``mesh_metrics``
  draws both surfaces with the same seed (common random numbers) so a mesh against itself scores exactly 0 / 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import point_cloud_utils as pcu
import trimesh
from scipy.spatial import cKDTree

from dora_shapegen.data.sampling import sample_sharp_edges, sharp_edges
from dora_shapegen.data.sampling import sample_surface as _sample_surface_rng
from dora_shapegen.metrics import as_points, chamfer_distance, nearest, volume_iou

DEFAULT_FSCORE_THRESHOLDS = (0.005, 0.01, 0.02)
# Levels by the number of dihedral-sharp mesh edges (> 30 deg): L1 < 10 (smooth: spheres, organic scans such as
# bunny or knot), L2 < 200 (a few creases: a cube has 12), L3 < 1000 (mechanical parts: fandisk, pinion),
# L4 >= 1000 (many creases: turbine, cheese, gears with many teeth). Calibrated on ../shared/meshes; configurable.
DEFAULT_SHARP_EDGE_COUNT_THRESHOLDS = (10, 200, 1000)
# The same grading by total sharp-edge length in [-1, 1] units (tessellation-independent): a cube of side 1.9 has
# 22.8 -> L2; pinion 63 -> L3; cheese 263 -> L4.
DEFAULT_SHARP_EDGE_LENGTH_THRESHOLDS = (2.0, 30.0, 100.0)


def sample_surface(mesh: trimesh.Trimesh, num_points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_points`` area-uniform surface samples and their face normals, ((N, 3), (N, 3)) float32.

    Deterministic for a given ``seed``; an empty mesh gives two (0, 3) arrays.
    """
    if len(mesh.faces) == 0 or num_points <= 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    return _sample_surface_rng(mesh, num_points, np.random.default_rng(seed))


def f_score(
    pred_points: np.ndarray, gt_points: np.ndarray, thresholds: Sequence[float] = DEFAULT_FSCORE_THRESHOLDS
) -> dict[str, float]:
    """F-score at each distance threshold tau (in [-1, 1] units), in [0, 1] (1 = perfect).

    precision@tau = fraction of pred points within tau of the gt sample; recall@tau = fraction of gt points
    within tau of the pred sample; f_score@tau = 2PR / (P + R) (0 when both are 0). Keys use ``f"{tau:g}"``,
    e.g. ``f_score@0.01``. With 100k points on a shape of area ~10 the sample spacing is ~0.01, so tau = 0.005 is
    partly limited by sampling.
    """
    pred, gt = as_points(pred_points, "pred_points"), as_points(gt_points, "gt_points")
    if len(pred) == 0 or len(gt) == 0:
        raise ValueError(f"f_score needs non-empty samples (pred {len(pred)}, gt {len(gt)} points)")
    pred_to_gt, _ = nearest(pred, gt)
    gt_to_pred, _ = nearest(gt, pred)
    result = {}
    for tau in thresholds:
        precision = float((pred_to_gt < tau).mean())
        recall = float((gt_to_pred < tau).mean())
        total = precision + recall
        result[f"f_score@{tau:g}"] = 2.0 * precision * recall / total if total > 0 else 0.0
        result[f"precision@{tau:g}"] = precision
        result[f"recall@{tau:g}"] = recall
    return result


def normal_consistency(
    pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray, gt_normals: np.ndarray
) -> float:
    """Mean |cos| between each point's normal and its nearest neighbour's normal, both directions averaged.

    In [0, 1] (1 = identical orientation up to sign; ~0.5 for unrelated directions). Orientation-agnostic, so a
    ground truth with inconsistently wound faces is not penalised.
    """
    pred, gt = as_points(pred_points, "pred_points"), as_points(gt_points, "gt_points")
    pred_n = _unit(as_points(pred_normals, "pred_normals"))
    gt_n = _unit(as_points(gt_normals, "gt_normals"))
    _, pred_to_gt = nearest(pred, gt)
    _, gt_to_pred = nearest(gt, pred)
    forward = np.abs(np.einsum("ij,ij->i", pred_n, gt_n[pred_to_gt])).mean()
    backward = np.abs(np.einsum("ij,ij->i", gt_n, pred_n[gt_to_pred])).mean()
    return float(0.5 * (forward + backward))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _near(points: np.ndarray, sharp_points: np.ndarray, radius: float) -> np.ndarray:
    if len(sharp_points) == 0 or len(points) == 0:
        return np.zeros(len(points), dtype=bool)
    distances, _ = cKDTree(sharp_points).query(points, k=1, distance_upper_bound=radius)
    return np.isfinite(distances)


def sharp_edge_error(
    pred_points: np.ndarray, gt_points: np.ndarray, gt_sharp_points: np.ndarray, radius: float = 0.02
) -> dict[str, float]:
    """Chamfer-style distances restricted to the neighbourhood of ground-truth sharp edges ([-1, 1] units).

    The geometric counterpart of Dora's rendered Sharp Normal Error. ``gt_sharp_points`` are samples along the gt
    sharp edges; a point is "near" when within ``radius`` of one of them.

    Returns ``sharp_completeness`` (mean distance from gt points near sharp edges to the pred sample: rounded-off
    creases raise it), ``sharp_accuracy`` (mean distance from pred points near the gt sharp edges to the gt
    sample), ``sharp_chamfer_l1`` (their average), ``sharp_chamfer_l2`` (same, squared distances) and the point
    counts. No gt points near a sharp edge (a smooth shape) -> NaN distances and ``num_sharp_gt_points = 0``.
    """
    pred, gt = as_points(pred_points, "pred_points"), as_points(gt_points, "gt_points")
    sharp = as_points(gt_sharp_points, "gt_sharp_points")
    gt_near, pred_near = gt[_near(gt, sharp, radius)], pred[_near(pred, sharp, radius)]
    result = {"num_sharp_gt_points": len(gt_near), "num_sharp_pred_points": len(pred_near)}
    if len(gt_near) == 0 or len(pred) == 0:
        keys = ("sharp_completeness", "sharp_accuracy", "sharp_chamfer_l1", "sharp_chamfer_l2")
        return result | dict.fromkeys(keys, math.nan)
    completeness, _ = nearest(gt_near, pred)
    # No pred point near the gt creases: the prediction misses the region, so the gt-side distances stand for both.
    accuracy = nearest(pred_near, gt)[0] if len(pred_near) else completeness
    result["sharp_completeness"] = float(completeness.mean())
    result["sharp_accuracy"] = float(accuracy.mean())
    result["sharp_chamfer_l1"] = 0.5 * (result["sharp_completeness"] + result["sharp_accuracy"])
    result["sharp_chamfer_l2"] = float(0.5 * ((completeness**2).mean() + (accuracy**2).mean()))
    return result


def sharp_normal_error(
    pred_mesh: trimesh.Trimesh,
    gt_mesh: trimesh.Trimesh,
    gt_sharp_points: np.ndarray,
    radius: float = 0.02,
    num_points: int = 100_000,
    seed: int = 0,
) -> float:
    """Mean angle in degrees, in [0, 90], between gt and pred surface normals near gt sharp edges (geometric).

    gt surface samples within ``radius`` of ``gt_sharp_points`` keep their face normal; the pred normal is the
    normal of the pred face closest to that sample. The angle is orientation-agnostic (arccos |cos|). A crease
    reproduced sharply scores ~0; a rounded crease scores up to half its dihedral angle. This is the geometric
    stand-in for Dora's rendered Sharp Normal Error (which compares rendered normal maps). NaN when no gt sample
    is near a sharp edge; 90 for an empty prediction.
    """
    if len(pred_mesh.faces) == 0:
        return 90.0
    gt_points, gt_normals = sample_surface(gt_mesh, num_points, seed)
    near = _near(gt_points.astype(np.float64), as_points(gt_sharp_points, "gt_sharp_points"), radius)
    if not near.any():
        return math.nan
    _, face_index, _ = pcu.closest_points_on_mesh(
        gt_points[near].astype(np.float64),
        np.asarray(pred_mesh.vertices, np.float64),
        np.asarray(pred_mesh.faces, np.int64),
    )
    pred_normals = pred_mesh.face_normals[face_index]
    cosine = np.abs(np.einsum("ij,ij->i", _unit(gt_normals[near].astype(np.float64)), pred_normals))
    return float(np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0))).mean())


def mesh_occupancy(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Inside test by generalized winding number (> 0.5), robust to small holes; empty mesh -> all False."""
    if len(mesh.faces) == 0:
        return np.zeros(len(points), dtype=bool)
    winding = pcu.triangle_soup_fast_winding_number(
        np.asarray(mesh.vertices, np.float64),
        np.asarray(mesh.faces, np.int64),
        np.asarray(points, np.float64),
    )
    return np.asarray(winding) > 0.5


def mesh_volume_iou(
    pred_mesh: trimesh.Trimesh,
    gt_mesh: trimesh.Trimesh,
    num_points: int = 100_000,
    seed: int = 0,
    bounds: float = 1.05,
) -> float:
    """Volume IoU of two meshes from winding-number occupancy of ``num_points`` uniform points in [-bounds, bounds]^3."""
    points = np.random.default_rng(seed).uniform(-bounds, bounds, size=(num_points, 3))
    return volume_iou(mesh_occupancy(pred_mesh, points), mesh_occupancy(gt_mesh, points))


def count_sharp_edges(mesh: trimesh.Trimesh, angle_deg: float = 30.0) -> int:
    """Number of mesh edges whose dihedral angle exceeds ``angle_deg`` (``data.sampling.sharp_edges``)."""
    edges, _ = sharp_edges(mesh, angle_deg)
    return len(edges)


def sharp_edge_length(mesh: trimesh.Trimesh, angle_deg: float = 30.0) -> float:
    """Total length of the sharp edges (dihedral > ``angle_deg``), in the mesh's units."""
    edges, _ = sharp_edges(mesh, angle_deg)
    vertices = np.asarray(mesh.vertices)
    return (
        float(np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1).sum())
        if len(edges)
        else 0.0
    )


def sample_sharp_points(
    mesh: trimesh.Trimesh, num_points: int, angle_deg: float = 30.0, seed: int = 0
) -> np.ndarray:
    """(N, 3) points along the sharp edges in proportion to length; (0, 3) when the mesh has none."""
    edges, normals = sharp_edges(mesh, angle_deg)
    if len(edges) == 0 or num_points <= 0:
        return np.zeros((0, 3), np.float32)
    points, _ = sample_sharp_edges(
        np.asarray(mesh.vertices), edges, normals, num_points, np.random.default_rng(seed)
    )
    return points


def complexity_level(value: float, thresholds: Sequence[float] = DEFAULT_SHARP_EDGE_COUNT_THRESHOLDS) -> int:
    """Complexity level 1..4 from a sharp-edge count (or length): L1 if value < t1, L2 < t2, L3 < t3, else L4.

    Use ``DEFAULT_SHARP_EDGE_COUNT_THRESHOLDS`` with ``count_sharp_edges`` (default) or
    ``DEFAULT_SHARP_EDGE_LENGTH_THRESHOLDS`` with ``sharp_edge_length``; both are documented at the module top.
    """
    if len(thresholds) != 3 or any(b < a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"thresholds must be 3 non-decreasing numbers, got {tuple(thresholds)}")
    return 1 + int(np.searchsorted(np.asarray(thresholds, dtype=float), float(value), side="right"))


def mesh_metrics(
    pred_mesh: trimesh.Trimesh,
    gt_mesh: trimesh.Trimesh,
    num_points: int = 100_000,
    seed: int = 0,
    fscore_thresholds: Sequence[float] = DEFAULT_FSCORE_THRESHOLDS,
    num_volume_points: int = 100_000,
    bounds: float = 1.05,
    sharp_angle_deg: float = 30.0,
    sharp_radius: float = 0.02,
    gt_sharp_points: np.ndarray | None = None,
    level_by: str = "count",
    level_thresholds: Sequence[float] | None = None,
) -> dict[str, float | int | bool]:
    """Every metric above for one reconstruction, as a flat dict (see each function for units).

    ``gt_sharp_points`` default: ``num_points // 10`` samples along the gt's dihedral-sharp edges. The complexity
    level is graded on the gt by ``level_by`` ("count" or "length") with ``level_thresholds`` (defaults above).
    An empty prediction does not raise: ``empty_prediction`` is True and every metric takes its worst value
    (distances = the box diagonal 2*sqrt(3)*bounds, squared for L2; F-scores, IoU, normal consistency 0;
    sharp normal error 90 degrees).
    """
    if level_by not in ("count", "length"):
        raise ValueError(f"level_by must be 'count' or 'length', got {level_by!r}")
    if len(gt_mesh.faces) == 0:
        raise ValueError("mesh_metrics: the ground-truth mesh is empty")
    num_sharp = count_sharp_edges(gt_mesh, sharp_angle_deg)
    length = sharp_edge_length(gt_mesh, sharp_angle_deg)
    default = (
        DEFAULT_SHARP_EDGE_COUNT_THRESHOLDS if level_by == "count" else DEFAULT_SHARP_EDGE_LENGTH_THRESHOLDS
    )
    level = complexity_level(num_sharp if level_by == "count" else length, level_thresholds or default)
    result: dict[str, float | int | bool] = {
        "num_points": num_points,
        "num_sharp_edges": num_sharp,
        "sharp_edge_length": length,
        "complexity_level": level,
        "empty_prediction": len(pred_mesh.faces) == 0,
    }
    if gt_sharp_points is None:
        gt_sharp_points = sample_sharp_points(gt_mesh, max(num_points // 10, 1), sharp_angle_deg, seed)
    gt_points, gt_normals = sample_surface(gt_mesh, num_points, seed)
    if result["empty_prediction"]:
        worst = 2.0 * math.sqrt(3.0) * bounds
        result |= {"chamfer_l1": worst, "chamfer_l2": worst**2, "accuracy": worst, "completeness": worst}
        for tau in fscore_thresholds:
            result |= {f"f_score@{tau:g}": 0.0, f"precision@{tau:g}": 0.0, f"recall@{tau:g}": 0.0}
        has_sharp = len(gt_sharp_points) > 0
        sharp_worst = worst if has_sharp else math.nan
        result |= {
            "normal_consistency": 0.0,
            "volume_iou": 0.0,
            "sharp_completeness": sharp_worst,
            "sharp_accuracy": sharp_worst,
            "sharp_chamfer_l1": sharp_worst,
            "sharp_chamfer_l2": sharp_worst**2,
            "sharp_normal_error_deg": 90.0 if has_sharp else math.nan,
        }
        return result
    # Same seed for both surfaces (common random numbers): a mesh against itself scores exactly 0 / 1, and nearly
    # identical meshes are not swamped by the sampling noise (~ the sample spacing) of two independent draws.
    pred_points, pred_normals = sample_surface(pred_mesh, num_points, seed)
    result |= chamfer_distance(pred_points, gt_points)
    result |= f_score(pred_points, gt_points, fscore_thresholds)
    result["normal_consistency"] = normal_consistency(pred_points, pred_normals, gt_points, gt_normals)
    result["volume_iou"] = mesh_volume_iou(pred_mesh, gt_mesh, num_volume_points, seed, bounds)
    result |= sharp_edge_error(pred_points, gt_points, gt_sharp_points, sharp_radius)
    result["sharp_normal_error_deg"] = sharp_normal_error(
        pred_mesh, gt_mesh, gt_sharp_points, sharp_radius, num_points, seed
    )
    return result

"""Query points and occupancy / TSDF labels for training the VAE's decoder.

Groups (``Supervision.group``): 0 = volume (uniform in [-bounds, bounds]^3), 1 = near-surface (Gaussian noise
around uniform surface samples), 2 = sharp-near (noise around salient samples). Noise scales follow Dora.

Inside/outside comes from the generalised winding number (pcu's fast winding number), which stays right on
open, self-intersecting or badly oriented meshes where ray parity tests fail; the distance is the exact
point-to-triangle distance (pcu's AABB tree). TSDF uses Dora's sign: positive inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import point_cloud_utils as pcu
import trimesh

from dora_shapegen.data.sampling import PointCloud

GROUP_VOLUME, GROUP_NEAR, GROUP_SHARP = 0, 1, 2
UNIFORM_NOISE_SCALES = (0.001, 0.005)
SALIENT_NOISE_SCALES = (0.001, 0.005, 0.007, 0.01)


@dataclass
class Supervision:
    points: np.ndarray  # (M, 3) float32
    occupancy: np.ndarray  # (M,) float32 in {0, 1}, inside = 1
    tsdf: np.ndarray  # (M,) float32 in [-1, 1], positive inside, sdf clipped to +-truncation / truncation
    group: np.ndarray  # (M,) int8: 0 volume, 1 near-surface, 2 sharp-near

    def to_dict(self, prefix: str = "sup_") -> dict[str, np.ndarray]:
        return {f"{prefix}{name}": getattr(self, name) for name in ("points", "occupancy", "tsdf", "group")}


def _around(points: np.ndarray, count: int, scales: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """``count`` points: random picks of ``points`` plus isotropic Gaussian noise, scales used in equal shares."""
    if count <= 0 or len(points) == 0:
        return np.zeros((0, 3), np.float32)
    picks = points[rng.integers(len(points), size=count)]
    sigma = np.asarray(scales, dtype=np.float64)[np.arange(count) % len(scales)]
    return (picks + rng.normal(size=(count, 3)) * sigma[:, None]).astype(np.float32)


def sample_query_points(
    point_cloud: PointCloud,
    n_volume: int,
    n_near: int,
    n_sharp: int,
    rng: np.random.Generator,
    bounds: float = 1.05,
    uniform_scales: Sequence[float] = UNIFORM_NOISE_SCALES,
    salient_scales: Sequence[float] = SALIENT_NOISE_SCALES,
) -> tuple[np.ndarray, np.ndarray]:
    """Query points ``(M, 3)`` and their group ids ``(M,)`` int8; the sharp group falls back to uniform
    points when the point cloud has no salient points."""
    volume = rng.uniform(-bounds, bounds, size=(n_volume, 3)).astype(np.float32)
    near = _around(point_cloud.uniform_points, n_near, uniform_scales, rng)
    salient_source = (
        point_cloud.salient_points if len(point_cloud.salient_points) else point_cloud.uniform_points
    )
    sharp = _around(salient_source, n_sharp, salient_scales, rng)
    points = np.concatenate([volume, near, sharp]).astype(np.float32)
    group = np.concatenate(
        [np.full(len(volume), GROUP_VOLUME), np.full(len(near), GROUP_NEAR), np.full(len(sharp), GROUP_SHARP)]
    ).astype(np.int8)
    return points, group


def label_points(
    mesh: trimesh.Trimesh, points: np.ndarray, truncation: float = 0.015
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(occupancy, tsdf, sdf)`` of ``points`` (M, 3) w.r.t. ``mesh``; sdf/tsdf are positive inside.

    |sdf| is exact up to the truncation; beyond it, it is a lower bound that is itself beyond the truncation, which
    leaves the TSDF unchanged (clipped to +-1) and skips the costly exact query for far volume points.
    """
    from scipy.spatial import cKDTree

    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.int32)
    queries = np.ascontiguousarray(points, dtype=np.float64)
    winding = pcu.triangle_soup_fast_winding_number(vertices, faces, queries)  # (M,) ~1 inside, ~0 outside
    inside = np.abs(winding) > 0.5  # abs: a mesh with inverted orientation still labels the same way
    # Any surface point lies within the longest edge of some vertex, so the true distance is at least
    # (distance to the nearest vertex - longest edge): a point with no vertex within truncation + longest edge is
    # "far" (TSDF = +-1). The bounded k-d tree query stops early for those, the exact query runs on the rest.
    longest_edge = float(mesh.edges_unique_length.max())
    reach = truncation + longest_edge
    distance = cKDTree(vertices).query(queries, distance_upper_bound=reach)[0]  # (M,), inf when far
    near = np.isfinite(distance)
    distance[~near] = reach  # a lower bound of the true distance; enough for the clipped TSDF
    if near.any():
        distance[near] = pcu.closest_points_on_mesh(np.ascontiguousarray(queries[near]), vertices, faces)[0]
    sdf = np.where(inside, distance, -distance)
    tsdf = np.clip(sdf / truncation, -1.0, 1.0)
    return inside.astype(np.float32), tsdf.astype(np.float32), sdf.astype(np.float32)


def sample_supervision(
    mesh: trimesh.Trimesh,
    point_cloud: PointCloud,
    n_volume: int = 16384,
    n_near: int = 16384,
    n_sharp: int = 8192,
    truncation: float = 0.015,
    bounds: float = 1.05,
    seed: int = 0,
    near_noise_scales: Sequence[float] = UNIFORM_NOISE_SCALES,
    sharp_noise_scales: Sequence[float] = SALIENT_NOISE_SCALES,
) -> Supervision:
    """Query points around ``point_cloud`` and in the volume, labelled against ``mesh`` (ideally watertight).
    ``near_noise_scales`` / ``sharp_noise_scales``: Gaussian noise sigmas of the two near-surface groups."""
    rng = np.random.default_rng(seed)
    points, group = sample_query_points(
        point_cloud,
        n_volume,
        n_near,
        n_sharp,
        rng,
        bounds=bounds,
        uniform_scales=near_noise_scales,
        salient_scales=sharp_noise_scales,
    )
    occupancy, tsdf, _ = label_points(mesh, points, truncation)
    return Supervision(points=points, occupancy=occupancy, tsdf=tsdf, group=group)

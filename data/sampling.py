"""Surface samples for the VAE: area-uniform points and salient points on sharp edges (Dora's SES).

Salient points lie on edges whose dihedral angle exceeds a threshold, spread along the edges in proportion to
length, with the mean normal of the two faces. A mesh with few or no sharp edges still gets its full salient
budget from a normal-variation heuristic (Dora drops such meshes; we keep them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import fpsample
import numpy as np
import trimesh


@dataclass
class PointCloud:
    """Surface samples of one shape (numpy float32), the VAE's input."""

    uniform_points: np.ndarray  # (N_u, 3)
    uniform_normals: np.ndarray  # (N_u, 3)
    salient_points: np.ndarray  # (N_s, 3)
    salient_normals: np.ndarray  # (N_s, 3)
    epsilon: float | None = None  # epsilon of the processor that made it (VAE warns on a mismatch)
    stats: dict[str, Any] = field(default_factory=dict)  # num_sharp_edges, sharp_edge_length, ...

    @property
    def uniform(self) -> np.ndarray:
        return np.concatenate([self.uniform_points, self.uniform_normals], axis=1)  # (N_u, 6)

    @property
    def salient(self) -> np.ndarray:
        return np.concatenate([self.salient_points, self.salient_normals], axis=1)  # (N_s, 6)

    def to_dict(self) -> dict[str, np.ndarray]:
        return {
            name: getattr(self, name)
            for name in ("uniform_points", "uniform_normals", "salient_points", "salient_normals")
        }

    def subset(self, uniform_index: np.ndarray, salient_index: np.ndarray) -> PointCloud:
        return dataclasses.replace(
            self,
            uniform_points=self.uniform_points[uniform_index],
            uniform_normals=self.uniform_normals[uniform_index],
            salient_points=self.salient_points[salient_index],
            salient_normals=self.salient_normals[salient_index],
        )


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def sample_surface(
    mesh: trimesh.Trimesh, count: int, rng: np.random.Generator, face_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points on the surface, area-weighted (times ``face_weights``), with their face normals."""
    if count <= 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    weights = np.asarray(mesh.area_faces, dtype=np.float64)
    if face_weights is not None:
        weights = weights * face_weights
    cumulative = np.cumsum(weights)
    # searchsorted on the cumulative weights: O(count log F), much cheaper than rng.choice(p=...) re-normalising.
    face_index = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    face_index = np.minimum(face_index, len(weights) - 1)
    triangles = mesh.triangles[face_index]  # (count, 3, 3)
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0  # fold the unit square onto the triangle: uniform barycentrics
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    points = triangles[:, 0] + u[:, None] * (triangles[:, 1] - triangles[:, 0])
    points += v[:, None] * (triangles[:, 2] - triangles[:, 0])
    normals = mesh.face_normals[face_index]
    return points.astype(np.float32), normals.astype(np.float32)


def sharp_edges(mesh: trimesh.Trimesh, angle_deg: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Edges whose dihedral angle (between the two face normals) exceeds ``angle_deg``.

    Returns ``(edges (E, 2) vertex indices, normals (E, 3))``, the normal being the mean of the two faces'.
    """
    if len(mesh.faces) < 2:
        return np.zeros((0, 2), np.int64), np.zeros((0, 3))
    angles = mesh.face_adjacency_angles  # (A,) radians in [0, pi]
    sharp = angles > np.deg2rad(angle_deg)
    edges = mesh.face_adjacency_edges[sharp]
    pair = mesh.face_adjacency[sharp]
    normals = mesh.face_normals[pair[:, 0]] + mesh.face_normals[pair[:, 1]]
    # Two opposite faces (a folded sheet) sum to ~0: fall back to one face's normal.
    folded = np.linalg.norm(normals, axis=1) < 1e-6
    normals[folded] = mesh.face_normals[pair[folded, 0]]
    return edges, _unit(normals)


def sample_sharp_edges(
    vertices: np.ndarray, edges: np.ndarray, normals: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points along ``edges`` in proportion to edge length."""
    starts, ends = vertices[edges[:, 0]], vertices[edges[:, 1]]
    cumulative = np.cumsum(np.linalg.norm(ends - starts, axis=1))
    edge_index = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    edge_index = np.minimum(edge_index, len(edges) - 1)
    t = rng.random(count)[:, None]
    points = starts[edge_index] + t * (ends[edge_index] - starts[edge_index])
    return points.astype(np.float32), normals[edge_index].astype(np.float32)


def normal_variation(mesh: trimesh.Trimesh) -> np.ndarray:
    """Per-face local variation of normals, (F,) in [0, 2]: 1 - area-weighted cos(face, vertex normal).

    A vertex normal is the area-weighted mean of its faces' normals, so the score is high where the faces around
    a vertex disagree (creases, high curvature) and ~0 on flat regions.
    """
    faces, face_normals, areas = mesh.faces, mesh.face_normals, mesh.area_faces
    vertex_normals = np.zeros((len(mesh.vertices), 3))
    for corner in range(3):
        np.add.at(vertex_normals, faces[:, corner], face_normals * areas[:, None])
    vertex_normals = _unit(vertex_normals)
    agreement = np.zeros(len(mesh.vertices))
    weight = np.zeros(len(mesh.vertices))
    for corner in range(3):
        cosine = np.einsum("ij,ij->i", face_normals, vertex_normals[faces[:, corner]])
        np.add.at(agreement, faces[:, corner], cosine * areas)
        np.add.at(weight, faces[:, corner], areas)
    vertex_variation = 1.0 - agreement / np.maximum(weight, 1e-20)  # (V,)
    return np.clip(vertex_variation[faces].mean(axis=1), 0.0, 2.0)  # (F,)


def farthest_point_sampling(points: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` farthest points (fpsample's bucket FPS, QuickFPS: ~O(n log n), not O(n * count))."""
    total = len(points)
    if count >= total:
        return np.arange(total)
    if count <= 0:
        return np.zeros(0, np.int64)
    start = int(np.random.default_rng(seed).integers(total))
    height = 5 if total < 100_000 else 7  # bucket size 2**h, as fpsample's docs advise for the workload
    index = fpsample.bucket_fps_kdline_sampling(
        np.ascontiguousarray(points[:, :3]), count, h=height, start_idx=start
    )
    return np.asarray(index, dtype=np.int64)


def sample_point_cloud(
    mesh: trimesh.Trimesh,
    n_uniform: int = 4096,
    n_salient: int = 512,
    sharp_angle_deg: float = 30.0,
    min_sharp_edges: int = 8,
    seed: int = 0,
    epsilon: float | None = None,
    sharp_source: trimesh.Trimesh | None = None,
) -> PointCloud:
    """Uniform + salient samples of ``mesh``.

    ``sharp_source``: detect sharp edges on this mesh instead (the clean input, whose creases the marching-cubes
    surface only approximates) and project the edge samples onto ``mesh``. With fewer than ``min_sharp_edges``
    sharp edges, a matching share of the salient budget goes to normal-variation samples instead.
    """
    rng = np.random.default_rng(seed)
    uniform_points, uniform_normals = sample_surface(mesh, n_uniform, rng)
    edge_mesh = mesh if sharp_source is None else sharp_source
    edges, edge_normals = sharp_edges(edge_mesh, sharp_angle_deg)
    edge_lengths = np.linalg.norm(edge_mesh.vertices[edges[:, 0]] - edge_mesh.vertices[edges[:, 1]], axis=1)
    num_sharp = len(edges)
    n_edge = n_salient if num_sharp >= min_sharp_edges else (n_salient * num_sharp) // max(min_sharp_edges, 1)
    parts_points, parts_normals = [], []
    if n_edge > 0:
        points, normals = sample_sharp_edges(edge_mesh.vertices, edges, edge_normals, n_edge, rng)
        if sharp_source is not None:
            points, normals = project_to_surface(mesh, points, normals)
        parts_points.append(points)
        parts_normals.append(normals)
    n_fill = n_salient - n_edge
    if n_fill > 0:
        variation = normal_variation(mesh)
        # A floor keeps a perfectly smooth shape (a sphere: variation ~0 everywhere) sampleable.
        weights = variation + 1e-3 * max(variation.max(), 1e-6)
        points, normals = sample_surface(mesh, n_fill, rng, face_weights=weights)
        parts_points.append(points)
        parts_normals.append(normals)
    salient_points = np.concatenate(parts_points) if parts_points else np.zeros((0, 3), np.float32)
    salient_normals = np.concatenate(parts_normals) if parts_normals else np.zeros((0, 3), np.float32)
    stats = {
        "num_sharp_edges": int(num_sharp),
        "sharp_edge_length": float(edge_lengths.sum()),
        "num_salient_from_edges": int(n_edge),
        "num_salient_from_fill": int(n_fill),
    }
    return PointCloud(
        uniform_points.astype(np.float32),
        uniform_normals.astype(np.float32),
        salient_points.astype(np.float32),
        salient_normals.astype(np.float32),
        epsilon=epsilon,
        stats=stats,
    )


def project_to_surface(
    mesh: trimesh.Trimesh, points: np.ndarray, normals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Closest points on ``mesh`` (e.g. edge samples of the input moved onto its watertight offset surface).

    The normal of the projected point is its face's normal, unless that face points against the original
    normal (the far side of a thin offset shell), where the original is kept.
    """
    import point_cloud_utils as pcu

    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.int32)
    _, face_index, barycentric = pcu.closest_points_on_mesh(
        np.ascontiguousarray(points, np.float64), vertices, faces
    )
    projected = pcu.interpolate_barycentric_coords(faces, face_index, barycentric, vertices)
    face_normals = mesh.face_normals[face_index]
    agree = np.einsum("ij,ij->i", face_normals, normals) > 0
    new_normals = np.where(agree[:, None], face_normals, normals)
    return projected.astype(np.float32), _unit(new_normals).astype(np.float32)

"""Mesh extraction: the coarse-to-fine path must give the dense path's surface with far fewer field queries."""

from __future__ import annotations

import numpy as np
import point_cloud_utils as pcu
import pytest
import torch
import trimesh

from dora_shapegen.data.marching import evaluate_grid, extract_mesh, grid_points, level_resolutions

SHARPNESS = 40.0  # sigmoid slope: a smooth occupancy-like field, as a decoder's sigmoid(logit) is


def sphere_field(center=(0.0, 0.0, 0.0), radius=0.5):
    center_t = torch.tensor(center, dtype=torch.float32)

    def field(points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(SHARPNESS * (radius - (points - center_t).norm(dim=-1)))

    return field


def box_field(points: torch.Tensor) -> torch.Tensor:
    half = torch.tensor([0.6, 0.45, 0.3])
    offset = torch.tensor([0.03, -0.02, 0.01])  # off-grid faces
    return torch.sigmoid(SHARPNESS * (half - (points - offset).abs()).min(dim=-1).values)


def union(*fields):
    return lambda points: torch.stack([f(points) for f in fields]).amax(dim=0)


def thin_plate_field(points: torch.Tensor) -> torch.Tensor:
    # 0.09 thick (11 voxels at 128^3, 1.4 coarse cells at 32^3): thin, yet seen by the coarse level.
    extents = torch.tensor([0.7, 0.5, 0.045])
    return torch.sigmoid(
        4 * SHARPNESS * (extents - (points - torch.tensor([0.0, 0.0, 0.013])).abs()).min(dim=-1).values
    )


FIELDS = {
    "sphere": sphere_field(),
    "box": box_field,
    "two_spheres": union(sphere_field((-0.45, 0.1, 0.0), 0.35), sphere_field((0.5, -0.1, 0.05), 0.3)),
    "thin_plate": thin_plate_field,
}


def winding_occupancy(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    return pcu.triangle_soup_fast_winding_number(mesh.vertices, mesh.faces.astype(np.int64), points) > 0.5


def volume_iou_near_surface(mesh_a: trimesh.Trimesh, mesh_b: trimesh.Trimesh, seed: int = 0) -> float:
    """IoU on uniform points plus points jittered around surface a (where disagreements would be)."""
    rng = np.random.default_rng(seed)
    surface, _ = trimesh.sample.sample_surface(mesh_a, 10000, seed=seed)
    points = np.concatenate(
        [rng.uniform(-1.05, 1.05, (10000, 3)), surface + rng.normal(scale=0.02, size=surface.shape)]
    )
    occ_a, occ_b = winding_occupancy(mesh_a, points), winding_occupancy(mesh_b, points)
    return (occ_a & occ_b).sum() / (occ_a | occ_b).sum()


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_hierarchical_matches_dense_with_fewer_queries(name):
    field = FIELDS[name]
    dense = extract_mesh(field, resolution=128, method="dense")
    hierarchical = extract_mesh(field, resolution=128, method="hierarchical", coarse_resolution=32)
    assert dense.metadata["num_queries"] == 129**3
    assert hierarchical.metadata["num_queries"] * 5 < dense.metadata["num_queries"]
    assert hierarchical.metadata["num_queries"] == sum(hierarchical.metadata["queries_per_level"])
    assert hierarchical.metadata["level_resolutions"] == [32, 64, 128]
    assert volume_iou_near_surface(dense, hierarchical) >= 0.99
    assert abs(hierarchical.volume - dense.volume) <= 1e-3 * abs(dense.volume)
    assert hierarchical.is_watertight


def test_hierarchical_grid_has_the_dense_sign_everywhere():
    field = FIELDS["two_spheres"]
    dense = evaluate_grid(field, resolution=64, method="dense")
    hierarchical = evaluate_grid(field, resolution=64, method="hierarchical", coarse_resolution=16)
    np.testing.assert_array_equal(hierarchical.values > 0.5, dense.values > 0.5)


def test_sphere_is_watertight_outward_and_in_world_coordinates():
    center, radius = (0.2, -0.1, 0.05), 0.5
    mesh = extract_mesh(sphere_field(center, radius), resolution=96, coarse_resolution=24)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals give a positive signed volume
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.01)
    distance = np.linalg.norm(mesh.vertices - np.array(center), axis=1)
    assert np.abs(distance - radius).max() < 2.1 / 96  # within a voxel
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - np.array(center))
    assert (outward > 0).all()


def test_remove_floaters_drops_a_tiny_ball_and_keeps_two_big_ones():
    field = union(
        sphere_field((-0.45, 0.0, 0.0), 0.35),
        sphere_field((0.45, 0.0, 0.0), 0.35),
        sphere_field((0.0, 0.7, 0.0), 0.05),
    )
    kept_all = extract_mesh(field, resolution=96, coarse_resolution=24)
    cleaned = extract_mesh(
        field, resolution=96, coarse_resolution=24, remove_floaters=True, min_component_fraction=0.05
    )
    assert len(kept_all.split(only_watertight=False)) == 3
    parts = cleaned.split(only_watertight=False)
    assert len(parts) == 2
    assert all(part.is_watertight for part in parts)
    assert np.abs(cleaned.vertices[:, 1]).max() < 0.4  # the small ball at y = 0.7 is gone


def test_empty_field_gives_empty_mesh_and_warning():
    with pytest.warns(UserWarning, match="no surface"):
        mesh = extract_mesh(lambda points: torch.zeros(len(points)), resolution=64)
    assert len(mesh.faces) == 0 and len(mesh.vertices) == 0
    assert mesh.metadata["num_queries"] == 33**3  # only the coarse 32^3 level: nothing to refine


def test_batched_field_output_and_chunking():
    seen = []

    def batched(points: torch.Tensor) -> torch.Tensor:
        seen.append(len(points))
        return sphere_field()(points)[None]  # (1, M), like DoraVAE.decode(latents) for one shape

    mesh = extract_mesh(batched, resolution=48, coarse_resolution=12, chunk_size=5000)
    assert mesh.is_watertight
    assert max(seen) <= 5000
    assert sum(seen) == mesh.metadata["num_queries"]


def test_bad_field_output_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="field returned shape"):
        extract_mesh(lambda points: torch.zeros(2, len(points)), resolution=16)
    with pytest.raises(ValueError, match="method"):
        extract_mesh(sphere_field(), resolution=16, method="octree")


def test_grid_points_order_and_levels():
    points = grid_points(4, bounds=1.0)
    assert points.shape == (125, 3)
    assert torch.allclose(points[0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(points[1], torch.tensor([-1.0, -1.0, -0.5]))  # z varies fastest (C order)
    assert torch.allclose(points[-1], torch.tensor([1.0, 1.0, 1.0]))
    grid = evaluate_grid(sphere_field(), resolution=8, method="dense", bounds=1.0)
    np.testing.assert_allclose(
        grid.values.reshape(-1), sphere_field()(grid_points(8, 1.0)).numpy(), rtol=1e-6
    )
    assert level_resolutions(256, 32) == [32, 64, 128, 256]
    assert level_resolutions(100, 32) == [50, 100]
    assert level_resolutions(64, 64) == [64]

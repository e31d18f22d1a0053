"""Uniform and salient (sharp-edge) sampling, normal-variation fill, FPS."""

from __future__ import annotations

import numpy as np
import trimesh

from dora_shapegen.data import MeshProcessor, PointCloud
from dora_shapegen.data.sampling import farthest_point_sampling, sharp_edges


def _distance_to_cube_edges(points: np.ndarray, half: float) -> np.ndarray:
    # A point is on a cube edge when two of its coordinates are at +-half.
    at_face = np.isclose(np.abs(points), half, atol=1e-5)
    return at_face.sum(axis=1)


def test_cube_sharp_edges_and_salient_points():
    processor = MeshProcessor()
    cube = processor.load_mesh(trimesh.creation.box(extents=(1, 1, 1)))
    edges, normals = sharp_edges(cube, 30.0)
    assert len(edges) == 12  # the face diagonals are flat (0 degrees)
    # Mean of two perpendicular face normals: a diagonal with two components of 1/sqrt(2).
    assert np.allclose(np.sort(np.abs(normals), axis=1), [0, 2**-0.5, 2**-0.5], atol=1e-6)
    pc = processor.sample_points(cube, n_uniform=2000, n_salient=300)
    assert isinstance(pc, PointCloud)
    assert pc.uniform.shape == (2000, 6) and pc.salient.shape == (300, 6)
    assert (_distance_to_cube_edges(pc.salient_points, 0.95) >= 2).all()
    assert pc.stats["num_sharp_edges"] == 12
    assert np.isclose(pc.stats["sharp_edge_length"], 12 * 1.9, rtol=1e-5)
    # Every edge gets samples, in proportion to its (equal) length.
    edge_id = np.round(
        np.sign(pc.salient_points) * np.isclose(np.abs(pc.salient_points), 0.95, atol=1e-5)
    ).astype(int)
    assert len({tuple(row) for row in edge_id}) == 12
    # Uniform points lie on the surface with unit normals.
    assert np.allclose(np.abs(pc.uniform_points).max(axis=1), 0.95, atol=1e-5)
    assert np.allclose(np.linalg.norm(pc.uniform_normals, axis=1), 1.0, atol=1e-5)
    assert pc.epsilon == processor.epsilon


def test_sharp_angle_is_configurable():
    cylinder = trimesh.creation.cylinder(radius=1.0, height=1.0, sections=64)  # side: 5.6 degrees; caps: 90
    loose = MeshProcessor(sharp_angle_deg=3.0).load_mesh(cylinder)
    edges_loose, _ = sharp_edges(loose, 3.0)
    edges_strict, _ = sharp_edges(loose, 30.0)
    assert len(edges_strict) == 128  # the two cap rims
    assert len(edges_loose) == 128 + 64  # plus the vertical side edges


def test_sphere_without_sharp_edges_gets_full_salient_budget():
    processor = MeshProcessor()
    sphere = processor.load_mesh(trimesh.creation.icosphere(3))
    pc = processor.sample_points(sphere, n_uniform=1000, n_salient=256)
    assert pc.stats["num_sharp_edges"] == 0
    assert pc.salient_points.shape == (256, 3)
    assert pc.stats["num_salient_from_fill"] == 256
    assert np.allclose(np.linalg.norm(pc.salient_points, axis=1), 0.95, atol=0.01)


def test_normal_variation_fill_prefers_creases():
    # With the threshold above 90 degrees a finely triangulated box has no sharp edge; the faces along its
    # creases carry the normal variation, so the fill concentrates there.
    processor = MeshProcessor(sharp_angle_deg=100.0)
    box = trimesh.creation.box(extents=(1, 1, 1))
    vertices, faces = trimesh.remesh.subdivide_to_size(box.vertices, box.faces, max_edge=0.1)
    mesh = processor.load_mesh(trimesh.Trimesh(vertices, faces))
    pc = processor.sample_points(mesh, n_uniform=2000, n_salient=2000, seed=1)
    assert pc.stats["num_sharp_edges"] == 0 and pc.stats["num_salient_from_fill"] == 2000

    def crease_distance(points):
        # Distance to the nearest cube edge: the second-smallest gap to a face plane.
        gaps = np.sort(0.95 - np.abs(points), axis=1)
        return gaps[:, 1]

    assert crease_distance(pc.salient_points).mean() < 0.5 * crease_distance(pc.uniform_points).mean()


def test_sampling_is_deterministic_for_a_seed():
    processor = MeshProcessor()
    mesh = processor.load_mesh(trimesh.creation.box())
    first = processor.sample_points(mesh, 500, 100, seed=3)
    again = processor.sample_points(mesh, 500, 100, seed=3)
    other = processor.sample_points(mesh, 500, 100, seed=4)
    assert np.array_equal(first.uniform, again.uniform) and np.array_equal(first.salient, again.salient)
    assert not np.array_equal(first.uniform, other.uniform)


def test_farthest_point_sampling_covers_clusters():
    rng = np.random.default_rng(0)
    clusters = [rng.normal(size=(2000, 3)) * 0.01 + center for center in np.eye(3) * 5]
    points = np.concatenate(clusters).astype(np.float32)
    index = farthest_point_sampling(points, 3, seed=0)
    assert sorted(index // 2000) == [0, 1, 2]
    assert len(np.unique(farthest_point_sampling(points, 500))) == 500
    assert len(farthest_point_sampling(points, 10_000)) == len(points)


def test_shared_mechanical_meshes_have_sharp_edges(shared_meshes):
    processor = MeshProcessor()
    for name in ("fandisk.off", "pinion.off"):
        mesh = processor.load_mesh(shared_meshes / name)
        pc = processor.sample_points(mesh, n_uniform=500, n_salient=500)
        assert pc.stats["num_sharp_edges"] >= 8
        assert pc.stats["num_salient_from_edges"] == 500
        # Salient points lie on the input's edges.
        distance = trimesh.proximity.closest_point(mesh, pc.salient_points[:50])[1]
        assert distance.max() < 1e-5

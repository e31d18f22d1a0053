"""Query points and labels against analytic answers (sphere, box); winding number on open meshes."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from dora_shapegen.data import MeshProcessor, Supervision
from dora_shapegen.data.supervision import GROUP_NEAR, GROUP_SHARP, GROUP_VOLUME, label_points


def test_sphere_labels_match_analytic():
    processor = MeshProcessor(tsdf_truncation=0.015)
    sphere = processor.load_mesh(trimesh.creation.icosphere(5, radius=1.0))  # radius 0.95 after normalising
    pc = processor.sample_points(sphere, n_uniform=2000, n_salient=500)
    sup = processor.sample_supervision(sphere, pc, n_volume=3000, n_near=2000, n_sharp=1000)
    assert isinstance(sup, Supervision)
    assert sup.points.shape == (6000, 3) and sup.points.dtype == np.float32
    assert np.array_equal(np.bincount(sup.group), [3000, 2000, 1000])
    assert np.abs(sup.points[sup.group == GROUP_VOLUME]).max() <= 1.05
    sdf = 0.95 - np.linalg.norm(sup.points, axis=1)  # positive inside
    clear = np.abs(sdf) > 2e-3  # the icosphere's facets deviate from the true sphere by < 1e-3
    assert np.array_equal(sup.occupancy[clear], (sdf[clear] > 0).astype(np.float32))
    expected = np.clip(sdf / 0.015, -1, 1)
    assert np.abs(sup.tsdf - expected).max() < 0.1  # facet error (~1e-3) / truncation
    near = sup.group == GROUP_NEAR
    assert np.abs(sdf[near]).max() < 0.05 and (np.abs(sup.tsdf[near]) < 1).mean() > 0.5
    assert set(np.unique(sup.occupancy)) == {0.0, 1.0}


def test_box_labels_match_analytic():
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.6, 0.6, size=(4000, 3))
    occupancy, tsdf, sdf = label_points(box, points, truncation=0.05)
    half = np.array([0.5, 0.3, 0.2])
    q = np.abs(points) - half
    analytic = -(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0))  # positive inside
    assert np.allclose(sdf, analytic, atol=1e-5)
    assert np.array_equal(occupancy, (analytic > 0).astype(np.float32))
    assert np.allclose(tsdf, np.clip(analytic / 0.05, -1, 1), atol=1e-4)


def test_winding_number_on_open_and_inverted_meshes():
    box = trimesh.creation.box(extents=(1, 1, 1))
    inside, outside = np.array([[0.0, 0.0, 0.1], [0.2, -0.1, 0.0]]), np.array([[0.9, 0, 0], [0, 0, -0.7]])
    points = np.concatenate([inside, outside])
    open_box = box.copy()
    open_box.update_faces(np.arange(12) >= 2)  # one missing side
    inverted = box.copy()
    inverted.invert()
    for mesh in (open_box, inverted):
        occupancy, _, _ = label_points(mesh, points)
        assert occupancy.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_sharp_group_is_near_salient_points(seed):
    processor = MeshProcessor()
    cube = processor.load_mesh(trimesh.creation.box())
    pc = processor.sample_points(cube, n_uniform=500, n_salient=500)
    sup = processor.sample_supervision(cube, pc, n_volume=10, n_near=10, n_sharp=400, seed=seed)
    sharp = sup.points[sup.group == GROUP_SHARP]
    # Within 5 sigma of the largest scale (0.01) of a cube edge.
    gaps = np.sort(np.abs(0.95 - np.abs(sharp)), axis=1)
    assert (gaps[:, 1] < 0.05 * np.sqrt(2)).all()


def test_near_noise_scales_are_configurable():
    """A wider near-surface band (what a coarse CPU model learns from faster) reaches further from the surface."""
    cube = trimesh.creation.box()
    spreads = {}
    for scales in ((0.001, 0.005), (0.02, 0.04)):
        processor = MeshProcessor(near_noise_scales=scales, sharp_noise_scales=scales)
        mesh = processor.load_mesh(cube)
        pc = processor.sample_points(mesh, n_uniform=500, n_salient=100)
        sup = processor.sample_supervision(mesh, pc, n_volume=10, n_near=600, n_sharp=300, seed=0)
        near = sup.points[sup.group == GROUP_NEAR]
        spreads[scales] = np.abs(np.abs(near).max(axis=1) - 0.95).mean()  # distance to the cube's faces
    assert spreads[(0.02, 0.04)] > 5 * spreads[(0.001, 0.005)]
    with pytest.raises(ValueError, match="near_noise_scales"):
        MeshProcessor(near_noise_scales=[])
    with pytest.raises(ValueError, match="sharp_noise_scales"):
        MeshProcessor(sharp_noise_scales=[0.01, -1.0])

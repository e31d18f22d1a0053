"""Loading: formats, scene merging, normalisation and its inverse."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from dora_shapegen.data import MeshProcessor
from dora_shapegen.data.mesh_io import MeshError, denormalize_vertices, load_mesh


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".stl", ".off", ".glb"])
def test_formats_load_normalised(tmp_path, suffix):
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    box.apply_translation((5.0, -3.0, 1.0))
    path = tmp_path / f"box{suffix}"
    box.export(path)
    mesh = load_mesh(path)
    assert len(mesh.faces) == 12  # STL's per-face vertices are merged back
    assert np.allclose(mesh.bounds, [[-0.95, -0.475, -0.2375], [0.95, 0.475, 0.2375]], atol=1e-6)
    norm = mesh.metadata["normalization"]
    assert np.allclose(denormalize_vertices(mesh.vertices, norm).min(axis=0), box.bounds[0], atol=1e-5)


def test_scene_parts_are_merged_with_transforms(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(
        trimesh.creation.box(extents=(1, 1, 1)),
        transform=trimesh.transformations.translation_matrix((-3, 0, 0)),
    )
    scene.add_geometry(
        trimesh.creation.icosphere(1), transform=trimesh.transformations.translation_matrix((3, 0, 0))
    )
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path)
    assert len(mesh.split(only_watertight=False)) == 2
    assert np.isclose(mesh.bounds[:, 0], [-0.95, 0.95]).all()


def test_processor_load_accepts_trimesh_and_path(tmp_path):
    sphere = trimesh.creation.icosphere(2, radius=3.0)
    path = tmp_path / "chair.obj"
    sphere.export(path)
    processor = MeshProcessor(epsilon=2 / 256)
    from_path = processor.load_mesh(str(path))
    from_object = processor.load_mesh(sphere)
    assert np.allclose(np.abs(from_path.vertices).max(), 0.95, atol=1e-6)
    assert np.allclose(sorted(from_path.area_faces), sorted(from_object.area_faces), atol=1e-6)
    assert from_path.metadata["normalization"]["scale"] == pytest.approx(0.95 / 3.0, rel=1e-4)


def test_mesh_error_names_file(tmp_path):
    path = tmp_path / "missing.obj"
    with pytest.raises(MeshError, match="missing.obj: file not found"):
        load_mesh(path)

"""Mesh post-processing: export, floaters, face reduction."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from dora_shapegen.pipelines.mesh_post import export_mesh, remove_floaters, simplify


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply", ".stl"])
def test_export_round_trip(tmp_path, suffix):
    mesh = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    path = export_mesh(mesh, tmp_path / "out" / f"box{suffix}")
    assert path.is_file()
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.faces) == 12
    assert np.allclose(loaded.extents, [1.0, 2.0, 3.0], atol=1e-5)
    assert loaded.volume == pytest.approx(6.0, rel=1e-4)


def test_export_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.fbx"):
        export_mesh(trimesh.creation.box(), tmp_path / "box.fbx")


def test_remove_floaters_drops_small_parts_and_keeps_big_ones():
    big_a = trimesh.creation.icosphere(3, radius=1.0)
    big_b = trimesh.creation.icosphere(3, radius=0.8).apply_translation([3.0, 0.0, 0.0])
    floater = trimesh.creation.icosphere(0, radius=0.05)  # 20 faces.apply_translation([0.0, 3.0, 0.0])
    mesh = trimesh.util.concatenate([big_a, big_b, floater])
    for measure in ("area", "faces"):
        cleaned = remove_floaters(mesh, min_fraction=0.05, measure=measure)
        parts = cleaned.split(only_watertight=False)
        assert len(parts) == 2, measure
        assert len(cleaned.faces) == len(big_a.faces) + len(big_b.faces)
        assert cleaned.bounds[1, 1] < 1.5  # the floater above is gone
    assert len(remove_floaters(mesh, min_fraction=0.0).faces) == len(mesh.faces)
    assert len(mesh.faces) == len(big_a.faces) + len(big_b.faces) + len(floater.faces)  # input untouched


def test_simplify_reaches_about_the_target():
    sphere = trimesh.creation.icosphere(subdivisions=5)  # 20480 faces
    reduced = simplify(sphere, target_faces=2000)
    assert 1600 <= len(reduced.faces) <= 2200
    radii = np.linalg.norm(reduced.vertices, axis=1)
    assert np.abs(radii - 1.0).max() < 0.05  # still the same sphere
    small = trimesh.creation.box()
    assert len(simplify(small, target_faces=100).faces) == 12
    with pytest.raises(ValueError):
        simplify(small, target_faces=0)

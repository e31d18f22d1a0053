"""Watertight remeshing: closed, close to the input, every part kept, inner shells dropped."""

from __future__ import annotations

import numpy as np
import trimesh

from dora_shapegen.data import MeshProcessor
from dora_shapegen.data.watertight import make_watertight
from dora_shapegen.metrics import chamfer_distance

EPSILON = 4 / 256  # coarser than the default: keeps the tests fast, same code path


def surface_chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, count: int = 20_000) -> float:
    """Chamfer-L1 of ``count`` area-uniform samples of each surface."""
    points_a = trimesh.sample.sample_surface(a, count, seed=1)[0]
    points_b = trimesh.sample.sample_surface(b, count, seed=2)[0]
    return chamfer_distance(points_a, points_b)["chamfer_l1"]


def test_open_box_becomes_watertight_and_close():
    box = trimesh.creation.box(extents=(1.5, 1.0, 0.8))
    box.update_faces(np.arange(len(box.faces)) >= 2)  # drop one side: an open mesh
    processor = MeshProcessor(epsilon=EPSILON)
    mesh = processor.load_mesh(box)
    assert not mesh.is_watertight
    remeshed = processor.make_watertight(mesh)
    assert remeshed.is_watertight and remeshed.is_winding_consistent
    assert remeshed.volume > 0  # outward normals
    assert surface_chamfer(mesh, remeshed) < 2 * EPSILON
    assert remeshed.metadata["normalization"] == mesh.metadata["normalization"]


def test_all_parts_kept_and_inner_shell_dropped():
    # Three separate parts (a car body and two "wheels"), one hollow sphere: shell inside shell.
    parts = [
        trimesh.creation.box(extents=(1.2, 0.5, 0.4)),
        trimesh.creation.icosphere(2, radius=0.2).apply_translation((-0.8, 0, -0.6)),
        trimesh.creation.icosphere(2, radius=0.2).apply_translation((0.8, 0, -0.6)),
    ]
    inner = trimesh.creation.icosphere(2, radius=0.1).apply_translation((0, 0, 0))  # enclosed by the box
    mesh = MeshProcessor().load_mesh(trimesh.util.concatenate(parts + [inner]))
    remeshed = make_watertight(mesh, epsilon=EPSILON)
    components = remeshed.split(only_watertight=False)
    assert len(components) == 3  # 3 outer shells; no inner offset shells, no enclosed part
    assert all(component.is_watertight for component in components)
    assert all(component.volume > 0 for component in components)  # no inverted (inner) shell


def test_thin_open_sheet_gets_a_closed_shell():
    # A single flat square (zero thickness) becomes a slab of thickness 2 * epsilon.
    square = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    mesh = MeshProcessor().load_mesh(square)
    remeshed = make_watertight(mesh, epsilon=EPSILON)
    assert remeshed.is_watertight
    thickness = np.ptp(remeshed.vertices[:, 2])
    assert abs(thickness - 2 * EPSILON) < 0.5 * EPSILON


def test_real_open_mesh_remeshed(shared_meshes):
    processor = MeshProcessor(epsilon=EPSILON)
    mesh = processor.load_mesh(shared_meshes / "elephant-with-holes.off")
    assert not mesh.is_watertight
    remeshed = processor.make_watertight(mesh)
    assert remeshed.is_watertight
    assert surface_chamfer(mesh, remeshed, count=5000) < 2 * EPSILON


class _BatchedSpheres:
    """A stand-in for the VAE's decoded field: (M, 3) -> (B, M) occupancy of spheres of radius 0.4 and 0.7."""

    batch_size = 2

    def __call__(self, query_points):
        import torch

        radius = query_points.norm(dim=-1)  # (M,)
        return torch.stack([(radius < 0.4).float(), (radius < 0.7).float()])  # (B, M)


def test_extract_mesh_one_mesh_per_batch_item():
    processor = MeshProcessor()
    meshes = processor.extract_mesh(_BatchedSpheres(), resolution=48)
    assert isinstance(meshes, list) and len(meshes) == 2
    radii = [np.linalg.norm(mesh.vertices, axis=1).mean() for mesh in meshes]
    assert abs(radii[0] - 0.4) < 0.05 and abs(radii[1] - 0.7) < 0.05
    single = processor.extract_mesh(lambda points: (points.norm(dim=-1) < 0.5).float(), resolution=48)
    assert abs(np.linalg.norm(single.vertices, axis=1).mean() - 0.5) < 0.05

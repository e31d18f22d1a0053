"""Surface roughness and grid-line crossings: stripes and ringing become numbers, the ground truth beside them."""

from __future__ import annotations

import math

import numpy as np
import trimesh

from dora_shapegen.vae.bench.surface import (
    default_roughness_radius,
    grid_line_crossings,
    ground_truth_surface,
    surface_roughness,
)


def _striped(mesh: trimesh.Trimesh, amplitude: float, period: float) -> trimesh.Trimesh:
    """Horizontal ridges: each vertex moved along its normal by a sine of its height."""
    vertices = mesh.vertices + mesh.vertex_normals * amplitude * np.sin(
        mesh.vertices[:, 2:3] * 2 * np.pi / period
    )
    return trimesh.Trimesh(vertices, mesh.faces)


def test_ground_truth_extraction_is_smooth_and_stripes_are_not():
    radius = default_roughness_radius(48)
    for solid in (trimesh.creation.icosphere(4, radius=0.8), trimesh.creation.box((1.6, 1.2, 0.8))):
        surface, values = ground_truth_surface(solid, 48)
        smooth = surface_roughness(surface, radius)
        striped = surface_roughness(_striped(surface, 0.01, 0.08), radius)
        assert smooth < 6.0  # marching-cubes facets (and, for the box, its creases)
        assert striped > 2.5 * smooth
        # A convex solid: every grid line that meets it enters once and leaves once.
        assert grid_line_crossings(values) == {"x": 2.0, "y": 2.0, "z": 2.0}
        # The extraction lies on the solid: its volume within a few percent.
        assert abs(surface.volume - solid.volume) / solid.volume < 0.05


def test_a_plane_has_no_roughness_and_an_empty_mesh_is_nan():
    plane = trimesh.creation.box((1.0, 1.0, 0.01)).subdivide().subdivide()
    top = plane.submesh([np.flatnonzero(plane.face_normals[:, 2] > 0.99)], append=True)
    assert surface_roughness(top, 0.1) < 1e-3
    assert math.isnan(surface_roughness(trimesh.Trimesh(), 0.1))


def test_crossings_count_spurious_shells_along_their_axis():
    values = np.zeros((9, 9, 9), dtype=np.float32)
    values[2:7, 2:7, 2:7] = 1.0  # a cube
    values[2:7, 2:7, 4] = 0.0  # split by a horizontal gap: lines along z cross four times
    crossings = grid_line_crossings(values)
    assert crossings["z"] == 4.0 and crossings["x"] == 2.0 and crossings["y"] == 2.0

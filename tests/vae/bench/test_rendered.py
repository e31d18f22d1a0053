"""Rendered Sharp Normal Error (vae/bench/rendered.py): what it rewards and what it ignores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from dora_shapegen.data.render import render_normal_map
from dora_shapegen.vae.bench.metrics import sample_sharp_points
from dora_shapegen.vae.bench.rendered import (
    edge_pixel_mask,
    render_sharp_edge_views,
    rendered_sharp_normal_error,
)

EXTENTS = (1.6, 1.2, 0.8)
RESOLUTION = 256  # the CPU bench's setting; 3 px dilation at 512 would only widen the band


def _sharp_box() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=EXTENTS).subdivide().subdivide()


def _rounded_box(radius: float) -> trimesh.Trimesh:
    """The same box with every edge filleted at ``radius`` (hull of corner spheres): equal extents, round creases."""
    inner = np.asarray(EXTENTS) / 2 - radius
    sphere = trimesh.creation.icosphere(3, radius=radius)
    signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).T.reshape(-1, 3)  # (8, 3) corner directions
    return trimesh.convex.convex_hull(np.concatenate([sphere.vertices + s * inner for s in signs]))


@pytest.fixture(scope="module")
def box_reference():
    box = _sharp_box()
    sharp = sample_sharp_points(box, 4000)
    return box, render_sharp_edge_views(box, sharp, resolution=RESOLUTION)


def test_identical_meshes_score_zero(box_reference):
    box, reference = box_reference
    result = rendered_sharp_normal_error(box.copy(), reference=reference)
    assert result["rendered_sharp_normal_error_deg"] == 0.0
    assert result["rendered_sharp_pixels"] > 1000


def test_rounded_edges_score_far_worse_than_a_small_offset(box_reference):
    box, reference = box_reference
    rounded = rendered_sharp_normal_error(_rounded_box(0.05), reference=reference)[
        "rendered_sharp_normal_error_deg"
    ]
    shifted = rendered_sharp_normal_error(
        box.copy().apply_translation([0.005, 0.004, -0.003]), reference=reference
    )
    inflated = rendered_sharp_normal_error(box.copy().apply_scale(1.005), reference=reference)
    for offset in (shifted, inflated):
        assert 0.0 < offset["rendered_sharp_normal_error_deg"] < rounded / 3
    assert rounded > 30.0  # half of a 90 deg crease, spread over the band, plus the lost corner coverage


def test_empty_prediction_scores_ninety_and_smooth_shapes_give_nan(box_reference):
    _, reference = box_reference
    assert (
        rendered_sharp_normal_error(trimesh.Trimesh(), reference=reference)["rendered_sharp_normal_error_deg"]
        == 90.0
    )
    sphere = trimesh.creation.icosphere(3, radius=0.9)
    result = rendered_sharp_normal_error(sphere, sphere, np.zeros((0, 3)), resolution=64)
    assert math.isnan(result["rendered_sharp_normal_error_deg"]) and result["rendered_sharp_pixels"] == 0


def test_gt_and_points_are_required_without_a_reference():
    with pytest.raises(ValueError, match="reference or gt_mesh"):
        rendered_sharp_normal_error(trimesh.creation.box())


def test_edges_hidden_behind_the_shape_are_not_in_the_mask():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    view = render_normal_map(box, 35.26, 45.0, 128)  # looking at the (+x, +y, +z) corner
    # The edge x = y = -0.5 runs from the hidden back corner to a silhouette corner (z = +0.5); up to z = 0.3 the
    # front faces cover it at least 0.35 units nearer the viewer.
    t = np.linspace(-0.5, 0.3, 40)[:, None]
    hidden = np.hstack([np.full_like(t, -0.5), np.full_like(t, -0.5), t])
    front = np.hstack([np.full_like(t, 0.5), np.full_like(t, 0.5), t])  # the edge x = y = +0.5: facing us
    assert not edge_pixel_mask(view, hidden, dilation_px=0).any()
    visible = edge_pixel_mask(view, front, dilation_px=0)
    assert visible.sum() > 20
    dilated = edge_pixel_mask(view, front, dilation_px=2)
    assert dilated.sum() > 3 * visible.sum() and dilated[visible].all()

"""Dora-bench metrics on analytic cases whose true values are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from dora_shapegen.metrics import chamfer_distance, volume_iou
from dora_shapegen.vae.bench.metrics import (
    DEFAULT_SHARP_EDGE_LENGTH_THRESHOLDS,
    complexity_level,
    count_sharp_edges,
    f_score,
    mesh_metrics,
    mesh_volume_iou,
    normal_consistency,
    sample_sharp_points,
    sample_surface,
    sharp_edge_error,
    sharp_edge_length,
    sharp_normal_error,
)

NUM_POINTS = 20_000


def sphere(radius: float) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=radius)


def box(extents, center=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=extents)
    mesh.apply_translation(center)
    return mesh


def gear(num_teeth: int = 24) -> trimesh.Trimesh:
    body = trimesh.creation.cylinder(radius=0.6, height=0.3, sections=96)
    teeth = []
    for k in range(num_teeth):
        angle = 2 * np.pi * k / num_teeth
        tooth = trimesh.creation.box((0.2, 0.08, 0.3))
        transform = trimesh.transformations.rotation_matrix(angle, [0, 0, 1])
        transform[:3, 3] = [0.65 * np.cos(angle), 0.65 * np.sin(angle), 0.0]
        tooth.apply_transform(transform)
        teeth.append(tooth)
    return trimesh.boolean.union([body, *teeth], engine="manifold")


def test_mesh_against_itself_is_perfect():
    cube = box((1.5, 1.5, 1.5))
    metrics = mesh_metrics(cube, cube, num_points=NUM_POINTS, num_volume_points=NUM_POINTS)
    assert metrics["chamfer_l1"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["chamfer_l2"] == pytest.approx(0.0, abs=1e-12)
    assert all(metrics[f"f_score@{tau:g}"] == 1.0 for tau in (0.005, 0.01, 0.02))
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["volume_iou"] == 1.0
    assert metrics["sharp_chamfer_l1"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["sharp_normal_error_deg"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["empty_prediction"] is False


def test_retessellated_mesh_is_close_to_itself():
    """Different triangles, same surface: only sampling noise remains (independent samples of both)."""
    coarse, fine = sphere(0.5), sphere(0.5).subdivide()
    pred, pred_normals = sample_surface(fine, NUM_POINTS, seed=1)
    gt, gt_normals = sample_surface(coarse, NUM_POINTS, seed=2)
    spacing = math.sqrt(4 * math.pi * 0.25 / NUM_POINTS)  # ~ 0.0125
    assert chamfer_distance(pred, gt)["chamfer_l1"] < spacing
    assert f_score(pred, gt, thresholds=(0.03,))["f_score@0.03"] > 0.99
    assert normal_consistency(pred, pred_normals, gt, gt_normals) > 0.99


def test_concentric_spheres_chamfer_equals_the_gap():
    pred, _ = sample_surface(sphere(0.5), NUM_POINTS, seed=0)
    gt, _ = sample_surface(sphere(0.6), NUM_POINTS, seed=1)
    result = chamfer_distance(pred, gt)
    # Nearest neighbours lie radially 0.1 away, plus a sampling offset of ~ spacing^2 / 0.2 ~ 1e-3.
    assert result["chamfer_l1"] == pytest.approx(0.1, abs=3e-3)
    assert result["chamfer_l2"] == pytest.approx(0.01, abs=6e-4)
    assert result["accuracy"] == pytest.approx(0.1, abs=3e-3)
    assert result["completeness"] == pytest.approx(0.1, abs=3e-3)
    scores = f_score(pred, gt, thresholds=(0.05, 0.2))
    assert scores["f_score@0.05"] == 0.0 and scores["f_score@0.2"] == 1.0


def test_normal_consistency_of_perpendicular_normals_is_zero():
    points = np.random.default_rng(0).uniform(-1, 1, (1000, 3))
    up, side = np.tile([0.0, 0.0, 1.0], (1000, 1)), np.tile([1.0, 0.0, 0.0], (1000, 1))
    assert normal_consistency(points, up, points, side) == pytest.approx(0.0, abs=1e-9)
    assert normal_consistency(points, up, points, -up) == pytest.approx(1.0)  # orientation-agnostic


def test_volume_iou_identical_disjoint_and_half_overlapping_boxes():
    a = box((0.8, 0.8, 0.8), (-0.2, 0.0, 0.0))
    assert mesh_volume_iou(a, a, num_points=NUM_POINTS) == 1.0
    assert mesh_volume_iou(a, box((0.8, 0.8, 0.8), (0.7, 0.0, 0.0)), num_points=NUM_POINTS) == 0.0
    # Shifted by half its width: intersection = 1/2, union = 3/2 of one box -> IoU = 1/3.
    shifted = box((0.8, 0.8, 0.8), (0.2, 0.0, 0.0))
    assert mesh_volume_iou(a, shifted, num_points=4 * NUM_POINTS) == pytest.approx(1 / 3, abs=0.02)
    assert volume_iou(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        volume_iou(np.zeros(3, bool), np.zeros(4, bool))


def test_sharp_edge_error_sees_a_rounded_crease():
    cube = box((1.2, 1.2, 1.2))
    rounded = trimesh.creation.icosphere(
        subdivisions=5, radius=0.6 * math.sqrt(3)
    )  # touches the corners only
    sharp_points = sample_sharp_points(cube, 2000, seed=0)
    assert np.abs(sharp_points).max(axis=1) == pytest.approx(0.6)  # on the cube's edges
    gt, _ = sample_surface(cube, NUM_POINTS, seed=0)
    on_cube = sharp_edge_error(gt, gt, sharp_points, radius=0.02)
    assert on_cube["sharp_chamfer_l1"] == 0.0 and on_cube["num_sharp_gt_points"] > 0
    pred, _ = sample_surface(rounded, NUM_POINTS, seed=0)
    off = sharp_edge_error(pred, gt, sharp_points, radius=0.02)
    assert off["sharp_completeness"] > 0.1  # cube edges are 0.6*(sqrt(3)-sqrt(2)) ~ 0.19 inside the sphere
    assert sharp_normal_error(cube, cube, sharp_points, num_points=NUM_POINTS) == pytest.approx(0.0, abs=1e-3)
    assert sharp_normal_error(rounded, cube, sharp_points, num_points=NUM_POINTS) > 20.0
    smooth = sharp_edge_error(pred, gt, np.zeros((0, 3)), radius=0.02)
    assert smooth["num_sharp_gt_points"] == 0 and math.isnan(smooth["sharp_chamfer_l1"])


def test_complexity_levels_of_sphere_cube_and_gear():
    assert count_sharp_edges(sphere(0.9)) == 0
    assert count_sharp_edges(box((1.9, 1.9, 1.9))) == 12
    assert sharp_edge_length(box((1.9, 1.9, 1.9))) == pytest.approx(12 * 1.9)
    levels = [complexity_level(count_sharp_edges(m)) for m in (sphere(0.9), box((1.9, 1.9, 1.9)), gear())]
    assert levels == [1, 2, 3]
    assert (
        complexity_level(sharp_edge_length(box((1.9, 1.9, 1.9))), DEFAULT_SHARP_EDGE_LENGTH_THRESHOLDS) == 2
    )
    assert [complexity_level(v, (1, 2, 3)) for v in (0, 1, 2.5, 3, 100)] == [1, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="thresholds"):
        complexity_level(5, (3, 2, 1))


def test_empty_prediction_gets_worst_values_and_a_flag():
    cube = box((1.5, 1.5, 1.5))
    metrics = mesh_metrics(trimesh.Trimesh(), cube, num_points=NUM_POINTS, num_volume_points=NUM_POINTS)
    assert metrics["empty_prediction"] is True
    assert metrics["chamfer_l1"] == pytest.approx(2 * math.sqrt(3) * 1.05)
    assert metrics["f_score@0.01"] == 0.0 and metrics["volume_iou"] == 0.0
    assert metrics["normal_consistency"] == 0.0 and metrics["sharp_normal_error_deg"] == 90.0
    assert metrics["complexity_level"] == 2

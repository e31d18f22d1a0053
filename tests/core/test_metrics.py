"""The one Chamfer distance and the one volume IoU (dora_shapegen.metrics): their conventions, pinned."""

from __future__ import annotations

import numpy as np
import point_cloud_utils as pcu
import pytest
import torch
from scipy.spatial import cKDTree

from dora_shapegen.metrics import chamfer_distance, volume_iou


def sphere_points(radius: float, count: int, seed: int) -> np.ndarray:
    directions = np.random.default_rng(seed).normal(size=(count, 3))
    return radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)


def test_chamfer_of_concentric_spheres_is_the_gap_l1_and_its_square_l2():
    inner, outer = sphere_points(0.5, 4000, 0), sphere_points(0.6, 4000, 1)
    result = chamfer_distance(inner, outer)
    # Nearest neighbours of a finite sample sit a little further than the gap, never closer.
    assert 0.1 <= result["chamfer_l1"] < 0.103
    assert 0.01 <= result["chamfer_l2"] < 0.0107
    assert result["chamfer_l1"] == pytest.approx(0.5 * (result["accuracy"] + result["completeness"]))


def test_chamfer_l1_is_half_of_the_summed_convention_of_point_cloud_utils():
    a, b = sphere_points(0.5, 500, 2), sphere_points(0.55, 700, 3) + 0.01
    ours = chamfer_distance(a, b)["chamfer_l1"]
    assert pcu.chamfer_distance(a, b) == pytest.approx(2.0 * ours, rel=1e-9)


def test_chamfer_with_prebuilt_trees_is_identical_and_bad_input_is_an_error():
    a, b = sphere_points(0.5, 300, 4), sphere_points(0.7, 200, 5)
    assert chamfer_distance(a, b, trees=(cKDTree(a), cKDTree(b))) == chamfer_distance(a, b)
    with pytest.raises(ValueError, match="non-empty"):
        chamfer_distance(np.zeros((0, 3)), b)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        chamfer_distance(np.zeros((5, 2)), b)


def test_volume_iou_on_numpy_and_torch_occupancies():
    pred, gt = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    assert volume_iou(pred, gt) == pytest.approx(1 / 3)
    assert volume_iou(torch.from_numpy(pred), torch.from_numpy(gt)) == volume_iou(pred, gt)
    assert volume_iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0  # both empty: they agree
    with pytest.raises(ValueError, match="shapes differ"):
        volume_iou(np.zeros(3, bool), np.zeros(4, bool))

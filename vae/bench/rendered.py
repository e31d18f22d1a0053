"""Rendered Sharp Normal Error: Dora-bench's sharp-edge metric, compared on normal maps instead of point samples.

Protocol (every choice is a parameter of :func:`rendered_sharp_normal_error`; ``dora bench`` takes them from
``metrics.render_*`` in its config):

1. **Views**: the eight cube-diagonal directions (elevation +-35.26 deg, azimuth 45 + 90k;
   ``data.render.CUBE_DIAGONAL_VIEWS``). Orthographic, Y up. Each axis-aligned crease of a normalised shape is
   seen obliquely from four of them; axis-aligned views would see many creases edge-on, as silhouettes only.
2. **Frame and resolution**: one fixed frame for both meshes, centred on the origin with half-width
   ``1.05 * sqrt(3)`` (the whole [-1.05, 1.05]^3 box from any view), ``resolution`` px square (512 by default:
   0.0071 units per pixel, close to a 256^3 marching-cubes voxel, 0.0082). Fitting each mesh to the frame would
   misalign the two maps.
3. **Normal maps**: per-pixel flat face normals in camera space, flipped to face the viewer (orientation-free,
   as reconstructed meshes may carry flipped faces); ``data.render.render_normal_map``.
4. **Edge-pixel mask**: the ground truth's sharp-edge samples (dihedral angle > 30 deg on the clean input,
   projected onto the watertight ground truth) are projected into each view and kept where visible, i.e.
   within ``depth_tolerance_px`` pixels of depth of the ground truth's z-buffer (an edge behind the shape is
   not part of the picture) or on the background (a silhouette edge, which lands just outside the coverage).
   The hit pixels are dilated by a disc of ``dilation_px`` pixels: by default ``ceil(sharp_radius / pixel)``
   (3 px at 512), so the band matches the 0.02 neighbourhood of the geometric sharp-edge error.
5. **Error**: on the mask pixels covered by either mesh, the angle between the two normals in degrees; a pixel
   covered by only one of the meshes (a missing or extra surface near the edge) counts 90 deg. Pixels of all
   views are pooled (a pixel-weighted mean), so views where more edges are visible weigh more.

Identical meshes give exactly 0. A crease that is rounded off spreads a normal gradient over the band (up to half
the dihedral angle per pixel), while a sharp crease that is displaced by less than a pixel keeps the step and only
moves it: the first scores far worse, which is what a sharp-edge metric should reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy import ndimage

from dora_shapegen.data.render import CUBE_DIAGONAL_VIEWS, NormalMap, project_points, render_normal_map

DEFAULT_RESOLUTION = 512
DEFAULT_HALF_WIDTH = 1.05 * math.sqrt(3.0)
MISSING_SURFACE_DEG = 90.0  # one mesh covers an edge pixel and the other does not
DEFAULT_DEPTH_TOLERANCE_PX = 4.0


@dataclass
class SharpEdgeViews:
    """The ground truth's side of the metric, computed once per shape and reused for every reconstruction."""

    maps: list[NormalMap]
    masks: list[np.ndarray]  # (R, R) bool per view: dilated visible sharp-edge pixels
    resolution: int
    half_width: float
    dilation_px: int

    @property
    def num_pixels(self) -> int:
        return int(sum(mask.sum() for mask in self.masks))


def _disc(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2  # (2r+1, 2r+1) bool


def edge_pixel_mask(
    gt_map: NormalMap,
    gt_sharp_points: np.ndarray,
    dilation_px: int,
    depth_tolerance_px: float = DEFAULT_DEPTH_TOLERANCE_PX,
) -> np.ndarray:
    """(R, R) bool: pixels within ``dilation_px`` of a visible projected gt sharp-edge sample (see module doc)."""
    resolution = gt_map.depth.shape[0]
    mask = np.zeros((resolution, resolution), dtype=bool)
    if len(gt_sharp_points) == 0:
        return mask
    columns, rows, depth = project_points(
        gt_sharp_points, gt_map.elev, gt_map.azim, resolution, gt_map.half_width
    )
    col, row = np.floor(columns).astype(np.int64), np.floor(rows).astype(np.int64)  # (N,) pixel indices
    inside = (col >= 0) & (col < resolution) & (row >= 0) & (row < resolution)
    col, row, depth = col[inside], row[inside], depth[inside]
    surface = gt_map.depth[row, col]  # (N,) -inf where the pixel is background
    visible = ~np.isfinite(surface) | (np.abs(surface - depth) <= depth_tolerance_px * gt_map.pixel_size)
    mask[row[visible], col[visible]] = True
    if dilation_px > 0:
        mask = ndimage.binary_dilation(mask, structure=_disc(dilation_px))
    return mask


def render_sharp_edge_views(
    gt_mesh: trimesh.Trimesh,
    gt_sharp_points: np.ndarray,
    views: Sequence[Sequence[float]] = CUBE_DIAGONAL_VIEWS,
    resolution: int = DEFAULT_RESOLUTION,
    sharp_radius: float = 0.02,
    dilation_px: int | None = None,
    half_width: float = DEFAULT_HALF_WIDTH,
    depth_tolerance_px: float = DEFAULT_DEPTH_TOLERANCE_PX,
) -> SharpEdgeViews:
    """Ground-truth normal maps and edge-pixel masks for every view; ``dilation_px=None`` derives the dilation
    from ``sharp_radius`` (ceil of it in pixels)."""
    if resolution < 8:
        raise ValueError(f"render resolution must be at least 8 px, got {resolution}")
    if not views:
        raise ValueError("the rendered sharp normal error needs at least one view")
    if dilation_px is None:
        dilation_px = max(1, math.ceil(sharp_radius / (2.0 * half_width / resolution)))
    sharp = np.asarray(gt_sharp_points, dtype=np.float64).reshape(-1, 3)
    maps = [
        render_normal_map(gt_mesh, float(elev), float(azim), resolution, half_width) for elev, azim in views
    ]
    masks = [edge_pixel_mask(gt_map, sharp, dilation_px, depth_tolerance_px) for gt_map in maps]
    return SharpEdgeViews(maps, masks, resolution, half_width, int(dilation_px))


def rendered_sharp_normal_error(
    pred_mesh: trimesh.Trimesh,
    gt_mesh: trimesh.Trimesh | None = None,
    gt_sharp_points: np.ndarray | None = None,
    reference: SharpEdgeViews | None = None,
    **render_options: float,
) -> dict[str, float]:
    """Mean normal angle (degrees, 0 = identical, [0, 180]) over the gt's dilated sharp-edge pixels of the fixed
    views, and the pixel count it averages over; see the module doc for the protocol.

    Pass ``reference`` (from :func:`render_sharp_edge_views`) to reuse the ground truth's maps across several
    reconstructions; otherwise ``gt_mesh``, ``gt_sharp_points`` and ``render_options`` (its keyword arguments)
    build it. NaN with 0 pixels when no sharp edge is visible (a smooth shape); an empty prediction scores 90.
    """
    if reference is None:
        if gt_mesh is None or gt_sharp_points is None:
            raise ValueError(
                "rendered_sharp_normal_error needs either reference or gt_mesh and gt_sharp_points"
            )
        reference = render_sharp_edge_views(gt_mesh, gt_sharp_points, **render_options)
    errors = []
    for gt_map, mask in zip(reference.maps, reference.masks):
        if not mask.any():
            continue
        pred_map = render_normal_map(
            pred_mesh, gt_map.elev, gt_map.azim, reference.resolution, reference.half_width
        )
        gt_covered, pred_covered = gt_map.covered[mask], pred_map.covered[mask]  # (P,) each
        gt_normals = gt_map.normals[mask].astype(np.float64)  # (P, 3)
        pred_normals = pred_map.normals[mask].astype(np.float64)  # (P, 3)
        # atan2(|a x b|, a.b) rather than arccos(a.b): exact at 0 (identical normals score 0, not ~0.01 deg).
        sine = np.linalg.norm(np.cross(gt_normals, pred_normals), axis=1)  # (P,)
        angle = np.degrees(np.arctan2(sine, np.einsum("ij,ij->i", gt_normals, pred_normals)))  # (P,)
        angle = np.where(gt_covered & pred_covered, angle, MISSING_SURFACE_DEG)
        errors.append(angle[gt_covered | pred_covered])  # both on the background: nothing to compare
    pooled = np.concatenate(errors) if errors else np.zeros(0)
    return {
        "rendered_sharp_normal_error_deg": float(pooled.mean()) if len(pooled) else math.nan,
        "rendered_sharp_pixels": int(len(pooled)),
    }

"""Offscreen mesh previews: a small numpy z-buffer rasteriser (orthographic camera, flat Lambert shading).

Why not pyrender: it needs an OpenGL context (OSMesa or EGL), which headless CI machines and this project's CPU
boxes do not have; matplotlib's Poly3DCollection sorts whole triangles by depth (wrong where parts interpenetrate)
and is slow beyond ~20k faces. The rasteriser is vectorised per triangle bounding box: triangles are bucketed by
box size and each bucket tests all of its candidate pixels at once, so 200k faces render in about a second.
Meshes are shown Y-up (the glTF convention our datasets and exports use).

It lives in ``data`` (the lowest stage) because every stage draws pictures: the VAE's validation and benchmark
contact sheets as well as the pipeline's previews.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
MESH_COLOR = np.array([0.60, 0.70, 0.86])
# Light direction in camera coordinates (right, up, toward the viewer): from the upper left, in front.
_LIGHT = np.array([-0.4, 0.6, 0.7]) / np.linalg.norm([-0.4, 0.6, 0.7])
_FRAGMENT_BUDGET = 1 << 21  # candidate pixels per vectorised chunk (bounds memory to ~100 MB)


def _as_trimesh(mesh: trimesh.Trimesh | trimesh.Scene) -> trimesh.Trimesh:
    if isinstance(mesh, trimesh.Scene):
        geometries = [g for g in mesh.dump() if isinstance(g, trimesh.Trimesh)]
        return trimesh.util.concatenate(geometries) if geometries else trimesh.Trimesh()
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"expected a trimesh.Trimesh, got {type(mesh).__name__}")
    return mesh


def _camera_basis(elev: float, azim: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, up, toward_viewer) unit vectors; Y is world up, azim 0 looks at the front (+Z) face."""
    e, a = math.radians(elev), math.radians(azim)
    toward = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    right = np.array([math.cos(a), 0.0, -math.sin(a)])  # horizontal, so a top view (elev 90) stays defined
    return right, np.cross(toward, right), toward


def _rasterise(x: np.ndarray, y: np.ndarray, z: np.ndarray, width: int) -> np.ndarray:
    """Z-buffer triangles given per-corner screen coordinates (F, 3); returns the face id per pixel (-1 = none)."""
    return _rasterise_with_depth(x, y, z, width)[0]


def _rasterise_with_depth(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_rasterise`, plus the depth per pixel (W*W,) (larger = nearer the viewer, -inf = none)."""
    zbuffer = np.full(width * width, -np.inf)
    face_buffer = np.full(width * width, -1, dtype=np.int64)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])  # (F,)
    # Integer pixel range whose centres (p + 0.5) fall inside each triangle's box.
    x0 = np.clip(np.ceil(x.min(axis=1) - 0.5), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(x.max(axis=1) - 0.5), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(y.min(axis=1) - 0.5), 0, width).astype(np.int64)
    y1 = np.clip(np.floor(y.max(axis=1) - 0.5), -1, width - 1).astype(np.int64)
    visible = (x1 >= x0) & (y1 >= y0) & (np.abs(area) > 1e-12)
    # Bucket by the box's power-of-two width and height separately, so long thin triangles (chair legs, poles)
    # do not pay for a square box.
    log_w = np.ceil(np.log2(np.maximum(x1 - x0 + 1, 1))).astype(np.int64)
    log_h = np.ceil(np.log2(np.maximum(y1 - y0 + 1, 1))).astype(np.int64)
    buckets = np.where(visible, log_w * 64 + log_h, -1)  # (F,)
    for bucket in np.unique(buckets[visible]):
        box_w, box_h = 1 << int(bucket // 64), 1 << int(bucket % 64)
        offset_y, offset_x = np.divmod(np.arange(box_w * box_h), box_w)  # (S,) candidate offsets in the box
        faces = np.flatnonzero(buckets == bucket)
        chunk = max(1, _FRAGMENT_BUDGET // (box_w * box_h))
        for start in range(0, len(faces), chunk):
            f = faces[start : start + chunk]
            px = x0[f, None] + offset_x[None]  # (n, S)
            py = y0[f, None] + offset_y[None]  # (n, S)
            cx, cy = px + 0.5, py + 0.5
            fx, fy, fz, fa = x[f], y[f], z[f], area[f, None]
            # Barycentric weights from the edge functions, normalised by the signed area (either winding).
            w0 = (
                (fx[:, 2:3] - fx[:, 1:2]) * (cy - fy[:, 1:2]) - (fy[:, 2:3] - fy[:, 1:2]) * (cx - fx[:, 1:2])
            ) / fa
            w1 = (
                (fx[:, 0:1] - fx[:, 2:3]) * (cy - fy[:, 2:3]) - (fy[:, 0:1] - fy[:, 2:3]) * (cx - fx[:, 2:3])
            ) / fa
            w2 = 1.0 - w0 - w1
            inside = (px <= x1[f, None]) & (py <= y1[f, None]) & (w0 >= -1e-7) & (w1 >= -1e-7) & (w2 >= -1e-7)
            rows, cols = np.nonzero(inside)
            if len(rows) == 0:
                continue
            depth = (w0 * fz[:, 0:1] + w1 * fz[:, 1:2] + w2 * fz[:, 2:3])[rows, cols]  # (K,) larger = nearer
            pixel = py[rows, cols] * width + px[rows, cols]  # (K,)
            order = np.lexsort((-depth, pixel))  # per pixel, nearest fragment first
            pixel, depth, face = pixel[order], depth[order], f[rows[order]]
            first = np.ones(len(pixel), dtype=bool)
            first[1:] = pixel[1:] != pixel[:-1]
            pixel, depth, face = pixel[first], depth[first], face[first]
            nearer = depth > zbuffer[pixel]
            zbuffer[pixel[nearer]] = depth[nearer]
            face_buffer[pixel[nearer]] = face[nearer]
    return face_buffer, zbuffer


def render_mesh_image(
    mesh: trimesh.Trimesh, elev: float = 30.0, azim: float = 45.0, size: int = 256, supersample: int = 2
) -> np.ndarray:
    """(size, size, 3) uint8 view of ``mesh`` from (elev, azim) degrees, fitted to the frame; white background.

    Flat Lambert shading, two-sided (generated meshes may have flipped faces), a slight depth cue so parts in
    front separate from parts behind; rendered at ``supersample`` x the size and averaged for anti-aliasing.
    """
    mesh = _as_trimesh(mesh)
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all():
        return np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    width = size * supersample
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    radius = max(float(np.linalg.norm(high - low)) / 2, 1e-12)  # bounding sphere: same scale in every view
    right, up, toward = _camera_basis(elev, azim)
    relative = vertices - (low + high) / 2  # (V, 3)
    scale = width / 2 * 0.94 / radius
    screen_x = width / 2 + relative @ right * scale  # (V,)
    screen_y = width / 2 - relative @ up * scale  # (V,) image rows grow downwards
    depth = relative @ toward  # (V,)
    face_ids = _rasterise(screen_x[faces], screen_y[faces], depth[faces], width)  # (W*W,)

    corners = vertices[faces]  # (F, 3, 3)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)
    camera_normals = np.stack([normals @ right, normals @ up, normals @ toward], axis=1)  # (F, 3)
    camera_normals *= np.where(camera_normals[:, 2:3] < 0, -1.0, 1.0)  # two-sided
    lambert = np.clip(camera_normals @ _LIGHT, 0.0, 1.0)  # (F,)
    face_depth = depth[faces].mean(axis=1) / radius  # (F,) in [-1, 1]
    intensity = (0.28 + 0.72 * lambert) * (0.88 + 0.12 * face_depth)  # (F,)
    face_rgb = np.clip(intensity[:, None] * MESH_COLOR[None] * 255.0, 0, 255)  # (F, 3)

    image = np.empty((width * width, 3), dtype=np.float64)
    image[:] = BACKGROUND
    covered = face_ids >= 0
    image[covered] = face_rgb[face_ids[covered]]
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # (size, size, 3)
    return np.round(image).astype(np.uint8)


# ------------------------------------------------------------------------------------------ normal maps
# Fixed views for comparing two meshes (the rendered Sharp Normal Error, vae/bench/rendered.py): the eight
# cube-diagonal directions (elevation +-35.26 deg, azimuth 45 + 90k). Every axis-aligned crease of a normalised
# shape is seen at an oblique angle from four of them instead of edge-on, which axis-aligned views would give.
CUBE_DIAGONAL_VIEWS: tuple[tuple[float, float], ...] = tuple(
    (elev, azim) for elev in (35.26, -35.26) for azim in (45.0, 135.0, 225.0, 315.0)
)


@dataclass
class NormalMap:
    """One orthographic view of a mesh in a FIXED frame (not fitted to the mesh, so two meshes' maps line up).

    Camera-space unit face normals, flipped to face the viewer (meshes extracted by marching cubes may carry
    flipped faces, and an orientation-free comparison is what a normal map shows), 0 on the background."""

    normals: np.ndarray  # (R, R, 3) float32; x right, y up, z toward the viewer
    depth: np.ndarray  # (R, R) float64, larger = nearer the viewer, -inf on the background
    elev: float
    azim: float
    half_width: float  # world units from the image centre to its border

    @property
    def covered(self) -> np.ndarray:
        return np.isfinite(self.depth)  # (R, R) bool

    @property
    def pixel_size(self) -> float:
        return 2.0 * self.half_width / self.depth.shape[0]


def project_points(
    points: np.ndarray, elev: float, azim: float, resolution: int, half_width: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column, row, depth) of world points (N, 3) in a fixed frame centred on the origin; columns and rows are
    continuous pixel coordinates (pixel (r, c) spans [c, c + 1) x [r, r + 1)), depth larger = nearer."""
    right, up, toward = _camera_basis(elev, azim)
    scale = resolution / (2.0 * half_width)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return resolution / 2 + points @ right * scale, resolution / 2 - points @ up * scale, points @ toward


def render_normal_map(
    mesh: trimesh.Trimesh,
    elev: float,
    azim: float,
    resolution: int = 512,
    half_width: float = 1.05 * math.sqrt(3.0),
) -> NormalMap:
    """Normal map of ``mesh`` from (elev, azim) degrees at ``resolution`` px, one sample per pixel centre.

    The frame is fixed: the origin at the centre, ``half_width`` world units to each border (the default holds
    the whole [-1.05, 1.05]^3 box from any direction), so the maps of two meshes compare pixel by pixel. Flat
    (per-face) normals: a rounded crease shows as a gradient across facets, a sharp one as a step."""
    mesh = _as_trimesh(mesh)
    normals = np.zeros((resolution, resolution, 3), np.float32)
    depth = np.full((resolution, resolution), -np.inf)
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all():
        return NormalMap(normals, depth, elev, azim, half_width)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    screen_x, screen_y, view_depth = project_points(vertices, elev, azim, resolution, half_width)  # (V,) each
    face_ids, zbuffer = _rasterise_with_depth(screen_x[faces], screen_y[faces], view_depth[faces], resolution)
    right, up, toward = _camera_basis(elev, azim)
    corners = vertices[faces]  # (F, 3, 3)
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3)
    face_normals /= np.maximum(np.linalg.norm(face_normals, axis=1, keepdims=True), 1e-20)
    camera_normals = np.stack(
        [face_normals @ right, face_normals @ up, face_normals @ toward], axis=1
    )  # (F, 3)
    camera_normals *= np.where(camera_normals[:, 2:3] < 0, -1.0, 1.0)  # facing the viewer
    covered = face_ids >= 0  # (R*R,)
    flat_normals = normals.reshape(-1, 3)
    flat_normals[covered] = camera_normals[face_ids[covered]]
    depth.reshape(-1)[covered] = zbuffer[covered]
    return NormalMap(normals, depth, elev, azim, half_width)


# ------------------------------------------------------------------------------------------ PNG layouts
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, max_lines: int
) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines


def _tile(mesh: trimesh.Trimesh, elev: float, azim: float, size: int) -> Image.Image:
    tile = Image.fromarray(render_mesh_image(mesh, elev, azim, size))
    mesh = _as_trimesh(mesh)
    if len(mesh.faces) == 0:
        draw = ImageDraw.Draw(tile)
        draw.rectangle([0, 0, size - 1, size - 1], outline=(200, 200, 200))
        draw.text(
            (size / 2, size / 2),
            "empty mesh",
            fill=(150, 150, 150),
            font=_font(max(10, size // 14)),
            anchor="mm",
        )
    return tile


def _caption_strip(text: str, width: int, font_size: int, max_lines: int) -> Image.Image:
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, text, font, width - 8, max_lines)
    line_height = int(font_size * 1.25)
    strip = Image.new("RGB", (width, line_height * max_lines + 6), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        draw.text((width / 2, 3 + row * line_height), line, fill=(30, 30, 30), font=font, anchor="ma")
    return strip


def render_mesh_png(
    mesh: trimesh.Trimesh,
    path: str | Path,
    views: Sequence[tuple[float, float]] = ((30, 45), (30, 135), (90, 0)),
    size: int = 256,
    title: str | None = None,
) -> Path:
    """Several (elev, azim) views side by side, with an optional title above; returns the PNG path."""
    if not views:
        raise ValueError("render_mesh_png needs at least one (elev, azim) view")
    tiles = [_tile(mesh, elev, azim, size) for elev, azim in views]
    header = _caption_strip(title, size * len(tiles), max(11, size // 16), 2) if title else None
    top = header.height if header else 0
    canvas = Image.new("RGB", (size * len(tiles), top + size), BACKGROUND)
    if header:
        canvas.paste(header, (0, 0))
    for column, tile in enumerate(tiles):
        canvas.paste(tile, (column * size, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def render_grid_png(
    meshes: Sequence[trimesh.Trimesh],
    path: str | Path,
    titles: Sequence[str] | None = None,
    columns: int = 4,
    size: int = 256,
    view: tuple[float, float] = (25, 40),
) -> Path:
    """A grid of meshes, one view each, with each title wrapped under its tile; returns the PNG path."""
    if len(meshes) == 0:
        raise ValueError("render_grid_png needs at least one mesh")
    if titles is not None and len(titles) != len(meshes):
        raise ValueError(f"got {len(titles)} titles for {len(meshes)} meshes")
    columns = max(1, min(columns, len(meshes)))
    rows = math.ceil(len(meshes) / columns)
    font_size = max(10, size // 18)
    strip_height = _caption_strip("", size, font_size, 3).height if titles is not None else 0
    cell_height = size + strip_height
    canvas = Image.new("RGB", (columns * size, rows * cell_height), BACKGROUND)
    for k, mesh in enumerate(meshes):
        left, top = (k % columns) * size, (k // columns) * cell_height
        canvas.paste(_tile(mesh, view[0], view[1], size), (left, top))
        if titles is not None:
            canvas.paste(_caption_strip(titles[k], size, font_size, 3), (left, top + size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def render_pairs_png(
    images: Sequence[np.ndarray],
    meshes: Sequence[trimesh.Trimesh],
    path: str | Path,
    titles: Sequence[str] | None = None,
    columns: int = 4,
    size: int = 192,
    view: tuple[float, float] = (25, 40),
) -> Path:
    """A contact sheet of (input image | generated mesh) pairs, each pair's title wrapped under it.

    ``images`` are (H, W, 3) uint8 condition images (shown resized to ``size``), one per mesh; returns the path."""
    if len(images) == 0 or len(images) != len(meshes):
        raise ValueError(f"render_pairs_png needs one image per mesh, got {len(images)} and {len(meshes)}")
    if titles is not None and len(titles) != len(meshes):
        raise ValueError(f"got {len(titles)} titles for {len(meshes)} pairs")
    columns = max(1, min(columns, len(meshes)))
    rows = math.ceil(len(meshes) / columns)
    font_size = max(10, size // 18)
    strip_height = _caption_strip("", 2 * size, font_size, 2).height if titles is not None else 0
    cell_width, cell_height = 2 * size + 8, size + strip_height  # 8 px gap between neighbouring pairs
    canvas = Image.new("RGB", (columns * cell_width, rows * cell_height), BACKGROUND)
    for k, (image, mesh) in enumerate(zip(images, meshes)):
        left, top = (k % columns) * cell_width, (k // columns) * cell_height
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((size, size))
        canvas.paste(picture, (left, top))
        canvas.paste(_tile(mesh, view[0], view[1], size), (left + size, top))
        if titles is not None:
            canvas.paste(_caption_strip(titles[k], 2 * size, font_size, 2), (left, top + size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path

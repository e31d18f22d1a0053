"""Offscreen preview renderer (data.render)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image

from dora_shapegen.data.render import _rasterise, render_grid_png, render_mesh_image, render_mesh_png

WHITE = 255


def _mask(image: np.ndarray) -> np.ndarray:
    return (image != WHITE).any(axis=-1)  # (H, W) pixels the mesh covers


def _bbox(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return cols.max() - cols.min() + 1, rows.max() - rows.min() + 1  # width, height


def test_sphere_renders_as_a_round_shaded_blob():
    size = 128
    image = render_mesh_image(trimesh.creation.icosphere(subdivisions=3), elev=30, azim=45, size=size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    mask = _mask(image)
    width, height = _bbox(mask)
    assert abs(width - height) <= 2
    assert mask.sum() / (width * height) == pytest.approx(np.pi / 4, abs=0.04)  # a disc fills pi/4 of its box
    rows, cols = np.nonzero(mask)
    assert abs(rows.mean() - size / 2) < 2 and abs(cols.mean() - size / 2) < 2
    assert image[mask].std() > 10  # Lambert shading varies over the sphere
    assert not mask[0].any() and not mask[:, 0].any()  # fitted inside the frame


def test_views_follow_y_up_camera():
    tall = trimesh.creation.box(extents=(0.2, 2.0, 0.2))  # along Y (up)
    front = _bbox(_mask(render_mesh_image(tall, elev=0, azim=0, size=96)))
    top = _bbox(_mask(render_mesh_image(tall, elev=90, azim=0, size=96)))
    assert front[1] > 5 * front[0]  # seen from the front it stands upright
    assert abs(top[0] - top[1]) <= 2 and top[0] < front[1] / 5  # from above only its small square end
    long_x = trimesh.creation.box(extents=(2.0, 0.2, 0.2))
    side = _bbox(_mask(render_mesh_image(long_x, elev=0, azim=90, size=96)))  # looking along -X
    assert abs(side[0] - side[1]) <= 2


@pytest.mark.parametrize("reverse", [False, True])
def test_zbuffer_keeps_the_nearest_triangle_whatever_the_order(reverse):
    # Two overlapping screen-space triangles; the second is nearer (larger depth = nearer the viewer).
    x = np.array([[2.0, 30.0, 2.0], [4.0, 30.0, 4.0]])
    y = np.array([[2.0, 2.0, 30.0], [4.0, 4.0, 30.0]])
    z = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    order = [1, 0] if reverse else [0, 1]
    face_ids = _rasterise(x[order], y[order], z[order], 32).reshape(32, 32)
    nearer = order.index(1)
    assert face_ids[8, 8] == nearer  # inside both
    assert face_ids[2, 20] == 1 - nearer  # only the farther one covers (row 2, column 20)
    assert face_ids[31, 31] == -1


def test_large_mesh_renders_fully():
    sphere = trimesh.creation.icosphere(subdivisions=6)  # 81920 faces, most smaller than a pixel
    mask = _mask(render_mesh_image(sphere, elev=20, azim=10, size=96))
    width, height = _bbox(mask)
    assert mask.sum() / (width * height) == pytest.approx(np.pi / 4, abs=0.04)  # no cracks between tiny faces


def test_render_mesh_png_writes_views_side_by_side(tmp_path):
    size = 64
    path = render_mesh_png(
        trimesh.creation.box(), tmp_path / "previews" / "box.png", size=size, title="a box"
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == 3 * size and image.height > size  # three views under a title strip
        pixels = np.asarray(image.convert("RGB"))
    views = pixels[-size:]
    for column in range(3):
        assert _mask(views[:, column * size : (column + 1) * size]).sum() > 0.1 * size * size
    assert _mask(pixels[:-size]).any()  # the title is drawn


def test_empty_mesh_gives_blank_tile_with_note(tmp_path):
    empty = trimesh.Trimesh()
    assert not _mask(render_mesh_image(empty, size=32)).any()
    path = render_mesh_png(empty, tmp_path / "empty.png", views=((30, 45),), size=96)
    with Image.open(path) as image:
        assert image.size == (96, 96)
        assert _mask(np.asarray(image.convert("RGB"))).any()  # the "empty mesh" note


def test_render_grid_png_lays_out_meshes_with_titles(tmp_path):
    meshes = [
        trimesh.creation.box(),
        trimesh.creation.icosphere(2),
        trimesh.Trimesh(),
        trimesh.creation.cylinder(0.3, 1.0),
        trimesh.creation.torus(1.0, 0.3),
    ]
    size = 64
    path = render_grid_png(
        meshes, tmp_path / "grid.png", titles=[f"mesh {k}" for k in range(5)], columns=2, size=size
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == 2 * size
        pixels = np.asarray(image.convert("RGB"))
    cell_height = pixels.shape[0] // 3
    assert cell_height > size  # a caption strip under each tile
    for k in (0, 1, 3, 4):
        top, left = (k // 2) * cell_height, (k % 2) * size
        assert _mask(pixels[top : top + size, left : left + size]).sum() > 0.05 * size * size
        assert _mask(pixels[top + size : top + cell_height, left : left + size]).any()  # its title
    assert not _mask(pixels[2 * cell_height :, size:]).any()  # the sixth cell stays empty
    with pytest.raises(ValueError, match="titles"):
        render_grid_png(meshes, tmp_path / "bad.png", titles=["only one"])


def test_normal_map_of_a_box_holds_its_three_visible_face_normals():
    from dora_shapegen.data.render import _camera_basis, render_normal_map

    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    normal_map = render_normal_map(box, 35.26, 45.0, 96)
    right, up, toward = _camera_basis(35.26, 45.0)
    expected = np.array([[n @ right, n @ up, n @ toward] for n in np.eye(3)])  # (3, 3): the +x, +y, +z faces
    distance = np.linalg.norm(
        normal_map.normals[normal_map.covered][:, None] - expected[None], axis=-1
    )  # (P, 3)
    assert (distance.min(axis=1) < 1e-5).all()  # every pixel shows one of them
    assert (np.bincount(distance.argmin(axis=1), minlength=3) > 300).all()  # and each of them is seen
    assert (normal_map.normals[~normal_map.covered] == 0).all()


def test_normal_map_frame_is_fixed_not_fitted():
    from dora_shapegen.data.render import render_normal_map

    small, large = trimesh.creation.box(extents=(0.49,) * 3), trimesh.creation.box(extents=(0.99,) * 3)
    # Front view, half-width 1 over 100 px: a box of side s covers 50 s pixels per side (pixel centres inside),
    # whatever its size; a mesh fitted to the frame would fill it in both cases.
    for box, side in ((small, 24), (large, 50)):
        covered = render_normal_map(box, 0.0, 0.0, 100, half_width=1.0).covered
        assert _bbox(covered) == (side, side)
    moved = render_normal_map(small.copy().apply_translation([0.2, 0.0, 0.0]), 0.0, 0.0, 100, half_width=1.0)
    columns = np.nonzero(moved.covered.any(axis=0))[0]
    assert columns.min() == 38 + 10  # the left border at 50 - 12.25 -> first centre 38.5; 0.2 units = 10 px


def test_pairs_sheet_puts_each_input_beside_its_mesh(tmp_path):
    from dora_shapegen.data.render import render_pairs_png

    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 220
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.5))
    path = render_pairs_png([red, red], [box, trimesh.Trimesh()], tmp_path / "pairs.png", ["a", "b"], 2, 64)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape[1] == 2 * (2 * 64 + 8)
    assert (sheet[10, 10] == (220, 0, 0)).all()  # input image, top left
    assert (sheet[:64, 64:128] != WHITE).any(axis=-1).any()  # the box beside it
    with pytest.raises(ValueError, match="one image per mesh"):
        render_pairs_png([red], [box, box], tmp_path / "bad.png")

"""Condition images (data.condition_image): clear errors for bad images, one crop convention for all inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dora_shapegen.data.condition_image import (
    MAX_SIDE,
    MIN_SIDE,
    ImageInputError,
    foreground_mask,
    prepare_condition_image,
    read_rgba,
    recenter,
)


def _square_on(
    background: tuple[int, int, int], size: int = 100, box: tuple = (20, 60, 30, 50)
) -> np.ndarray:
    """(size, size, 3) uint8: a red rectangle rows [top, bottom) x cols [left, right) on a plain background."""
    top, bottom, left, right = box
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    image[top:bottom, left:right] = (200, 30, 30)
    return image


def _box_of(image: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((image != 255).any(axis=-1))
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_recentre_puts_the_object_in_the_middle_at_the_border_ratio():
    image = prepare_condition_image(_square_on((255, 255, 255)), size=64, border_ratio=0.15)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    top, bottom, left, right = _box_of(image)
    assert bottom - top == pytest.approx(0.85 * 64, abs=1.5)  # the longer side (40 px rows) fills 85%
    assert right - left == pytest.approx(0.85 * 64 / 2, abs=1.5)  # aspect ratio kept (20 px columns)
    assert (top + bottom) / 2 == pytest.approx(32, abs=1) and (left + right) / 2 == pytest.approx(32, abs=1)
    assert (image[0] == 255).all() and (image[:, 0] == 255).all()  # white background


def test_plain_grey_background_becomes_white_and_is_cropped_like_a_white_one():
    on_grey = prepare_condition_image(_square_on((128, 128, 128)), size=64)
    on_white = prepare_condition_image(_square_on((255, 255, 255)), size=64)
    assert np.abs(on_grey.astype(int) - on_white.astype(int)).max() <= 2


def test_alpha_cutout_is_used_as_the_mask_and_composited_on_white():
    rgb = _square_on((0, 255, 0))  # green where the alpha hides it
    alpha = np.zeros((100, 100, 1), np.uint8)
    alpha[20:60, 30:50] = 255
    from_alpha = prepare_condition_image(np.concatenate([rgb, alpha], axis=-1), size=64)
    green = (from_alpha[..., 1] > 200) & (from_alpha[..., 0] < 100)  # (64, 64)
    assert not green.any()  # what the alpha hides is gone
    assert (
        np.abs(from_alpha.astype(int) - prepare_condition_image(_square_on((255, 255, 255)), 64)).max() <= 2
    )


def test_busy_background_is_used_whole_instead_of_guessing_a_mask():
    noisy = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    rgba, has_alpha = read_rgba(noisy)
    assert not has_alpha and foreground_mask(rgba, has_alpha) is None
    image = recenter(rgba, None, 60)
    assert image.shape == (60, 60, 3)
    assert (image[:10] == 255).all()  # 80 x 120 padded to a square: white bands above and below


def test_the_same_image_in_every_input_form_gives_the_same_result(tmp_path):
    array = _square_on((255, 255, 255))
    Image.fromarray(array).save(tmp_path / "box.png")
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0  # diffusers' (3, H, W) in [0, 1]
    results = [
        prepare_condition_image(source, 48)
        for source in (array, Image.fromarray(array), tmp_path / "box.png", str(tmp_path / "box.png"), tensor)
    ]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_recentring_a_recentred_image_changes_nothing():
    once = prepare_condition_image(_square_on((255, 255, 255)), 64)
    assert np.abs(prepare_condition_image(once, 64).astype(int) - once).max() <= 1


# ------------------------------------------------------------------------------------------------ bad images
def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ImageInputError, match="photo.png.*unreadable"):
        read_rgba(path)
    with pytest.raises(ImageInputError, match="missing.png: no such file"):
        read_rgba(tmp_path / "missing.png")


def test_truncated_file_fails_when_read_not_later(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_square_on((255, 255, 255))).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageInputError, match="cut.png.*unreadable"):
        read_rgba(path)


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "F", "1"])
def test_wrong_mode_is_refused_with_what_to_do(mode):
    image = Image.new(mode, (64, 64))
    with pytest.raises(ImageInputError, match=f"mode '{mode}' is not supported.*8-bit RGB"):
        read_rgba(image, name="scan.tif")


def test_grey_and_palette_images_are_read_as_colour():
    grey = Image.fromarray(_square_on((255, 255, 255))[..., 0])
    palette = Image.fromarray(_square_on((255, 255, 255))).convert("P")
    for image in (grey, palette):
        rgba, has_alpha = read_rgba(image)
        assert rgba.shape == (100, 100, 4) and not has_alpha


def test_tiny_and_huge_images_are_refused():
    with pytest.raises(ImageInputError, match=f"tiny.png: 20x{MIN_SIDE + 8} px is too small"):
        read_rgba(Image.new("RGB", (20, MIN_SIDE + 8)), name="tiny.png")
    with pytest.raises(ImageInputError, match="too large"):
        read_rgba(Image.new("L", (MAX_SIDE + 1, 40)), name="panorama.png")


def test_alpha_channel_hiding_everything_is_refused():
    transparent = np.zeros((64, 64, 4), np.uint8)
    with pytest.raises(ImageInputError, match="cutout.png: its alpha channel hides the whole image"):
        read_rgba(transparent, name="cutout.png")


def test_opaque_alpha_channel_counts_as_no_alpha():
    opaque = np.concatenate([_square_on((255, 255, 255)), np.full((100, 100, 1), 255, np.uint8)], axis=-1)
    assert read_rgba(opaque)[1] is False


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((64, 64, 2), np.uint8), "is not an image"),
        (np.zeros((64, 64, 3), np.int32), "pixel type int32"),
        (np.full((64, 64, 3), 2.0, np.float32), r"in \[0, 1\]"),
    ],
)
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ImageInputError, match=message):
        read_rgba(array)


def test_not_an_image_at_all():
    with pytest.raises(ImageInputError, match="dict is not an image"):
        read_rgba({"image": 1})

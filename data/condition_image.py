"""Condition images for image-to-3D: reading with clear errors, and the one crop convention renders and photos share.

Every image that conditions the DiT, a training render or a user's photo, goes through
:func:`prepare_condition_image`, so the two look alike to the image encoder:

1. read (a path, PIL image, numpy array or torch tensor) and check it: unreadable, an unsupported mode, too small
   or too large is an :class:`ImageInputError` naming the image;
2. the object's mask: the alpha channel when there is one (a cut-out, as image-to-3D users pass them), else the
   pixels that differ from a plain background estimated on the border (renders, product shots); a photo on a
   busy background has no such mask and is used whole (cut the object out first: no segmentation model is shipped);
3. recentre (Hunyuan3D-2.1's ``ImageProcessorV2.recenter``, TRELLIS's ``preprocess_image`` crop): the mask's
   bounding box is centred on a square canvas and scaled so its longer side fills ``1 - border_ratio`` of it
   (0.15 as Hunyuan3D-2.1; TRELLIS's 1.2x box is 0.17), then composited onto white (the renders' background;
   Hunyuan3D-2.1 uses white too, TRELLIS black).

The alpha channel is used, not refused: an RGBA cut-out is the normal input of image-to-3D systems. An alpha
channel that hides everything is an error (nothing to condition on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

WHITE = 255
MIN_SIDE = 32  # below this a crop holds too few pixels to show a shape (the CPU encoder reads 96-128 px)
MAX_SIDE = 8192  # larger images are resampled down anyway; refuse rather than decode gigabytes
MAX_PIXELS = 40_000_000
# Modes read as colour: 8-bit RGB / grey, with or without alpha, and palettes (converted). Not accepted: 1-bit
# ("1", no shading), CMYK (print separations), 16/32-bit integer and float ("I", "I;16", "F": depth maps or HDR,
# with no agreed mapping to display colour), YCbCr / LAB / HSV.
ACCEPTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "RGBa", "La")
BACKGROUND_TOLERANCE = 24  # max |channel difference| from the border colour still counted as background
PLAIN_BORDER_SHARE = 0.9  # share of border pixels near the median colour for the background to count as plain
ALPHA_THRESHOLD = 128  # alpha above this is the object (TRELLIS takes 0.8 * 255 for its box, Hunyuan any > 0)


class ImageInputError(ValueError):
    """A condition image that cannot be used; the message names the image and says what to do."""


def _label(source: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    """(H, W), (H, W, 1|3|4) uint8, or float in [0, 1] -> a PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageInputError(
            f"image {label}: array of shape {array.shape} is not an image; expected (H, W), (H, W, 3) or (H, W, 4)"
        )
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageInputError(f"image {label}: float pixels must be finite and in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ImageInputError(
            f"image {label}: pixel type {array.dtype} is not supported; give uint8 (0-255) or float in [0, 1]"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _open(source: Any, label: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(f"image {label}: no such file")
        try:
            image = Image.open(path)
            image.load()  # decode now, so a truncated file fails here and not inside the encoder
        except Image.DecompressionBombError as error:
            raise ImageInputError(f"image {label}: too large to decode safely ({error})") from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageInputError(
                f"image {label}: unreadable, not an image file PIL can decode ({type(error).__name__}: {error})"
            ) from error
        return image
    try:
        import torch

        if isinstance(source, torch.Tensor):
            tensor = source.detach().cpu()
            if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):  # diffusers' (C, H, W) in [0, 1]
                tensor = tensor.permute(1, 2, 0)
            return _from_array(
                tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy(), label
            )
    except ImportError:  # torch is a dependency; this keeps the module importable without it
        pass
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    raise ImageInputError(
        f"image {label}: {type(source).__name__} is not an image; give a file path, a PIL image, a uint8 "
        "(H, W, 3|4) array or a (3, H, W) tensor in [0, 1]"
    )


def read_rgba(source: Any, name: str | None = None) -> tuple[np.ndarray, bool]:
    """Checked image -> ((H, W, 4) uint8 RGBA, whether it carries a real alpha channel).

    Raises :class:`ImageInputError` naming the image when it is unreadable, of an unsupported mode, smaller than
    ``MIN_SIDE`` px on a side, or larger than ``MAX_SIDE`` px / ``MAX_PIXELS`` pixels.
    """
    label = _label(source, name)
    image = _open(source, label)
    width, height = image.size
    if image.mode not in ACCEPTED_MODES:
        raise ImageInputError(
            f"image {label}: mode {image.mode!r} is not supported (accepted: 8-bit RGB, RGBA, grey, grey + alpha, "
            "palette); save it as an 8-bit RGB or RGBA PNG/JPEG"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(
            f"image {label}: {width}x{height} px is too small; give at least {MIN_SIDE} px on each side"
        )
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageInputError(
            f"image {label}: {width}x{height} px is too large (at most {MAX_SIDE} px a side and "
            f"{MAX_PIXELS / 1e6:.0f} MP); downscale it first"
        )
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)  # (H, W, 4)
    if has_alpha:
        alpha = rgba[..., 3]
        if int(alpha.max()) <= ALPHA_THRESHOLD:
            raise ImageInputError(
                f"image {label}: its alpha channel hides the whole image (max alpha {int(alpha.max())}); "
                "nothing is left to condition on"
            )
        has_alpha = bool(alpha.min() < 255)  # an opaque alpha channel carries no mask
    return rgba, has_alpha


def foreground_mask(rgba: np.ndarray, has_alpha: bool) -> np.ndarray | None:
    """(H, W) bool mask of the object: alpha above ``ALPHA_THRESHOLD``, else pixels away from a plain border
    colour; None when there is no alpha and the border is not plain (a photo on a busy background)."""
    if has_alpha:
        return rgba[..., 3] > ALPHA_THRESHOLD
    rgb = rgba[..., :3].astype(np.int16)  # (H, W, 3)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (2W + 2H, 3)
    colour = np.median(border, axis=0)  # (3,)
    near = np.abs(border - colour).max(axis=1) <= BACKGROUND_TOLERANCE  # (2W + 2H,)
    if near.mean() < PLAIN_BORDER_SHARE:
        return None
    mask = np.abs(rgb - colour).max(axis=-1) > BACKGROUND_TOLERANCE  # (H, W)
    return mask if mask.any() else None


def recenter(rgba: np.ndarray, mask: np.ndarray | None, size: int, border_ratio: float = 0.15) -> np.ndarray:
    """The object centred on a white square of ``size`` px, its box's longer side ``(1 - border_ratio) * size``.

    Pixels outside the mask become white (with alpha: blended by it); without a mask the whole image is padded to
    a square and resized. Returns (size, size, 3) uint8.
    """
    if not 0.0 <= border_ratio < 1.0:
        raise ValueError(f"border_ratio must be in [0, 1), got {border_ratio}")
    rgb = rgba[..., :3].astype(np.float32)  # (H, W, 3)
    if mask is None:
        weight = rgba[..., 3:4].astype(np.float32) / 255.0  # (H, W, 1); opaque without alpha
        rows, cols = np.array([0, rgba.shape[0] - 1]), np.array([0, rgba.shape[1] - 1])
        fill = 1.0
    else:
        weight = np.where(rgba[..., 3:4] < 255, rgba[..., 3:4] / 255.0, mask[..., None]).astype(np.float32)
        rows, cols = np.nonzero(mask)
        fill = 1.0 - border_ratio
    composited = rgb * weight + WHITE * (1.0 - weight)  # (H, W, 3) on white
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = Image.fromarray(np.round(composited[top:bottom, left:right]).astype(np.uint8))
    scale = fill * size / max(bottom - top, right - left)
    new_w = max(1, round((right - left) * scale))
    new_h = max(1, round((bottom - top) * scale))
    crop = crop.resize((new_w, new_h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (WHITE, WHITE, WHITE))
    canvas.paste(crop, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def prepare_condition_image(
    source: Any, size: int, border_ratio: float = 0.15, name: str | None = None
) -> np.ndarray:
    """Read, check and recentre one condition image (the module docstring's steps); returns (size, size, 3) uint8."""
    rgba, has_alpha = read_rgba(source, name)
    return recenter(rgba, foreground_mask(rgba, has_alpha), size, border_ratio)

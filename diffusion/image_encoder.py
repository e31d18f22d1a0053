"""Image conditioners for the DiT, behind the text encoder's interface: ``encode(...)`` -> (tokens, mask, pooled).

Kinds (``ImageEncoder.kind``):

- ``"dinov2"``: a frozen transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) from a local folder or a
  Hub id (``dinov2:<folder or id>``; nothing is downloaded unless the id is not cached and the Hub is reachable).
  Its patch tokens feed cross-attention, its CLS token is the pooled vector; register tokens are dropped. Inputs
  are recentred images resized to ``image_size`` (518 by default: 37 x 37 patches of 14 px, the resolution
  Hunyuan3D-2.1 and TRELLIS condition on) and normalised with ImageNet's mean and std. ``tiny-random:dinov2`` is a
  small randomly initialised Dinov2Model built from a config (seeded), for tests and smoke runs.
- ``"render-cnn"``: :class:`~diffusion.modeling_render_encoder.RenderEncoder`, the offline CPU default, trained
  together with the DiT (``trainable`` is True: its parameters get gradients through the DiT's loss).

The unconditional embedding (classifier-free guidance, image dropout) is "no image": a single zero token whose
mask is 0 and a zero pooled vector. The DiT gives a row without any valid token no cross-attention contribution
(``ShapeDiT._context_mask``), so "no image" carries no information whichever encoder is used, and it needs no
encoder pass. Hunyuan3D-2.1 and TRELLIS use all-zero tokens for the same purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dora_shapegen.diffusion.text_encoder import TextEmbeddings

DEFAULT_IMAGE_ENCODER = "render-cnn"
KINDS = ("dinov2", "render-cnn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation (Hunyuan3D-2.1, TRELLIS)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # the RenderEncoder's: pixels to [-1, 1]
DINOV2_IMAGE_SIZE = 518
TINY_DINOV2_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
BORDER_RATIO = 0.15  # data/condition_image.py's crop: the object's box fills 85% of the image


def _tiny_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
        image_size=TINY_DINOV2_IMAGE_SIZE,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same weights in every process (multi-process training must agree)
        return Dinov2Model(config)


def _load_dinov2(location: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(location)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(
                f"image encoder {location!r} is a {config.model_type!r} model, not DINOv2 "
                "(dinov2 or dinov2_with_registers)"
            )
        return AutoModel.from_pretrained(location, dtype=dtype)
    except OSError as error:
        raise OSError(
            f"could not load the DINOv2 image encoder {location!r} (a local folder, or a Hub id already in the "
            f"cache when offline): {error}"
        ) from error


class ImageEncoder(nn.Module):
    """An image conditioner with its preprocessing; ``encode`` mirrors ``TextEncoder.encode``.

    Args:
        model: a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``, or a ``RenderEncoder``.
        kind: ``"dinov2"`` or ``"render-cnn"``.
        image_size: side in px of the encoder's input (the recentred image is resized to it).
        name: a label (the ``from_name`` argument), stored in run configs and pipelines.
        border_ratio: the crop convention user images are recentred with (``data/condition_image.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        image_size: int,
        name: str = "",
        border_ratio: float = BORDER_RATIO,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"ImageEncoder: unknown kind {kind!r}; choose from {KINDS}")
        self.model, self.kind, self.image_size = model, kind, int(image_size)
        self.border_ratio = float(border_ratio)
        self._name = name or kind
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if kind == "dinov2" else (HALF, HALF)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if kind == "render-cnn" and model.config.image_size != self.image_size:
            raise ValueError(
                f"ImageEncoder: the RenderEncoder takes {model.config.image_size} px images, not {image_size}"
            )
        if kind == "dinov2":
            self.model.requires_grad_(False)  # frozen, as in Hunyuan3D-2.1 and TRELLIS
            self.model.eval()

    @classmethod
    def from_name(
        cls,
        name: str = DEFAULT_IMAGE_ENCODER,
        model_config: dict[str, Any] | None = None,
        image_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageEncoder:
        """``render-cnn`` (a fresh RenderEncoder from ``model_config``; seed torch first), ``render-cnn:<folder>``
        (a trained one), ``tiny-random:dinov2``, ``dinov2:<folder or Hub id>``, or a DINOv2 folder."""
        from dora_shapegen.diffusion.modeling_render_encoder import RenderEncoder

        if name == "render-cnn":
            model = RenderEncoder(**(model_config or {}))
            return cls(model, "render-cnn", model.config.image_size, name)
        if name.startswith("render-cnn:"):
            model = RenderEncoder.from_pretrained(name.removeprefix("render-cnn:"))
            return cls(model, "render-cnn", model.config.image_size, name)
        if name == "tiny-random:dinov2":
            model = _tiny_dinov2()
            return cls(
                model.to(dtype) if dtype else model, "dinov2", image_size or TINY_DINOV2_IMAGE_SIZE, name
            )
        location = name.removeprefix("dinov2:")
        if location == name and not Path(name).is_dir():
            raise ValueError(
                f"unknown image encoder {name!r}: use render-cnn, render-cnn:<folder>, tiny-random:dinov2, "
                "dinov2:<folder or Hub id> (e.g. dinov2:facebook/dinov2-giant) or a DINOv2 folder"
            )
        return cls(_load_dinov2(location, dtype), "dinov2", image_size or DINOV2_IMAGE_SIZE, name)

    # ------------------------------------------------------------------ facts
    @property
    def name(self) -> str:
        return self._name

    @property
    def trainable(self) -> bool:
        """Whether the encoder trains with the DiT (the RenderEncoder) or stays frozen (DINOv2)."""
        return self.kind == "render-cnn"

    @property
    def hidden_size(self) -> int:
        """D of the tokens (the DiT's ``cross_attention_dim``)."""
        return int(self.model.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        """Size of the pooled vector (the DiT's ``pooled_projection_dim``): the CLS token or the token mean."""
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> ImageEncoder:
        # A frozen DINOv2 stays in eval mode (no dropout) even when a parent module trains.
        return super().train(mode and self.trainable)

    # ------------------------------------------------------------------ inputs
    def load_images(self, images: Any, names: Sequence[str] | None = None) -> torch.Tensor:
        """User images (a path, PIL image, array or tensor, or a list of them) -> (B, S, S, 3) uint8, checked and
        recentred (``data.condition_image.prepare_condition_image``; a bad one raises ``ImageInputError``)."""
        from dora_shapegen.data.condition_image import prepare_condition_image

        if isinstance(images, torch.Tensor) and images.ndim == 4:
            items = list(images)  # (B, C, H, W): one image per row
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("ImageEncoder: got an empty list of images")
        prepared = [
            prepare_condition_image(item, self.image_size, self.border_ratio, names[i] if names else None)
            for i, item in enumerate(items)
        ]
        return torch.from_numpy(np.stack(prepared))  # (B, S, S, 3)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 recentred images -> (B, 3, S, S) normalised encoder input, resized when H != S."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                f"ImageEncoder: expected (B, H, W, 3) uint8 images, got {tuple(images.shape)} {images.dtype}"
            )
        pixels = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(
                pixels,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            ).clamp(0.0, 1.0)  # (B, 3, S, S)
        pixels = (pixels - self.pixel_mean) / self.pixel_std  # (B, 3, S, S)
        return pixels.to(next(self.model.parameters()).dtype)

    # ------------------------------------------------------------------ encoding
    def forward(self, images: torch.Tensor) -> TextEmbeddings:
        """(B, H, W, 3) uint8 recentred images -> (tokens (B, L, D), mask (B, L), pooled (B, D)); with gradients
        when the encoder is trainable."""
        pixels = self.pixel_values(images)  # (B, 3, S, S)
        if self.kind == "render-cnn":
            tokens, pooled = self.model(pixels)  # (B, L, D), (B, D)
        else:
            hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + R + P, D), layer-normed
            registers = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
            tokens, pooled = hidden[:, 1 + registers :], hidden[:, 0]  # (B, P, D) patches, (B, D) CLS
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)  # (B, L)
        return TextEmbeddings(tokens, mask, pooled)

    @torch.no_grad()
    def encode(
        self, images: Any, device: torch.device | str | None = None, names: Sequence[str] | None = None
    ) -> TextEmbeddings:
        """Encode user images (checked and recentred by :meth:`load_images`), without gradients."""
        return self(self.load_images(images, names)).to(device or self.device)

    def unconditional(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> TextEmbeddings:
        """ "No image" for ``batch_size`` rows: one zero token with mask 0 and a zero pooled vector."""
        device = device or self.device
        return TextEmbeddings(
            torch.zeros(batch_size, 1, self.hidden_size, device=device, dtype=dtype),  # (B, 1, D)
            torch.zeros(batch_size, 1, device=device, dtype=torch.long),  # (B, 1)
            torch.zeros(batch_size, self.pooled_size, device=device, dtype=dtype),  # (B, D)
        )

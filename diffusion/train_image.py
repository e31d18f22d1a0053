"""The image side of `dora train-dit` (``condition: image | both``): what such a run does at each stage of
``diffusion/train.py``, which calls these and otherwise reads as a text run.

- build: the image encoder (a fresh RenderEncoder, the init_from run's trained one, or a frozen DINOv2), a check
  that the cache holds condition images and the DiT's widths fit the encoders, and, when the encoder trains, the
  two as one module (``ImageConditionedDiT``) so that the optimizer, DDP, the EMA and checkpoints cover both;
- step: each modality dropped on its own, the images encoded (through the trained module, or without gradients),
  the DiT run (:class:`ImageConditioning`);
- export: the DiT and the encoder trained with it, both with their EMA weights.

The condition images come with the latents (``diffusion/train_utils.py``), what the conditions mean for ShapeDiT's
inputs is ``diffusion/conditioning.py``, the previews ``diffusion/sampling_preview.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dora_shapegen.diffusion.conditioning import (
    IMAGE_ENCODER_FOLDER,
    ImageConditionedDiT,
    check_dit_fits,
    dit_inputs,
    drop_images,
    keep_images,
    uses_images,
)


# ------------------------------------------------------------------------------------------------ build
def check_init_condition(config: Any) -> None:
    """A fine-tuned DiT keeps the conditioning it was trained with: the same ``condition`` and image encoder."""
    if not config.init_from:
        return
    path = Path(config.init_from) / "run_config.yaml"
    if not path.is_file():
        return
    import yaml

    recorded = yaml.safe_load(path.read_text()) or {}
    before = recorded.get("condition", "text")
    if before != config.condition:
        raise ValueError(
            f"condition={config.condition!r} contradicts init_from {config.init_from} (trained with "
            f"condition={before!r}); set condition: {before}"
        )
    if uses_images(before) and recorded.get("image_encoder", config.image_encoder) != config.image_encoder:
        raise ValueError(
            f"image_encoder={config.image_encoder!r} contradicts init_from {config.init_from} (trained with "
            f"image_encoder={recorded.get('image_encoder')!r}); set image_encoder: {recorded.get('image_encoder')}"
        )


def build_image_encoder(config: Any) -> Any:
    """The run's image encoder: a fresh RenderEncoder (seed torch first), the init_from run's trained one, or a
    frozen DINOv2. A LoRA run trains adapters only, so its RenderEncoder is frozen too."""
    from dora_shapegen.diffusion.image_encoder import ImageEncoder

    trained = Path(config.init_from or "") / IMAGE_ENCODER_FOLDER
    if config.image_encoder == "render-cnn" and config.init_from:
        if not (trained / "config.json").is_file():
            raise FileNotFoundError(f"init_from {config.init_from} has no trained image encoder ({trained})")
        encoder = ImageEncoder.from_name(f"render-cnn:{trained}")
    else:
        encoder = ImageEncoder.from_name(config.image_encoder, config.image_encoder_model, config.image_size)
    if config.lora.rank > 0:
        encoder.requires_grad_(False)
    return encoder


def trains_image_encoder(encoder: Any) -> bool:
    """Whether this run's optimizer updates the image encoder (a RenderEncoder outside a LoRA run)."""
    return encoder is not None and encoder.trainable and any(p.requires_grad for p in encoder.parameters())


def check_image_cache(
    model_config: Any,
    manifest: dict[str, Any],
    shards: str,
    condition: str,
    text_encoder: Any,
    image_encoder: Any,
) -> None:
    """Clear errors for a cache without condition images, or a DiT whose widths do not fit its encoders."""
    if not manifest.get("renders"):
        raise ValueError(
            f"{shards}: condition {condition!r} trains on condition images, but this cache has none; run "
            "`dora render-views PREPARED`, then `dora cache-latents` into a new folder"
        )
    check_dit_fits(model_config, condition, text_encoder, image_encoder)


def with_image_encoder(model: nn.Module, image_encoder: Any, condition: str) -> nn.Module:
    """The DiT and an encoder that trains as one ``ImageConditionedDiT``; the DiT alone otherwise (no encoder, or a
    frozen one, whose features are computed outside the trained module)."""
    if trains_image_encoder(image_encoder):
        return ImageConditionedDiT(model, image_encoder, condition)
    return model


# ------------------------------------------------------------------------------------------------- step
class ImageConditioning:
    """The conditioning side of an image / both run's training step: drop each modality on its own, encode the
    images (through the trained module, or a frozen encoder without gradients) and run the DiT."""

    def __init__(self, condition: str, image_encoder: Any, unwrapped: nn.Module, training: Any) -> None:
        self.condition, self.image_encoder, self.unwrapped = condition, image_encoder, unwrapped
        self.caption_dropout, self.image_dropout = training.caption_dropout, training.image_dropout

    def predict(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator,
        captions: Any,
    ) -> torch.Tensor:
        """Velocity (B, k, C) for noisy latents (B, k, C); ``model`` as prepared by the training core."""
        from dora_shapegen.diffusion.flow_matching import drop_captions

        text = None
        if self.condition == "both":
            text = captions(drop_captions(batch["caption"], self.caption_dropout, generator))
        keep = keep_images(noisy.shape[0], self.image_dropout, generator)  # (B,)
        images = batch["image"].to(noisy.device)  # (B, H, W, 3) uint8
        if isinstance(self.unwrapped, ImageConditionedDiT):  # the encoder trains: its forward is the model's
            return model(noisy, timesteps, images, keep, text)
        with torch.no_grad():  # a frozen encoder (DINOv2, or a LoRA run's): features only
            image = drop_images(self.image_encoder(images), keep)
        inputs = dit_inputs(self.unwrapped, self.condition, text, image)
        return model(noisy, timesteps, return_dict=False, **inputs)[0]


# ----------------------------------------------------------------------------------------------- export
def save_image_model(model: ImageConditionedDiT, ema: Any, directory: Path) -> None:
    """The DiT and the image encoder trained with it, both with the EMA weights: the DiT in ``directory``, the
    encoder in its ``image_encoder/`` folder (where `dora assemble-pipeline` and ``--init-from`` look)."""
    from dora_shapegen.training.ema import ema_weights

    with ema_weights(model, ema):
        model.transformer.save_pretrained(str(directory))
        model.image_encoder.model.save_pretrained(str(directory / IMAGE_ENCODER_FOLDER))

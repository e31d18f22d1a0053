"""What the DiT is conditioned on: text, an image, or both, and how each maps onto ShapeDiT's inputs.

``condition`` (a DiT run's config key, recorded in the pipeline):

- ``"text"``: the text encoder's tokens are the cross-attention context, its pooled vector joins the timestep
  embedding (the text-to-3D model, unchanged);
- ``"image"``: the image encoder's tokens and pooled vector take exactly the same two places (the DiT's
  ``cross_attention_dim`` is the image encoder's width);
- ``"both"``: text stays the primary stream; the image tokens are projected to the text width by the DiT
  (``image_embed_dim``) and appended to the context, the image's pooled vector gets its own embedding
  (``image_pooled_projection_dim``). Each modality is dropped on its own during training (``caption_dropout``,
  ``image_dropout``), so one model follows a prompt, an image, or both, and guidance has an unconditional branch.

"No image" is an empty, fully masked sequence (``ImageEncoder.unconditional``); image dropout zeroes a row's
tokens, mask and pooled vector, which is the same thing padded. ShapeDiT gives a row without valid tokens no
cross-attention contribution, so a dropped image and the guidance branch carry no information at all.

How a `dora train-dit` run with images builds, trains and exports its encoder is ``diffusion/train_image.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dora_shapegen.diffusion.text_encoder import TextEmbeddings

CONDITIONS = ("text", "image", "both")
IMAGE_ENCODER_FOLDER = "image_encoder"  # beside the DiT's weights in a trained export (the RenderEncoder)


def check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    return condition


def uses_text(condition: str) -> bool:
    return check_condition(condition) in ("text", "both")


def uses_images(condition: str) -> bool:
    return check_condition(condition) in ("image", "both")


def keep_images(batch_size: int, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool: which rows keep their image (per-sample dropout for classifier-free guidance)."""
    draws = torch.rand(batch_size, generator=generator, device=generator.device)  # (B,)
    return draws >= dropout


def drop_images(embeddings: TextEmbeddings, keep: torch.Tensor) -> TextEmbeddings:
    """Rows where ``keep`` is False become "no image": zero tokens, zero mask, zero pooled vector."""
    weight = keep.to(embeddings.hidden_states.dtype)  # (B,)
    return TextEmbeddings(
        embeddings.hidden_states * weight[:, None, None],  # (B, L, D)
        embeddings.attention_mask * keep.long()[:, None],  # (B, L)
        embeddings.pooled * weight[:, None],  # (B, P)
    )


def dit_inputs(
    transformer: nn.Module, condition: str, text: TextEmbeddings | None, image: TextEmbeddings | None
) -> dict[str, Any]:
    """ShapeDiT keyword arguments for the conditioning streams of ``condition`` (see the module docstring)."""
    config = transformer.config
    primary = text if condition in ("text", "both") else image
    if primary is None:
        raise ValueError(
            f"condition={condition!r} needs {'text' if condition != 'image' else 'image'} embeddings"
        )
    inputs = {
        "encoder_hidden_states": primary.hidden_states,
        "encoder_attention_mask": primary.attention_mask,
        "pooled_projections": primary.pooled if config.get("pooled_projection_dim") else None,
    }
    if condition == "both":
        if image is None:
            raise ValueError("condition='both' needs image embeddings (ImageEncoder.unconditional for none)")
        inputs |= {
            "image_hidden_states": image.hidden_states,
            "image_attention_mask": image.attention_mask,
            "image_pooled_projections": image.pooled if config.get("image_pooled_projection_dim") else None,
        }
    return inputs


def check_dit_fits(model_config: Any, condition: str, text_encoder: Any, image_encoder: Any) -> None:
    """Clear errors for a DiT whose widths do not fit its conditioners (a config written for another encoder)."""
    primary = text_encoder if condition in ("text", "both") else image_encoder
    what = "text" if condition in ("text", "both") else "image"
    if primary.hidden_size != model_config.cross_attention_dim:
        raise ValueError(
            f"the {what} encoder gives {primary.hidden_size}-d tokens but model.cross_attention_dim is "
            f"{model_config.cross_attention_dim}"
        )
    pooled = model_config.pooled_projection_dim
    if pooled is not None and primary.pooled_size != pooled:
        raise ValueError(
            f"the {what} encoder gives a {primary.pooled_size}-d pooled vector but model.pooled_projection_dim "
            f"is {pooled}"
        )
    image_dim = model_config.get("image_embed_dim")
    if condition == "both":
        if image_dim != image_encoder.hidden_size:
            raise ValueError(
                f"condition 'both': the image encoder gives {image_encoder.hidden_size}-d tokens but "
                f"model.image_embed_dim is {image_dim}; set model.image_embed_dim: {image_encoder.hidden_size}"
            )
        image_pooled = model_config.get("image_pooled_projection_dim")
        if image_pooled is not None and image_pooled != image_encoder.pooled_size:
            raise ValueError(
                f"condition 'both': the image encoder gives a {image_encoder.pooled_size}-d pooled vector but "
                f"model.image_pooled_projection_dim is {image_pooled}"
            )
    elif image_dim is not None:
        raise ValueError(
            f"model.image_embed_dim is for condition 'both'; this run's condition is {condition!r}"
        )


class ImageConditionedDiT(nn.Module):
    """ShapeDiT and the image encoder that trains with it, as the one module the training core optimises.

    The optimizer, DDP, gradient clipping, the EMA and checkpoints then cover both networks, and the encoder's
    gradients come from the flow-matching loss through cross-attention. A frozen encoder (DINOv2) stays outside:
    its features are computed without gradients and passed in as embeddings, so neither checkpoints nor the EMA
    carry a copy of it.
    """

    def __init__(self, transformer: nn.Module, image_encoder: nn.Module, condition: str) -> None:
        super().__init__()
        if not uses_images(condition):
            raise ValueError(f"ImageConditionedDiT needs an image condition, got {condition!r}")
        self.transformer, self.image_encoder, self.condition = transformer, image_encoder, condition

    @property
    def config(self) -> Any:
        """The DiT's config (what the training code reads of the model)."""
        return self.transformer.config

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        images: torch.Tensor,
        keep: torch.Tensor,
        text: TextEmbeddings | None = None,
    ) -> torch.Tensor:
        """Velocity (B, N, C) for noisy latents (B, N, C), images (B, H, W, 3) uint8 and ``keep`` (B,) bool."""
        image = drop_images(self.image_encoder(images), keep)  # (B, L, D), (B, L), (B, D)
        inputs = dit_inputs(self.transformer, self.condition, text, image)
        return self.transformer(hidden_states, timestep, return_dict=False, **inputs)[0]  # (B, N, C)

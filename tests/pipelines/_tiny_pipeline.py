"""Tiny random pipeline components for the pipeline, generate and demo tests (seconds on a CPU).

The real modules with tiny configs: DoraVAE, ShapeDiT, the seeded ``tiny-random:bert`` text encoder (MiniLM
tokenizer) and diffusers' FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dora_shapegen.diffusion import ShapeDiT
from dora_shapegen.diffusion.text_encoder import TextEncoder
from dora_shapegen.pipelines.pipeline_image_to_3d import DoraImageTo3DPipeline
from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline
from dora_shapegen.vae import DoraVAE

LATENT_CHANNELS = 8
NUM_TOKENS = 32
MAX_TRAIN_TOKENS = 64


def _tiny_vae() -> DoraVAE:
    """The tiny random VAE of both pipelines (draws from torch's global generator: seed it first)."""
    return DoraVAE(
        width=32, heads=2, num_encoder_layers=1, num_decoder_layers=1, latent_channels=LATENT_CHANNELS,
        num_freqs=4, output_type="tsdf", default_num_tokens=NUM_TOKENS, max_train_tokens=MAX_TRAIN_TOKENS,
        n_uniform=256, n_salient=64,
    )  # fmt: skip


@torch.no_grad()
def _randomize_zero_tensors(transformer: ShapeDiT) -> None:
    """Small random values for the DiT's zero-initialised tensors, so that every part influences the output."""
    for parameter in transformer.parameters():
        if not parameter.any():
            parameter.normal_(0.0, 0.2)


def make_tiny_pipeline(seed: int = 0, default_guidance_scale: float | None = None) -> DoraTextTo3DPipeline:
    """A pipeline of tiny random models whose every part influences the output (``default_guidance_scale``: the
    stored guidance, None as in a folder assembled before pipelines stored one).

    ShapeDiT starts as a zero-velocity identity (zero gates and output layer, by design for training); here those
    zero-initialised tensors get small random values so that the prompt, guidance and steps change the result.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae()
        encoder = TextEncoder.from_name("tiny-random:bert")
        transformer = ShapeDiT(
            in_channels=LATENT_CHANNELS, width=32, num_layers=2, num_heads=2, mlp_ratio=2.0,
            cross_attention_dim=encoder.hidden_size, pooled_projection_dim=encoder.pooled_size,
        )  # fmt: skip
        _randomize_zero_tensors(transformer)
        latent_mean = torch.linspace(-0.5, 0.5, LATENT_CHANNELS).tolist()
        latent_std = torch.linspace(0.5, 1.5, LATENT_CHANNELS).tolist()
    pipe = DoraTextTo3DPipeline(
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=encoder.model,
        tokenizer=encoder.tokenizer,
        latent_mean=latent_mean,
        latent_std=latent_std,
        text_encoder_kind=encoder.kind,
        text_max_length=encoder.max_length,
        default_guidance_scale=default_guidance_scale,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_image_pipeline(
    condition: str = "image", seed: int = 0, default_guidance_scale: float | None = None
) -> DoraImageTo3DPipeline:
    """A DoraImageTo3DPipeline of tiny random models: ``"image"`` with a RenderEncoder (32 px renders), ``"both"``
    with the tiny random DINOv2 (56 px) beside the tiny random BERT text encoder; zero-initialised DiT tensors get
    small random values, as in :func:`make_tiny_pipeline`."""
    from dora_shapegen.diffusion.image_encoder import ImageEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae()
        if condition == "image":
            image = ImageEncoder.from_name(
                "render-cnn", {"image_size": 32, "channels": [16, 32], "stem_channels": 8, "hidden_size": 32}
            )
            text, extra = None, {}
        else:
            image = ImageEncoder.from_name("tiny-random:dinov2")
            text = TextEncoder.from_name("tiny-random:bert")
            extra = {"image_embed_dim": image.hidden_size, "image_pooled_projection_dim": image.pooled_size}
        primary = text or image
        transformer = ShapeDiT(
            in_channels=LATENT_CHANNELS, width=32, num_layers=2, num_heads=2, mlp_ratio=2.0,
            cross_attention_dim=primary.hidden_size, pooled_projection_dim=primary.pooled_size, **extra,
        )  # fmt: skip
        _randomize_zero_tensors(transformer)
    pipe = DoraImageTo3DPipeline(
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_encoder=image.model.eval(),
        text_encoder=text.model if text else None,
        tokenizer=text.tokenizer if text else None,
        latent_mean=torch.linspace(-0.5, 0.5, LATENT_CHANNELS).tolist(),
        latent_std=torch.linspace(0.5, 1.5, LATENT_CHANNELS).tolist(),
        text_encoder_kind=text.kind if text else None,
        condition=condition,
        image_size=image.image_size,
        image_encoder_kind=image.kind,
        default_guidance_scale=default_guidance_scale,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo(kind: int = 0, size: int = 80) -> np.ndarray:
    """(size, size, 3) uint8: a coloured block on white, its shape set by ``kind``."""
    image = np.full((size, size, 3), 255, np.uint8)
    height, width = (50, 20) if kind == 0 else (20, 60)
    top, left = (size - height) // 2, (size - width) // 2
    image[top : top + height, left : left + width] = (200, 60, 40) if kind == 0 else (40, 90, 200)
    return image


@torch.no_grad()
def center_surface_on(pipe: DoraTextTo3DPipeline, prompt: Any, **call_kwargs) -> torch.Tensor:
    """Shift the VAE's output bias so that the field of the shape ``pipe(prompt, **call_kwargs)`` generates is
    at the surface level (0.5) at its median over the extraction volume: a random decoder's field otherwise may
    not cross 0.5 anywhere and give an empty mesh. The denoiser does not use the VAE, so the latents (returned)
    are unchanged; call with the same arguments (and seed) as the generation that must give a surface."""
    latents = pipe(prompt, output_type="latent", **call_kwargs).latents  # (1, N, C)
    axis = torch.linspace(-1.0, 1.0, 17)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # (17^3, 3)
    raw = pipe.vae.decode(latents[:1])(grid, output="raw")[0]  # (M,)
    pipe.vae.output_proj.bias -= raw.median()
    return latents

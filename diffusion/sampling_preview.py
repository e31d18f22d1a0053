"""Periodic training previews: fixed prompts -> sampled latents -> (VAE decode -> meshes -> PNG grid).

Uses only the lower stages (``data`` for meshing/rendering, ``vae`` for decoding) and the guided sampler of
``diffusion/sampling.py``, the one ``DoraTextTo3DPipeline`` runs: same prompt encoding, noise, scheduler (the one
training saves beside the DiT) and guidance, so a preview shows what `dora generate` makes with the same seed.
The full text-to-3D pipeline lives in ``pipelines/`` and is never imported here.
Without a VAE the preview still samples and logs statistics of the generated latents (their std should approach
1 in normalised space; a collapse towards 0 shows up here first).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dora_shapegen.data.latent_shards import LatentStats
from dora_shapegen.diffusion.sampling import (
    SamplingState,
    encode_prompts,
    guided_sample,
    initial_noise,
    sampling_timesteps,
    uses_guidance,
)
from dora_shapegen.diffusion.text_encoder import TextEncoder

logger = logging.getLogger("dora.train_dit")


def default_prompts(count: int) -> list[str]:
    """One plain prompt for each of the first ``count`` procedural categories."""
    from dora_shapegen.data.procedural import example_prompts

    return [prompts[0] for prompts in example_prompts(per_category=1).values()][:count]


@torch.no_grad()
def sample_preview_latents(
    model: torch.nn.Module,
    text_encoder: TextEncoder,
    prompts: list[str],
    num_tokens: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    shift: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """One latent set per prompt (P, N, C), in the DiT's normalised space: what
    ``DoraTextTo3DPipeline(prompts, generator=torch.Generator(device).manual_seed(seed), output_type="latent")``
    makes with these settings before it un-normalises."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    # The scheduler diffusion/train.py saves beside the DiT, which `dora assemble-pipeline` picks up.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    text = encode_prompts(text_encoder, prompts, guidance=uses_guidance(guidance_scale), device=device)
    generator = torch.Generator(device).manual_seed(seed)
    latents = initial_noise(
        len(prompts), num_tokens, model.config.in_channels, dtype, device, generator
    )  # (P,N,C)
    timesteps = sampling_timesteps(scheduler, num_inference_steps, num_tokens, device)
    state = SamplingState(latents, text.to(device, dtype))
    return guided_sample(model, scheduler, state, timesteps, guidance_scale, generator=generator)  # (P,N,C)


@torch.no_grad()
def render_preview(
    model: torch.nn.Module,
    text_encoder: TextEncoder,
    prompts: list[str],
    stats: LatentStats,
    path: Path,
    num_tokens: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    shift: float = 1.0,
    seed: int = 0,
    vae: Any | None = None,
    mesh_resolution: int = 64,
) -> dict[str, float]:
    """Sample one shape per prompt (fixed seed), write ``path`` (PNG grid) when a VAE is given; return stats."""
    latents = sample_preview_latents(
        model, text_encoder, prompts, num_tokens, num_inference_steps, guidance_scale, shift, seed
    )  # (P,N,C) normalised
    return preview_grid(latents, prompts, stats, path, vae, mesh_resolution)


def preview_grid(
    latents: torch.Tensor,
    labels: list[str],
    stats: LatentStats,
    path: Path,
    vae: Any | None = None,
    mesh_resolution: int = 64,
) -> dict[str, float]:
    """Statistics of sampled latents (P, N, C); with a VAE also their meshes as a PNG grid at ``path``."""
    metrics = {
        "sample/latent_std": float(latents.float().std()),
        "sample/latent_mean": float(latents.float().mean()),
    }
    if vae is None:
        return metrics
    from dora_shapegen.data.marching import extract_mesh
    from dora_shapegen.data.render import render_grid_png

    vae_latents = stats.denormalize(latents.float()).to(vae.device, vae.dtype)  # (P,N,C) VAE space
    meshes, titles = [], []
    for index, prompt in enumerate(labels):
        try:
            # one shape per decode: a DecodedLatents field queries every shape of its batch at each call
            mesh = extract_mesh(
                vae.decode(vae_latents[index : index + 1]).field(0), resolution=mesh_resolution
            )
        except Exception as error:  # a bad sample must not stop training: log it and leave the tile empty
            logger.warning("preview %r: mesh extraction failed: %s", prompt, error)
            mesh = None
        if mesh is None or len(mesh.faces) == 0:
            titles.append(f"{prompt} (empty)")
            import trimesh

            mesh = trimesh.creation.box(extents=(1e-3, 1e-3, 1e-3))  # a speck: keeps the grid layout
        else:
            titles.append(prompt)
        meshes.append(mesh)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_grid_png(meshes, path, titles=titles, columns=min(4, len(meshes)), size=192)
    metrics["sample/empty_meshes"] = float(sum(title.endswith("(empty)") for title in titles))
    return metrics


@torch.no_grad()
def render_image_preview(
    model: torch.nn.Module,
    image_encoder: Any,
    text_encoder: TextEncoder | None,
    condition: str,
    images: torch.Tensor,
    titles: list[str],
    stats: LatentStats,
    path: Path,
    num_tokens: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    shift: float = 1.0,
    seed: int = 0,
    vae: Any | None = None,
    mesh_resolution: int = 64,
) -> dict[str, float]:
    """One shape per training render (P, H, W, 3) uint8, conditioned as ``DoraImageTo3DPipeline(images)`` would
    be (a ``both`` model gets the empty prompt; guidance contrasts with "no image"); the grid as ``render_preview``."""
    from dora_shapegen.diffusion.sampling import merge_embeddings

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    guidance = uses_guidance(guidance_scale)
    count = images.shape[0]
    image = image_encoder(images.to(device))  # (P, L, D), (P, L), (P, D)
    if guidance:
        image = merge_embeddings(image_encoder.unconditional(count, device, image.hidden_states.dtype), image)
    image = image.to(device, dtype)
    text = None
    if condition == "both":
        text = encode_prompts(text_encoder, [""] * count, guidance=guidance, device=device).to(device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    generator = torch.Generator(device).manual_seed(seed)
    latents = initial_noise(count, num_tokens, model.config.in_channels, dtype, device, generator)  # (P,N,C)
    timesteps = sampling_timesteps(scheduler, num_inference_steps, num_tokens, device)
    state = SamplingState(latents, image) if text is None else SamplingState(latents, text, image=image)
    latents = guided_sample(
        model, scheduler, state, timesteps, guidance_scale, generator=generator
    )  # (P,N,C)
    return preview_grid(latents, titles, stats, path, vae, mesh_resolution)

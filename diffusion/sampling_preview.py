"""Periodic training previews: fixed prompts (or training renders) -> sampled latents -> (VAE decode -> meshes ->
PNG grid); ``Previews`` is a `dora train-dit` run's set of them (``build_previews``, ``log_preview``).

Uses only the lower stages (``data`` for meshing/rendering, ``vae`` for decoding) and the guided sampler of
``diffusion/sampling.py``, the one ``DoraTextTo3DPipeline`` runs: same prompt encoding, noise, scheduler (the one
training saves beside the DiT) and guidance, so a preview shows what `dora generate` makes with the same seed.
The full text-to-3D pipeline lives in ``pipelines/`` and is never imported here.
Without a VAE the preview still samples and logs statistics of the generated latents (their std should approach
1 in normalised space; a collapse towards 0 shows up here first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from dora_shapegen.diffusion.train_config import sampling_shift

if TYPE_CHECKING:
    from dora_shapegen.diffusion.train_config import DiTTrainConfig, SamplingConfig
    from dora_shapegen.training.schedules import TokenSchedule

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
    device = next(model.parameters()).device
    text = encode_prompts(text_encoder, prompts, guidance=uses_guidance(guidance_scale), device=device)
    sampling = (num_tokens, num_inference_steps, guidance_scale, shift, seed)
    return _sample(model, len(prompts), text, None, *sampling)  # (P,N,C)


def _sample(
    model: torch.nn.Module,
    count: int,
    conditioning: Any,
    image: Any,
    num_tokens: int,
    num_inference_steps: int,
    guidance_scale: float,
    shift: float,
    seed: int,
) -> torch.Tensor:
    """The denoising both previews share, as the pipelines run it: seeded noise (P, N, C) -> latents (P, N, C)
    for ``count`` conditions (``conditioning``, unconditional rows first under guidance; ``image``: the image
    stream of a ``both`` model, else None)."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    # The scheduler diffusion/train.py saves beside the DiT, which `dora assemble-pipeline` picks up.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    generator = torch.Generator(device).manual_seed(seed)
    latents = initial_noise(count, num_tokens, model.config.in_channels, dtype, device, generator)  # (P,N,C)
    timesteps = sampling_timesteps(scheduler, num_inference_steps, num_tokens, device)
    state = SamplingState(latents, conditioning.to(device, dtype), image=image)
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
    sampling = (num_tokens, num_inference_steps, guidance_scale, shift, seed)
    if condition == "both":
        text = encode_prompts(text_encoder, [""] * count, guidance=guidance, device=device)
        latents = _sample(model, count, text, image, *sampling)  # (P,N,C)
    else:
        latents = _sample(model, count, image, None, *sampling)  # (P,N,C)
    return preview_grid(latents, titles, stats, path, vae, mesh_resolution)


# ------------------------------------------------------------------------------------------- a run's previews
@dataclass
class Previews:
    """The preview grids of a `dora train-dit` run: text prompts (``render_preview``), or training renders for an
    image / both run (``render_image_preview``), sampled with the EMA weights."""

    text_encoder: Any
    prompts: list[str]
    stats: Any
    num_tokens: int
    vae: Any | None  # decode the samples to meshes when given (--vae)
    folder: Path
    sampling: SamplingConfig
    scheduler_shift: float
    condition: str = "text"
    image_encoder: Any = None  # image conditions: the run's image encoder (the trained one inside the model)
    renders: Any = None  # image conditions: (renders (P, H, W, 3), titles) of training shapes

    def render(self, model: Any, ema: Any, tag: str) -> dict[str, float] | None:
        """One grid with the EMA weights, ``folder/<tag>.png``; its metrics (None without prompts / renders)."""
        from dora_shapegen.training.ema import ema_weights

        if self.condition != "text":
            return self._render_images(model, ema, tag)
        if not self.prompts:
            return None
        s = self.sampling
        with ema_weights(model, ema):
            return render_preview(
                model,
                self.text_encoder,
                self.prompts,
                self.stats,
                self.folder / f"{tag}.png",
                self.num_tokens,
                s.num_inference_steps,
                s.guidance_scale,
                self.scheduler_shift,
                s.seed,
                self.vae,
                s.mesh_resolution,
            )

    def _render_images(self, model: Any, ema: Any, tag: str) -> dict[str, float] | None:
        """Image conditions: one shape per training render (``render_image_preview``); None when streaming."""
        from dora_shapegen.diffusion.conditioning import ImageConditionedDiT
        from dora_shapegen.training.ema import ema_weights

        if self.renders is None:  # streamed shards: no table to take renders from
            return None
        s = self.sampling
        with ema_weights(model, ema):  # the EMA of the DiT, and of the encoder when it trains
            transformer = model.transformer if isinstance(model, ImageConditionedDiT) else model
            return render_image_preview(
                transformer, self.image_encoder, self.text_encoder, self.condition, *self.renders, self.stats,
                self.folder / f"{tag}.png", self.num_tokens, s.num_inference_steps, s.guidance_scale,
                self.scheduler_shift, s.seed, self.vae, s.mesh_resolution,
            )  # fmt: skip


def build_previews(
    config: DiTTrainConfig,
    text_encoder: Any,
    stats: Any,
    schedule: TokenSchedule,
    vae_dir: str | None,
    trainer: Any,
    image_encoder: Any = None,
    renders: Any = None,
) -> Previews:
    """The run's previews: its prompts (or the first of ``num_prompts`` categories), or for an image / both run its
    training renders; decoded through the VAE of ``vae_dir`` when given."""
    scfg, vae = config.sampling, None
    if vae_dir:
        from dora_shapegen.vae.modeling_dora_vae import DoraVAE

        vae = DoraVAE.from_pretrained(vae_dir).to(trainer.device).eval()
    return Previews(
        text_encoder,
        list(scfg.prompts) or default_prompts(scfg.num_prompts),
        stats,
        scfg.num_tokens or schedule.max_tokens,
        vae,
        trainer.output_dir / "samples",
        scfg,
        sampling_shift(config),
        config.condition,
        image_encoder,
        renders,
    )


def log_preview(previews: Previews, trainer: Any, tag: str) -> None:
    """Render one preview grid (``tag``) and log its metrics at the trainer's step."""
    metrics = previews.render(trainer.unwrapped, trainer.ema, tag)
    if metrics is not None:
        trainer.accelerator.log(metrics, step=trainer.state["global_step"])

"""The denoising loop of both pipelines: noise -> timesteps -> guided Euler steps, with the pipeline's progress bar
and ``callback_on_step_end``.

The steps themselves are ``diffusion/sampling.py``'s (``initial_noise`` through ``prepare_latents``,
``sampling_timesteps``, ``guided_sample``: the one sampler, which `dora train-dit`'s previews run too); this module
holds what only a diffusers pipeline adds around them, so ``DoraTextTo3DPipeline`` and ``DoraImageTo3DPipeline``
run it once instead of each writing it out.

Conditioning comes as named streams, ``{"prompt": ...}``, ``{"image": ...}`` or both, each ``(tokens (B', L, D),
mask (B', L), pooled (B', P))`` with the unconditional half first under guidance. The text stream, when there is
one, is the DiT's primary context and the image the second stream (``condition: both``); an image-only DiT reads
the image as its primary context. A callback sees and may replace ``latents`` and, per stream ``name``,
``{name}_embeds``, ``{name}_attention_mask`` and ``pooled_{name}_embeds``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from dora_shapegen.diffusion.sampling import SamplingState, guided_sample, sampling_timesteps
from dora_shapegen.diffusion.text_encoder import TextEmbeddings

STREAMS = ("prompt", "image")


def _tensor_names(stream: str) -> tuple[str, str, str]:
    """The callback names of a stream's (tokens, mask, pooled), in diffusers' spelling (``prompt_embeds``, ...)."""
    return f"{stream}_embeds", f"{stream}_attention_mask", f"pooled_{stream}_embeds"


def _to_state(latents: torch.Tensor, streams: dict[str, TextEmbeddings]) -> SamplingState:
    """The sampler's state for these streams: text first when present, the image beside it or alone."""
    if "prompt" in streams:
        return SamplingState(latents, streams["prompt"], image=streams.get("image"))
    return SamplingState(latents, streams["image"])


def _from_state(state: SamplingState, names: tuple[str, ...]) -> dict[str, TextEmbeddings]:
    """The named streams of a state (``names`` as given to :func:`_to_state`)."""
    if "prompt" in names:
        return {"prompt": state.conditioning} | ({"image": state.image} if state.image is not None else {})
    return {"image": state.conditioning}


def _step_callback(
    pipe: DiffusionPipeline,
    callback: Callable[..., dict[str, Any]],
    tensor_inputs: list[str],
    stream_names: tuple[str, ...],
) -> Callable[[int, torch.Tensor, SamplingState], None]:
    """``callback_on_step_end`` as the sampler's ``on_step``: the named tensors in, the returned ones back into the
    state (latents and each stream's three tensors)."""

    def on_step(step: int, t: torch.Tensor, state: SamplingState) -> None:
        streams = _from_state(state, stream_names)
        available = {"latents": state.latents}
        for name, embeddings in streams.items():
            available |= dict(zip(_tensor_names(name), embeddings))
        missing = [name for name in tensor_inputs if name not in available]
        if missing:
            raise ValueError(f"callback tensor inputs {missing} do not exist for this model")
        outputs = callback(pipe, step, t, {name: available[name] for name in tensor_inputs}) or {}
        state.latents = outputs.pop("latents", state.latents)
        replaced = {
            name: TextEmbeddings(
                *(outputs.pop(key, tensor) for key, tensor in zip(_tensor_names(name), embeddings))
            )
            for name, embeddings in streams.items()
        }
        new = _to_state(state.latents, replaced)
        state.conditioning, state.image = new.conditioning, new.image

    return on_step


@torch.no_grad()
def denoise(
    pipe: DiffusionPipeline,
    streams: dict[str, TextEmbeddings],
    batch_size: int,
    num_tokens: int,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None,
    latents: torch.Tensor | None = None,
    guidance_interval: tuple[float, float] | None = None,
    callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
) -> torch.Tensor:
    """DiT-space latents (B, N, C) from ``pipe``'s DiT and scheduler, guided by ``pipe.guidance_scale`` (set by the
    call) inside ``guidance_interval``; sets ``pipe.num_timesteps``.

    ``streams`` is already on the DiT's device and dtype. ``generator`` draws the initial noise
    (``pipe.prepare_latents``, unless ``latents`` are given); a single generator also drives the scheduler's steps.
    """
    unknown = set(streams) - set(STREAMS)
    if not streams or unknown:
        raise ValueError(f"conditioning streams must be among {STREAMS}, got {sorted(streams)}")
    device = pipe._execution_device
    dtype = next(pipe.transformer.parameters()).dtype
    latents = pipe.prepare_latents(batch_size, num_tokens, dtype, device, generator, latents)  # (B*S, N, C)
    # Timesteps sigma * 1000 from 1 down; dynamic shifting keys the shift on the token count, as Flux does on the
    # image sequence length.
    timesteps = sampling_timesteps(pipe.scheduler, num_inference_steps, num_tokens, device)
    pipe._num_timesteps = len(timesteps)
    on_callback = None
    if callback_on_step_end is not None:
        on_callback = _step_callback(
            pipe, callback_on_step_end, callback_on_step_end_tensor_inputs or ["latents"], tuple(streams)
        )
    with pipe.progress_bar(total=len(timesteps)) as progress_bar:

        def on_step(step: int, t: torch.Tensor, state: SamplingState) -> None:
            if on_callback is not None:
                on_callback(step, t, state)
            progress_bar.update()

        return guided_sample(
            pipe.transformer,
            pipe.scheduler,
            _to_state(latents, streams),
            timesteps,
            pipe.guidance_scale,
            generator=generator if isinstance(generator, torch.Generator) else None,
            on_step=on_step,
            interrupted=lambda: pipe.interrupt,
            guidance_interval=guidance_interval,
        )  # (B*S, N, C)

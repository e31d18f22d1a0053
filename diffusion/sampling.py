"""The one classifier-free-guided flow-matching sampler, shared by `dora generate` and the training previews.

The pipelines' denoising loop (``pipelines/denoising.py``, which ``DoraTextTo3DPipeline`` and
``DoraImageTo3DPipeline`` both call) and ``diffusion/sampling_preview.py`` (the previews `dora train-dit` renders)
run the steps below, so a preview shows exactly what `dora generate` makes from the same model, prompts, seed, steps,
guidance and scheduler:

1. :func:`encode_prompts`: one tokenizer call for ``[negatives ; prompts]`` (the unconditional branch is ``""``,
   the prompt the DiT saw on caption dropout), each prompt's rows repeated per shape;
2. :func:`initial_noise`: ``randn_tensor`` (B, N, C) from the caller's generator;
3. :func:`sampling_timesteps`: the scheduler's timesteps, with the shift keyed on the token count when the
   scheduler uses dynamic shifting (as Flux keys it on the image sequence length);
4. :func:`guided_sample`: Euler steps of ``FlowMatchEulerDiscreteScheduler`` along the guided velocity
   ``v_u + w (v_c - v_u)`` (guidance when ``w > 1``).

:func:`sample_latents` runs 2-4 on embeddings encoded elsewhere (a prompt batch and the ``""`` encoding).
An image-conditioned DiT runs the same loop: for ``condition: image`` the image embeddings are the state's
``conditioning``; for ``condition: both`` they are its ``image`` beside the text (``diffusion/conditioning.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from dora_shapegen.diffusion.text_encoder import TextEmbeddings, TextEncoder


@dataclass
class SamplingState:
    """What one denoising step reads and writes; a step callback may replace any field."""

    latents: torch.Tensor  # (B, N, C)
    conditioning: (
        TextEmbeddings  # (B', L, D), (B', L), (B', P) with B' = 2B under guidance, unconditional first
    )
    image: TextEmbeddings | None = (
        None  # the image stream of a condition-"both" DiT, laid out as `conditioning`
    )


def uses_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance runs when ``w > 1`` (``w = 1`` is the conditional model alone)."""
    return guidance_scale > 1.0


@torch.no_grad()
def encode_prompts(
    text_encoder: TextEncoder,
    prompts: list[str],
    negative_prompt: str | list[str] | None = None,
    guidance: bool = True,
    num_per_prompt: int = 1,
    device: torch.device | str | None = None,
) -> TextEmbeddings:
    """Text conditioning ``(hidden (B', L, D), mask (B', L), pooled (B', P))``, repeated per shape.

    With guidance B' = 2 * B * S and the batch is ``[negatives ; prompts]``; the unconditional branch uses the
    negative prompt, or "". One tokenizer call for both halves, so they share a padded length.
    """
    texts = list(prompts)
    if guidance:
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        texts = negatives + texts
    hidden, mask, pooled = text_encoder.encode(texts, device=device)  # (B', L, D), (B', L), (B', P)
    # Each prompt's rows stay together: shape s of prompt p is row p*S + s.
    return TextEmbeddings(
        *(tensor.repeat_interleave(num_per_prompt, dim=0) for tensor in (hidden, mask, pooled))
    )


def initial_noise(
    batch_size: int,
    num_tokens: int,
    channels: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Pure noise at sigma = 1, (B, N, C); a list of generators must have one per row."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"got a list of {len(generator)} generators but the effective batch size is {batch_size}"
        )
    return randn_tensor((batch_size, num_tokens, channels), generator=generator, device=device, dtype=dtype)


def sampling_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int,
    num_tokens: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Set and return the scheduler's timesteps (sigma * 1000, from 1 down). A dynamic-shifting scheduler gets
    its shift ``mu`` from the token count."""
    kwargs = {}
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(
            num_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps


def in_interval(sigma: float, interval: tuple[float, float] | None) -> bool:
    return interval is None or interval[0] <= sigma <= interval[1]


def check_guidance_interval(interval: Any) -> tuple[float, float] | None:
    """None, or a (low, high) pair of noise levels with 0 <= low < high <= 1; a ValueError saying so otherwise."""
    if interval is None:
        return None
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or not (0.0 <= values[0] < values[1] <= 1.0):
        raise ValueError(f"guidance_interval must be (low, high) with 0 <= low < high <= 1, got {interval!r}")
    return values


@torch.no_grad()
def guided_sample(
    transformer: torch.nn.Module,
    scheduler: FlowMatchEulerDiscreteScheduler,
    state: SamplingState,
    timesteps: torch.Tensor,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor, SamplingState], None] | None = None,
    interrupted: Callable[[], bool] | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE over ``timesteps`` from ``state.latents`` (B, N, C); returns the latents (B, N, C).

    ``guidance_interval = (low, high)`` applies guidance only at noise levels sigma = t / 1000 within it (Kynkäänniemi
    et al. 2024, arXiv 2404.07724: guidance at high noise collapses diversity, at low noise it does little); other
    steps run the conditional branch alone. None guides every step.

    ``transformer`` follows the ShapeDiT forward signature; it runs in eval mode and its mode is restored.
    ``generator`` goes to ``scheduler.step`` (used by its stochastic variants). ``on_step(i, t, state)`` runs
    after each step and may replace the state's fields; a step is skipped while ``interrupted()`` is true.
    """
    guidance = uses_guidance(guidance_scale)
    use_pooled = bool(transformer.config.get("pooled_projection_dim"))
    use_image_pooled = bool(transformer.config.get("image_pooled_projection_dim"))
    was_training = transformer.training
    transformer.eval()
    try:
        for index, t in enumerate(timesteps):
            if interrupted is not None and interrupted():
                continue
            latents, text = state.latents, state.conditioning
            guide = guidance and in_interval(float(t) / 1000.0, guidance_interval)
            image_stream = state.image  # only a condition-"both" DiT has a second stream
            if (
                guidance and not guide
            ):  # outside the interval: the conditional half only (unconditional first)
                text = TextEmbeddings(*(tensor[latents.shape[0] :] for tensor in text))
                if image_stream is not None:
                    image_stream = TextEmbeddings(*(tensor[latents.shape[0] :] for tensor in image_stream))
            model_input = torch.cat([latents, latents]) if guide else latents  # (B', N, C)
            image = {}
            if image_stream is not None:
                image = {
                    "image_hidden_states": image_stream.hidden_states,
                    "image_attention_mask": image_stream.attention_mask,
                    "image_pooled_projections": image_stream.pooled if use_image_pooled else None,
                }
            velocity = transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]).to(latents.dtype),  # (B',)
                encoder_hidden_states=text.hidden_states,
                encoder_attention_mask=text.attention_mask,
                pooled_projections=text.pooled if use_pooled else None,
                return_dict=False,
                **image,
            )[0]  # (B', N, C)
            if guide:
                velocity_uncond, velocity_text = velocity.chunk(2)  # (B, N, C) each
                velocity = velocity_uncond + guidance_scale * (velocity_text - velocity_uncond)
            state.latents = scheduler.step(velocity, t, latents, generator=generator, return_dict=False)[
                0
            ]  # (B, N, C)
            if on_step is not None:
                on_step(index, t, state)
    finally:
        transformer.train(was_training)
    return state.latents


def merge_embeddings(first: TextEmbeddings, second: TextEmbeddings) -> TextEmbeddings:
    """Concatenate two batches along B, zero-padding the shorter token axis (padding is masked out)."""
    length = max(first.hidden_states.shape[1], second.hidden_states.shape[1])

    def pad(emb: TextEmbeddings) -> TextEmbeddings:
        extra = length - emb.hidden_states.shape[1]
        return TextEmbeddings(
            torch.nn.functional.pad(emb.hidden_states, (0, 0, 0, extra)),  # (B, L, D)
            torch.nn.functional.pad(emb.attention_mask, (0, extra)),  # (B, L)
            emb.pooled,
        )

    first, second = pad(first), pad(second)
    return TextEmbeddings(*(torch.cat(pair, dim=0) for pair in zip(first, second)))


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    scheduler: FlowMatchEulerDiscreteScheduler,
    text_embeddings: TextEmbeddings,
    uncond_embeddings: TextEmbeddings | None,
    num_tokens: int,
    num_steps: int = 25,
    guidance_scale: float = 4.0,
    generator: torch.Generator | None = None,
    in_channels: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """:func:`guided_sample` on embeddings encoded elsewhere; returns latents (B, N, C).

    ``uncond_embeddings`` is the encoding of ``""`` (batch 1 or B), merged with the prompts' (padded to one
    length); guidance is skipped when it is None or ``guidance_scale <= 1``.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else text_embeddings.hidden_states.device
    dtype = parameter.dtype if parameter is not None else torch.float32
    batch_size = text_embeddings.hidden_states.shape[0]
    conditioning = text_embeddings.to(device, dtype)
    if uncond_embeddings is None:
        guidance_scale = 1.0
    elif uses_guidance(guidance_scale):
        uncond = uncond_embeddings.to(device, dtype)
        if uncond.hidden_states.shape[0] == 1:
            uncond = TextEmbeddings(*(tensor.expand(batch_size, *tensor.shape[1:]) for tensor in uncond))
        conditioning = merge_embeddings(uncond, conditioning)  # (2B, ...): unconditional first
    latents = initial_noise(
        batch_size, num_tokens, in_channels or model.config.in_channels, dtype, device, generator
    )  # (B, N, C)
    timesteps = sampling_timesteps(scheduler, num_steps, num_tokens, device)
    return guided_sample(
        model,
        scheduler,
        SamplingState(latents, conditioning),
        timesteps,
        guidance_scale,
        guidance_interval=check_guidance_interval(guidance_interval),
    )

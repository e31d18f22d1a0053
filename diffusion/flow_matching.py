"""Rectified-flow training helpers with the conventions of diffusers' ``FlowMatchEulerDiscreteScheduler``.

Conventions (checked against the installed scheduler): sigma in [0, 1] is the noise level, the model receives
``timestep = sigma * num_train_timesteps`` (float, 1000 by default), the noisy sample is
``x_t = (1 - sigma) * x0 + sigma * noise`` (``scheduler.scale_noise``) and the model predicts the velocity
``v = noise - x0``: ``scheduler.step`` integrates ``x_next = x_t + (sigma_next - sigma) * v`` from sigma = 1 down
to 0, so a model trained here samples with an unmodified scheduler.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusion.text_encoder import TextEmbeddings

TIMESTEP_SCHEMES = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def sample_timesteps(
    batch_size: int,
    scheme: str = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training noise levels: ``(sigmas (B,), timesteps (B,) = sigmas * num_train_timesteps)``.

    ``u`` comes from diffusers' ``compute_density_for_timestep_sampling`` (SD3's logit-normal / mode / uniform);
    ``shift`` applies the scheduler's shift ``shift * u / (1 + (shift - 1) * u)`` (pass the scheduler's shift so
    training and inference see the same noise levels). Unlike the SD3 script we keep sigma continuous instead of
    rounding it to one of the scheduler's 1000 training timesteps: same distribution, no scheduler copy needed.
    """
    if scheme not in TIMESTEP_SCHEMES:
        raise ValueError(f"sample_timesteps: unknown scheme {scheme!r}; choose from {TIMESTEP_SCHEMES}")
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=generator.device if generator is not None else device,
        generator=generator,
    ).to(device)  # (B,)
    sigmas = shift * u / (1 + (shift - 1) * u)  # (B,)
    return sigmas, sigmas * num_train_timesteps


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * noise`` per sample (= ``scheduler.scale_noise`` for arbitrary sigma)."""
    sigmas = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))  # (B,1,1)
    return (1.0 - sigmas) * latents + sigmas * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity d x_t / d sigma = noise - x0, the quantity ``scheduler.step`` integrates."""
    return noise - latents


def flow_matching_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    weighting: str | torch.Tensor = "none",
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error; per-sample weights from a name (diffusers' SD3 weightings) or a (B,) tensor."""
    per_sample = ((model_pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)  # (B,)
    if isinstance(weighting, str):
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"flow_matching_loss: unknown weighting {weighting!r}; choose from {LOSS_WEIGHTINGS}"
            )
        if weighting == "none":
            return per_sample.mean()
        if sigmas is None:
            raise ValueError(f"flow_matching_loss: weighting {weighting!r} needs the sigmas of the batch")
        weighting = compute_loss_weighting_for_sd3(weighting, sigmas.float())  # (B,)
    return (weighting.to(per_sample) * per_sample).mean()


def drop_captions(
    prompts: list[str], drop_prob: float, generator: torch.Generator | None = None
) -> list[str]:
    """Per-sample caption dropout for classifier-free guidance: each prompt becomes "" with prob ``drop_prob``."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_captions: drop_prob must be in [0, 1], got {drop_prob}")
    draws = torch.rand(
        len(prompts), generator=generator, device=generator.device if generator is not None else "cpu"
    )
    return ["" if drop else prompt for prompt, drop in zip(prompts, (draws < drop_prob).tolist())]


def _merge_embeddings(first: TextEmbeddings, second: TextEmbeddings) -> TextEmbeddings:
    """Concatenate two batches along B, zero-padding the shorter token axis (padding is masked out)."""
    length = max(first.hidden_states.shape[1], second.hidden_states.shape[1])

    def pad(emb: TextEmbeddings) -> TextEmbeddings:
        extra = length - emb.hidden_states.shape[1]
        return TextEmbeddings(
            torch.nn.functional.pad(emb.hidden_states, (0, 0, 0, extra)),  # (B,L,D)
            torch.nn.functional.pad(emb.attention_mask, (0, extra)),  # (B,L)
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
    progress: bool = False,
) -> torch.Tensor:
    """Minimal classifier-free-guided Euler sampler (training-time previews); returns latents (B, N, C).

    ``uncond_embeddings`` is the encoding of ``""`` (batch 1 or B); guidance is skipped when it is None or
    ``guidance_scale == 1``. ``model`` follows the ShapeDiT forward signature.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else text_embeddings.hidden_states.device
    dtype = parameter.dtype if parameter is not None else torch.float32
    batch_size = text_embeddings.hidden_states.shape[0]
    in_channels = in_channels or model.config.in_channels
    conditioning = text_embeddings.to(device, dtype)
    use_guidance = uncond_embeddings is not None and guidance_scale != 1.0
    if use_guidance:
        uncond = uncond_embeddings.to(device, dtype)
        if uncond.hidden_states.shape[0] == 1:
            uncond = TextEmbeddings(*(tensor.expand(batch_size, *tensor.shape[1:]) for tensor in uncond))
        conditioning = _merge_embeddings(uncond, conditioning)  # (2B,...): uncond first

    latents = randn_tensor(
        (batch_size, num_tokens, in_channels), generator=generator, device=device, dtype=dtype
    )
    scheduler.set_timesteps(num_steps, device=device)
    was_training = model.training
    model.eval()
    try:
        for timestep in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
            model_in = torch.cat([latents, latents]) if use_guidance else latents  # (B',N,C)
            velocity = model(
                model_in,
                timestep.expand(model_in.shape[0]),
                conditioning.hidden_states,
                encoder_attention_mask=conditioning.attention_mask,
                pooled_projections=conditioning.pooled if model.config.get("pooled_projection_dim") else None,
                return_dict=False,
            )[0]  # (B',N,C)
            if use_guidance:
                velocity_uncond, velocity_text = velocity.chunk(2)
                velocity = velocity_uncond + guidance_scale * (velocity_text - velocity_uncond)
            latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]  # (B,N,C)
    finally:
        model.train(was_training)
    return latents

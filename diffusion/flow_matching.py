"""Rectified-flow training helpers with the conventions of diffusers' ``FlowMatchEulerDiscreteScheduler``.

Conventions (checked against the installed scheduler): sigma in [0, 1] is the noise level, the model receives
``timestep = sigma * num_train_timesteps`` (float, 1000 by default), the noisy sample is
``x_t = (1 - sigma) * x0 + sigma * noise`` (``scheduler.scale_noise``) and the model predicts the velocity
``v = noise - x0``: ``scheduler.step`` integrates ``x_next = x_t + (sigma_next - sigma) * v`` from sigma = 1 down
to 0, so a model trained here samples with an unmodified scheduler (``diffusion/sampling.py``, the one sampler of
generation and training previews).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

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

"""Flow-matching helpers: conventions shared with FlowMatchEulerDiscreteScheduler, dropout, loss, sampler."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import FrozenDict

from data.config import load_yaml
from diffusion import ShapeDiT
from diffusion.flow_matching import (
    add_noise,
    drop_captions,
    flow_matching_loss,
    sample_latents,
    sample_timesteps,
    velocity_target,
)
from diffusion.text_encoder import TextEmbeddings, TextEncoder

TINY = load_yaml("dit/tiny.yaml")


@pytest.fixture(scope="module")
def tiny_text() -> TextEncoder:
    return TextEncoder.from_name(TINY["text_encoder"])


def test_sample_timesteps_conventions():
    generator = torch.Generator().manual_seed(0)
    sigmas, timesteps = sample_timesteps(4096, "logit_normal", generator)
    assert sigmas.shape == timesteps.shape == (4096,)
    assert (sigmas > 0).all() and (sigmas < 1).all()
    torch.testing.assert_close(timesteps, sigmas * 1000)
    again, _ = sample_timesteps(4096, "logit_normal", torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, sigmas)
    # logit-normal puts more mass in the middle than uniform; a shift > 1 moves noise levels up.
    uniform, _ = sample_timesteps(4096, "uniform", torch.Generator().manual_seed(0))
    assert sigmas.std() < uniform.std() - 0.05
    shifted, _ = sample_timesteps(4096, "logit_normal", torch.Generator().manual_seed(0), shift=3.0)
    assert shifted.mean() > sigmas.mean() + 0.1
    with pytest.raises(ValueError, match="unknown scheme"):
        sample_timesteps(4, "cosine")


def test_add_noise_matches_scheduler_and_velocity_is_its_derivative():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = torch.randn(3, 10, 4)
    noise = torch.randn(3, 10, 4)
    timesteps = scheduler.timesteps[torch.tensor([0, 400, 999])]
    sigmas = timesteps / scheduler.config.num_train_timesteps
    expected = scheduler.scale_noise(latents, timesteps, noise)
    torch.testing.assert_close(add_noise(latents, noise, sigmas), expected)
    # d x_t / d sigma = noise - x0: the finite difference of add_noise equals the velocity target.
    step = 1e-3
    derivative = (add_noise(latents, noise, sigmas + step) - add_noise(latents, noise, sigmas)) / step
    torch.testing.assert_close(derivative, velocity_target(latents, noise), atol=1e-3, rtol=1e-3)


def test_flow_matching_loss_weightings():
    prediction = torch.zeros(2, 5, 3)
    target = torch.stack([torch.ones(5, 3), 2 * torch.ones(5, 3)])  # per-sample MSE 1 and 4
    assert flow_matching_loss(target, target).item() == 0.0
    torch.testing.assert_close(flow_matching_loss(prediction, target), torch.tensor(2.5))
    torch.testing.assert_close(
        flow_matching_loss(prediction, target, torch.tensor([1.0, 0.0])), torch.tensor(0.5)
    )
    sigmas = torch.tensor([0.5, 0.5])
    cosmap = flow_matching_loss(prediction, target, "cosmap", sigmas)
    torch.testing.assert_close(cosmap, torch.tensor(2.5) * 2 / (torch.pi * 0.5))
    with pytest.raises(ValueError, match="needs the sigmas"):
        flow_matching_loss(prediction, target, "cosmap")


def test_drop_captions_is_per_sample():
    prompts = [f"shape {index}" for index in range(64)]
    dropped = drop_captions(prompts, 0.5, torch.Generator().manual_seed(0))
    num_dropped = sum(prompt == "" for prompt in dropped)
    assert 0 < num_dropped < 64  # some dropped, some kept within one batch
    assert all(new in ("", old) for new, old in zip(dropped, prompts))
    assert dropped == drop_captions(prompts, 0.5, torch.Generator().manual_seed(0))
    assert drop_captions(prompts, 0.0) == prompts
    assert drop_captions(prompts, 1.0) == [""] * 64
    with pytest.raises(ValueError, match="drop_prob"):
        drop_captions(prompts, 1.5)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_text):
    torch.manual_seed(0)
    model = ShapeDiT(**TINY["model"]).train()
    prompts = drop_captions(
        ["a chair", "a table", "a lamp", "a rocket"], 0.25, torch.Generator().manual_seed(0)
    )
    text = tiny_text.encode(prompts)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 32, model.config.in_channels, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas, timesteps = sample_timesteps(4, "logit_normal", generator)
    noisy = add_noise(latents, noise, sigmas)
    target = velocity_target(latents, noise)

    def loss() -> torch.Tensor:
        prediction = model(noisy, timesteps, text.hidden_states, text.attention_mask, text.pooled).sample
        return flow_matching_loss(prediction, target)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    initial = loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * initial


class DiracOracle(torch.nn.Module):
    """The exact velocity for data = one point x0 given by the pooled text vector: v = (x_t - x0) / sigma.

    It reads sigma from the timestep it is given (sigma = t / 1000), so it is only right when the sampler feeds the
    model the scheduler's timesteps in the training convention.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.config = FrozenDict(in_channels=channels, pooled_projection_dim=channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
                pooled_projections=None, return_dict=True):  # fmt: skip
        sigma = (timestep / 1000).view(-1, 1, 1)  # (B,1,1)
        target = pooled_projections[:, None, :]  # (B,1,C) the data point
        return ((hidden_states - target) / sigma,)


def embeddings_for(points: torch.Tensor, length: int) -> TextEmbeddings:
    batch_size = points.shape[0]
    return TextEmbeddings(
        torch.zeros(batch_size, length, 8), torch.ones(batch_size, length, dtype=torch.long), points
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampler_with_oracle_velocity_recovers_the_data_point(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    x0 = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.7, 1.0]])  # (B,C)
    null = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # the "unconditional" data point (batch 1, broadcast)
    common = dict(num_tokens=6, num_steps=8, generator=torch.Generator().manual_seed(0))
    conditional = sample_latents(DiracOracle(4), scheduler, embeddings_for(x0, 3), None, **common)
    torch.testing.assert_close(conditional, x0[:, None].expand(2, 6, 4), atol=1e-4, rtol=1e-4)
    # CFG: v_u + g (v_c - v_u) is the velocity towards null + g (x0 - null); the text lengths differ (3 vs 1).
    guided = sample_latents(
        DiracOracle(4),
        scheduler,
        embeddings_for(x0, 3),
        embeddings_for(null, 1),
        guidance_scale=3.0,
        **common,
    )
    expected = null + 3.0 * (x0 - null)
    torch.testing.assert_close(guided, expected[:, None].expand(2, 6, 4), atol=1e-4, rtol=1e-4)


def test_sampler_runs_the_shape_dit_with_guidance(tiny_text):
    torch.manual_seed(0)
    model = ShapeDiT(**TINY["model"])
    with torch.no_grad():
        model.proj_out.weight.normal_(
            0, 0.5
        )  # leave the zero init so that the prediction depends on the text
        for block in model.blocks:
            block.cross_attn.to_out.weight.normal_(0, 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler()
    text = tiny_text.encode(["a chair", "a wooden table with four legs"])
    uncond = tiny_text.encode([""])
    common = dict(num_tokens=16, num_steps=4)
    plain = sample_latents(
        model,
        scheduler,
        text,
        uncond,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    no_uncond = sample_latents(
        model, scheduler, text, None, generator=torch.Generator().manual_seed(0), **common
    )
    guided = sample_latents(
        model,
        scheduler,
        text,
        uncond,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    assert guided.shape == (2, 16, model.config.in_channels) and torch.isfinite(guided).all()
    torch.testing.assert_close(plain, no_uncond)
    assert (guided - plain).abs().max() > 1e-3
    assert model.training  # the sampler restores the mode it found

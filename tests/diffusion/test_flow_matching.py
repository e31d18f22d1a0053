"""Flow-matching helpers: conventions shared with FlowMatchEulerDiscreteScheduler, dropout, loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dora_shapegen.config import load_yaml
from dora_shapegen.diffusion import ShapeDiT
from dora_shapegen.diffusion.flow_matching import (
    add_noise,
    drop_captions,
    flow_matching_loss,
    sample_timesteps,
    velocity_target,
)
from dora_shapegen.diffusion.text_encoder import TextEncoder

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

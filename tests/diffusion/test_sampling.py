"""The one guided sampler (diffusion/sampling.py): scheduler conventions and guidance. That the pipeline and the
training previews give the same latents through it is tested in tests/pipelines/test_pipeline.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import FrozenDict

from dora_shapegen.config import load_yaml
from dora_shapegen.diffusion import ShapeDiT
from dora_shapegen.diffusion.sampling import sample_latents
from dora_shapegen.diffusion.text_encoder import TextEmbeddings, TextEncoder

TINY = load_yaml("dit/tiny.yaml")


@pytest.fixture(scope="module")
def tiny_text() -> TextEncoder:
    return TextEncoder.from_name(TINY["text_encoder"])


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


def test_guidance_interval_guides_only_inside_it():
    """Outside the interval a step is the conditional branch alone: a full interval equals plain guidance, an
    interval that holds no step equals no guidance, a partial one lands in between; a bad interval is refused."""
    from dora_shapegen.diffusion.sampling import check_guidance_interval

    scheduler = FlowMatchEulerDiscreteScheduler()
    x0 = torch.tensor([[0.5, -1.0, 2.0, 0.0]])  # (B,C)
    null = torch.tensor([[0.1, 0.2, 0.3, 0.4]])

    def run(interval):
        return sample_latents(
            DiracOracle(4), scheduler, embeddings_for(x0, 3), embeddings_for(null, 1), num_tokens=2,
            num_steps=8, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), guidance_interval=interval,
        )[0, 0]  # fmt: skip

    guided = run(None)
    torch.testing.assert_close(guided, null[0] + 3.0 * (x0[0] - null[0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run((0.0, 1.0)), guided)
    # The oracle's last Euler step (sigma 0.125 -> 0) lands exactly on the target of the branch it runs: guided when
    # the interval holds sigma 0.125, the conditional data point when it does not.
    torch.testing.assert_close(run((0.0, 0.2)), guided, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run((0.3, 0.8)), x0[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run((0.0, 1e-6)), x0[0], atol=1e-4, rtol=1e-4)
    for bad in ((0.8, 0.3), (0.0, 1.5), (0.1,)):
        with pytest.raises(ValueError, match="guidance_interval"):
            check_guidance_interval(bad)

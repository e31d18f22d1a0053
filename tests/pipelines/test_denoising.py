"""The pipelines' one denoising loop (pipelines/denoising.py): both pipelines give exactly what the guided sampler of
diffusion/sampling.py gives on their conditioning, a callback that returns what it got changes nothing, and the
image pipelines' latents equal those recorded before the loop was shared (tests/pipelines/golden/
image_to_3d_latents.npz, written by the code of commit be8984b; the text pipeline's are pinned by
test_text_to_3d_unchanged.py). Tolerance as there: 1e-5 admits last-bit differences between CPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dora_shapegen.diffusion.sampling import (
    SamplingState,
    encode_prompts,
    guided_sample,
    initial_noise,
    sampling_timesteps,
)
from dora_shapegen.diffusion.text_encoder import TextEmbeddings
from tests.pipelines._tiny_pipeline import (
    LATENT_CHANNELS,
    NUM_TOKENS,
    make_tiny_image_pipeline,
    make_tiny_pipeline,
    photo,
)

GOLDEN = Path(__file__).parent / "golden" / "image_to_3d_latents.npz"
STEPS, GUIDANCE, INTERVAL, SEED = 3, 4.0, (0.1, 0.6), 5


def seeded(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {
        "text": make_tiny_pipeline(0),
        "image": make_tiny_image_pipeline("image"),
        "both": make_tiny_image_pipeline("both"),
    }


def inputs(condition: str) -> dict:
    """One call's conditioning: two prompts, two images, or an image with a prompt."""
    return {
        "text": {"prompt": ["a chair", "a round table"]},
        "image": {"image": [photo(0), photo(1)]},
        "both": {"image": photo(1), "prompt": "a tall chair"},
    }[condition]


@pytest.mark.parametrize("condition", ["text", "image", "both"])
def test_each_pipeline_runs_the_one_sampler(pipes, condition):
    """Seeded noise, the scheduler's timesteps and guided_sample on the pipeline's own encodings: bit-identical."""
    pipe, given = pipes[condition], inputs(condition)
    generated = pipe(
        **given, num_inference_steps=STEPS, guidance_scale=GUIDANCE, guidance_interval=INTERVAL,
        num_shapes_per_prompt=2, generator=seeded(), output_type="latent",
    ).latents  # fmt: skip
    dtype = next(pipe.transformer.parameters()).dtype
    # The conditioning as each pipeline encodes it: unconditional half first, each row repeated per shape.
    if condition == "text":
        primary, image = TextEmbeddings(*pipe.encode_prompt(given["prompt"], None, True, 2)), None
    else:
        images = given["image"] if isinstance(given["image"], list) else [given["image"]]
        primary = image = pipe.encode_image(images, len(images), True, 2)
        if condition == "both":
            primary = encode_prompts(pipe.text_encoder_wrapper(), [given["prompt"]], None, True, 2, "cpu")
        image = None if condition == "image" else image.to("cpu", dtype)
    generator = seeded()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    batch = primary.hidden_states.shape[0] // 2
    noise = initial_noise(batch, NUM_TOKENS, LATENT_CHANNELS, dtype, "cpu", generator)  # (B*S, N, C)
    timesteps = sampling_timesteps(scheduler, STEPS, NUM_TOKENS, "cpu")
    state = SamplingState(noise, primary.to("cpu", dtype), image=image)
    sampled = guided_sample(
        pipe.transformer, scheduler, state, timesteps, GUIDANCE, generator=generator,
        guidance_interval=INTERVAL,
    )  # fmt: skip
    assert generated.shape == (batch, NUM_TOKENS, LATENT_CHANNELS)
    assert torch.equal(pipe.unnormalize_latents(sampled.float()), generated)


@pytest.mark.parametrize("condition", ["text", "image", "both"])
def test_a_callback_sees_every_stream_and_returning_it_changes_nothing(pipes, condition):
    pipe, given = pipes[condition], inputs(condition)
    names = {
        "text": ["prompt"],
        "image": ["image"],
        "both": ["prompt", "image"],
    }[condition]
    tensors = ["latents"] + [
        name for stream in names for name in (f"{stream}_embeds", f"{stream}_attention_mask")
    ]
    tensors += [f"pooled_{stream}_embeds" for stream in names]
    seen = []

    def same(pipeline, step, timestep, kwargs):
        seen.append(sorted(kwargs))
        return dict(kwargs)

    def run(**callback) -> torch.Tensor:
        return pipe(
            **given, num_inference_steps=2, generator=seeded(), output_type="latent", **callback
        ).latents

    with_callback = run(callback_on_step_end=same, callback_on_step_end_tensor_inputs=tensors)
    assert seen == [sorted(tensors)] * 2
    assert torch.equal(with_callback, run())


def test_image_pipelines_latents_match_the_recorded_ones(pipes):
    recorded = np.load(GOLDEN)  # (4, 32, 8), (1, 32, 8), (1, 32, 8)
    image = pipes["image"](
        [photo(0), photo(1)], num_inference_steps=3, num_shapes_per_prompt=2, guidance_interval=(0.1, 0.6),
        generator=seeded(5), output_type="latent",
    ).latents  # fmt: skip
    both = pipes["both"](
        photo(1), prompt="a tall chair", negative_prompt="a box", num_inference_steps=3,
        guidance_interval=(0.0, 0.5), generator=seeded(4), output_type="latent",
    ).latents  # fmt: skip
    prompt_only = pipes["both"](
        prompt="a tall chair", num_inference_steps=3, generator=seeded(0), output_type="latent"
    ).latents
    np.testing.assert_allclose(image.numpy(), recorded["image_batch"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(both.numpy(), recorded["both"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(prompt_only.numpy(), recorded["both_prompt_only"], rtol=0, atol=1e-5)

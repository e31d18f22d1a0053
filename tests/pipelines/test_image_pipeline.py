"""DoraImageTo3DPipeline with tiny random real components: image and image + text conditioning, CFG against "no
image", seeds, save/load, batches, callbacks, and clear errors for bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from dora_shapegen.data.condition_image import ImageInputError
from dora_shapegen.pipelines import DoraImageTo3DPipeline, DoraTextTo3DPipeline, load_pipeline
from tests.pipelines._tiny_pipeline import (
    LATENT_CHANNELS,
    NUM_TOKENS,
    center_surface_on,
    make_tiny_image_pipeline,
    make_tiny_pipeline,
    photo,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> DoraImageTo3DPipeline:
    return make_tiny_image_pipeline("image")


@pytest.fixture(scope="module")
def both() -> DoraImageTo3DPipeline:
    return make_tiny_image_pipeline("both")


def latents_of(pipe, *args, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": 2, "output_type": "latent", **kwargs}
    return pipe(*args, generator=seeded(seed), **kwargs).latents


def test_an_image_gives_a_mesh_and_the_pipeline_round_trips(tmp_path):
    pipe = make_tiny_image_pipeline("image")
    center_surface_on(pipe, photo(0), num_inference_steps=2, generator=seeded(0))
    out = pipe(photo(0), num_inference_steps=2, generator=seeded(0), mesh_resolution=24)
    assert (
        len(out.meshes) == 1 and isinstance(out.meshes[0], trimesh.Trimesh) and len(out.meshes[0].faces) > 0
    )
    assert out.latents.shape == (1, NUM_TOKENS, LATENT_CHANNELS)

    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe", "cpu")
    assert isinstance(loaded, DoraImageTo3DPipeline) and loaded.config.condition == "image"
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(latents_of(loaded, photo(0)), latents_of(pipe, photo(0)), rtol=0, atol=0)


def test_the_image_steers_the_shape_and_seeds_reproduce(pipe, tmp_path):
    first, again = latents_of(pipe, photo(0)), latents_of(pipe, photo(0))
    assert torch.equal(first, again)
    assert not torch.allclose(first, latents_of(pipe, photo(1)))  # another image, another shape
    assert not torch.allclose(first, latents_of(pipe, photo(0), seed=1))
    Image.fromarray(photo(0)).save(tmp_path / "photo.png")
    for same in (tmp_path / "photo.png", str(tmp_path / "photo.png"), Image.fromarray(photo(0))):
        assert torch.equal(latents_of(pipe, same), first)


def test_guidance_contrasts_with_no_image(pipe):
    plain = latents_of(pipe, photo(0), guidance_scale=1.0)
    guided = latents_of(pipe, photo(0), guidance_scale=4.0)
    assert not torch.allclose(plain, guided)
    # The unconditional branch is "no image": an empty, fully masked sequence, first in the guided batch.
    empty = pipe.encode_image(None, 2, do_classifier_free_guidance=False)
    assert not empty.attention_mask.any() and not empty.hidden_states.any()
    pair = pipe.encode_image([photo(0)], 1, do_classifier_free_guidance=True)
    assert not pair.attention_mask[0].any() and pair.attention_mask[1].all()  # [no image ; image]


def test_stored_guidance_is_the_call_default_and_survives_save(tmp_path):
    stored = make_tiny_image_pipeline("image", default_guidance_scale=2.0)
    stored.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe", "cpu")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, DoraImageTo3DPipeline) and loaded.default_guidance_scale == 2.0
    by_default = latents_of(loaded, photo(0))
    assert loaded.guidance_scale == 2.0
    assert torch.equal(by_default, latents_of(loaded, photo(0), guidance_scale=2.0))
    assert not torch.allclose(by_default, latents_of(loaded, photo(0), guidance_scale=5.0))
    with pytest.raises(ValueError, match=r"`default_guidance_scale` must be a number in \[0, 100\], got 200"):
        DoraImageTo3DPipeline(**loaded.components, default_guidance_scale=200)


def test_an_image_pipeline_without_stored_guidance_samples_at_5(pipe):
    latents_of(pipe, photo(0))
    assert pipe.default_guidance_scale == 5.0 and pipe.guidance_scale == 5.0


def test_batches_of_images_with_several_shapes_each(pipe):
    out = pipe(
        [photo(0), photo(1)], num_shapes_per_prompt=2, num_inference_steps=2, generator=seeded(3),
        output_type="np", mesh_resolution=16,
    )  # fmt: skip
    assert out.latents.shape == (4, NUM_TOKENS, LATENT_CHANNELS) and len(out.meshes) == 4
    generators = [seeded(10), seeded(11)]
    pair = pipe(
        [photo(0), photo(1)], num_inference_steps=2, generator=generators, output_type="latent"
    ).latents
    alone = pipe(photo(1), num_inference_steps=2, generator=seeded(11), output_type="latent").latents
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=1e-5)  # batching does not change a shape


def test_callback_sees_and_may_replace_the_image_embeddings(pipe):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append(kwargs["image_embeds"].shape)
        return {"latents": kwargs["latents"]}

    pipe(
        photo(0), num_inference_steps=2, generator=seeded(0), output_type="latent",
        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "image_embeds"],
    )  # fmt: skip
    assert len(seen) == 2 and seen[0][0] == 2  # [no image ; image] under guidance
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(
            photo(0), num_inference_steps=1, output_type="latent", callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )  # fmt: skip


def test_both_reads_an_image_a_prompt_or_the_two(both):
    image_only = latents_of(both, photo(0))
    prompt_only = latents_of(both, prompt="a tall chair")
    together = latents_of(both, photo(0), prompt="a tall chair")
    assert not torch.allclose(image_only, together) and not torch.allclose(prompt_only, together)
    assert torch.equal(latents_of(both, photo(0), prompt=""), image_only)  # a missing prompt is ""
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        both([photo(0), photo(1)], prompt=["a chair"], num_inference_steps=1, output_type="latent")


def test_wrong_use_and_bad_images_are_named(pipe, tmp_path):
    with pytest.raises(ValueError, match="trained on images only"):
        pipe(photo(0), prompt="a chair", num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="`image` is required"):
        pipe(num_inference_steps=1, output_type="latent")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageInputError, match="broken.png.*unreadable"):
        pipe([photo(0), tmp_path / "broken.png"], num_inference_steps=1, output_type="latent")
    with pytest.raises(ImageInputError, match="thumbnail: 16x16 px is too small"):
        pipe(photo(0, size=16), num_inference_steps=1, output_type="latent", image_names=["thumbnail"])
    with pytest.raises(ImageInputError, match="mode 'CMYK' is not supported"):
        pipe(Image.new("CMYK", (64, 64)), num_inference_steps=1, output_type="latent")
    with pytest.raises(ImageInputError, match="alpha channel hides the whole image"):
        pipe(np.zeros((64, 64, 4), np.uint8), num_inference_steps=1, output_type="latent")


def test_load_pipeline_opens_text_pipelines_as_before(tmp_path):
    make_tiny_pipeline().save_pretrained(tmp_path / "text")
    assert type(load_pipeline(tmp_path / "text", "cpu")) is DoraTextTo3DPipeline
    with pytest.raises(ValueError, match="not a saved pipeline"):
        load_pipeline(tmp_path, "cpu")

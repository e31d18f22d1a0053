"""DoraTextTo3DPipeline with tiny random real components: flow, outputs, save/load, determinism, input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh

from dora_shapegen.pipelines import DoraTextTo3DPipeline, DoraTextTo3DPipelineOutput
from dora_shapegen.pipelines.limits import DEFAULT_GUIDANCE_SCALE
from tests.pipelines._tiny_pipeline import (
    LATENT_CHANNELS,
    MAX_TRAIN_TOKENS,
    NUM_TOKENS,
    center_surface_on,
    make_tiny_pipeline,
)

PROMPT = "a round table with one central leg"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> DoraTextTo3DPipeline:
    return make_tiny_pipeline()


def test_two_steps_give_a_surface_mesh():
    pipe = make_tiny_pipeline()
    center_surface_on(pipe, PROMPT, num_inference_steps=2, generator=seeded(0))
    out = pipe(PROMPT, num_inference_steps=2, generator=seeded(0), mesh_resolution=32)
    assert isinstance(out, DoraTextTo3DPipelineOutput)
    assert len(out.meshes) == 1 and isinstance(out.meshes[0], trimesh.Trimesh)
    mesh = out.meshes[0]
    assert len(mesh.faces) > 0
    assert np.abs(mesh.vertices).max() <= 1.05 + 1e-6
    # The vertices lie on the iso-surface of the VAE field of the returned latents (marching cubes interpolates
    # linearly along a grid edge, so allow for the field's curvature within one 32^3 cell).
    values = pipe.vae.decode(out.latents)(torch.as_tensor(mesh.vertices, dtype=torch.float32))[0]
    assert (values - 0.5).abs().median() < 0.02
    assert (values - 0.5).abs().max() < 0.1


def test_batch_of_prompts_with_several_shapes_and_np_output(pipe):
    out = pipe(
        ["a chair", "a table"], num_shapes_per_prompt=2, num_inference_steps=2, generator=seeded(1),
        output_type="np", mesh_resolution=16,
    )  # fmt: skip
    assert isinstance(out.latents, np.ndarray) and out.latents.shape == (4, NUM_TOKENS, LATENT_CHANNELS)
    assert len(out.meshes) == 4
    for vertices, faces in out.meshes:
        assert vertices.dtype == np.float32 and vertices.ndim == 2 and vertices.shape[1] == 3
        assert faces.dtype == np.int64 and faces.ndim == 2 and faces.shape[1] == 3
    # Every shape starts from its own noise.
    flat = out.latents.reshape(4, -1)
    assert all(not np.allclose(flat[i], flat[j]) for i in range(4) for j in range(i + 1, 4))


def test_latent_output_shape_and_unnormalisation(pipe):
    final = {}

    def keep_last(pipeline, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].clone()
        return {}

    out = pipe(
        PROMPT,
        num_inference_steps=2,
        generator=seeded(0),
        output_type="latent",
        callback_on_step_end=keep_last,
    )
    assert out.meshes is None
    assert isinstance(out.latents, torch.Tensor) and out.latents.shape == (1, NUM_TOKENS, LATENT_CHANNELS)
    mean = torch.tensor(pipe.config.latent_mean)
    std = torch.tensor(pipe.config.latent_std)
    torch.testing.assert_close(out.latents, final["latents"] * std + mean)

    fewer = pipe(PROMPT, num_inference_steps=2, num_tokens=16, generator=seeded(0), output_type="latent")
    assert fewer.latents.shape == (1, 16, LATENT_CHANNELS)


def test_callback_runs_every_step_and_can_replace_latents(pipe):
    steps = []

    def zero_at_last_step(pipeline, step, timestep, callback_kwargs):
        steps.append((step, float(timestep)))
        if step == pipeline.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    out = pipe(PROMPT, num_inference_steps=3, generator=seeded(0), output_type="latent",
               callback_on_step_end=zero_at_last_step)  # fmt: skip
    assert [step for step, _ in steps] == [0, 1, 2]
    timesteps = [timestep for _, timestep in steps]
    assert timesteps[0] == pytest.approx(1000.0) and timesteps == sorted(timesteps, reverse=True)
    # Zero DiT-space latents un-normalise to the per-channel mean.
    expected = torch.tensor(pipe.config.latent_mean).expand(1, NUM_TOKENS, LATENT_CHANNELS)
    torch.testing.assert_close(out.latents, expected)


def test_encode_prompt_puts_unconditional_first(pipe):
    hidden, mask, pooled = pipe.encode_prompt(["a chair", "a lamp"], do_classifier_free_guidance=True,
                                              num_shapes_per_prompt=3)  # fmt: skip
    assert hidden.shape[0] == mask.shape[0] == pooled.shape[0] == 2 * 2 * 3
    empty_hidden, _, empty_pooled = pipe.text_encoder_wrapper().encode([""])
    torch.testing.assert_close(pooled[:6], empty_pooled.expand(6, -1))
    torch.testing.assert_close(hidden[0, : empty_hidden.shape[1]], empty_hidden[0])
    assert not torch.allclose(pooled[6], pooled[9])  # "a chair" vs "a lamp"
    negative, _, negative_pooled = pipe.encode_prompt(
        "a chair", negative_prompt="ugly", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(negative_pooled[0], pipe.text_encoder_wrapper().encode(["ugly"]).pooled[0])
    conditional_only = pipe.encode_prompt("a chair", do_classifier_free_guidance=False)
    assert conditional_only[0].shape[0] == 1


def test_same_seed_same_result_and_each_input_matters(pipe):
    def run(prompt=PROMPT, **overrides):
        kwargs = dict(num_inference_steps=2, guidance_scale=4.0, generator=seeded(7), output_type="latent")
        kwargs.update(overrides)
        return pipe(prompt, **kwargs).latents

    reference = run()
    assert torch.equal(run(), reference)
    assert not torch.allclose(run(generator=seeded(8)), reference)
    assert not torch.allclose(run(prompt="a tall vase"), reference)
    assert not torch.allclose(run(guidance_scale=1.0), reference)
    assert not torch.allclose(run(negative_prompt="a chair"), reference)
    assert not torch.allclose(run(num_inference_steps=3), reference)
    # Given initial noise reproduces the seeded run.
    noise = torch.randn(1, NUM_TOKENS, LATENT_CHANNELS, generator=seeded(7))
    assert torch.equal(run(generator=None, latents=noise), reference)


def test_save_load_round_trip(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DoraTextTo3DPipeline"
    for component in ("vae", "transformer", "scheduler", "text_encoder", "tokenizer"):
        assert (tmp_path / "pipe" / component).is_dir(), component
    assert index["latent_mean"] == pytest.approx(pipe.config.latent_mean)
    assert index["text_encoder_kind"] == "bert"

    loaded = DoraTextTo3DPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is type(pipe.vae) and type(loaded.transformer) is type(pipe.transformer)
    for key in ("latent_mean", "latent_std", "text_encoder_kind", "text_max_length", "max_tokens"):
        assert loaded.config[key] == pipe.config[key], key
    before = pipe(PROMPT, num_inference_steps=2, generator=seeded(3), output_type="latent").latents
    after = loaded(PROMPT, num_inference_steps=2, generator=seeded(3), output_type="latent").latents
    assert torch.equal(before, after)


def test_a_pipeline_saved_before_the_namespace_still_loads(tmp_path):
    """Folders written before the dora_shapegen namespace name the checkout's top-level modules in model_index.json."""
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["vae"][0], index["transformer"][0] = "vae.modeling_dora_vae", "diffusion.modeling_shape_dit"
    index_path.write_text(json.dumps(index))
    loaded = DoraTextTo3DPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.vae) is type(pipe.vae) and type(loaded.transformer) is type(pipe.transformer)
    before = pipe(PROMPT, num_inference_steps=2, generator=seeded(3), output_type="latent").latents
    after = loaded(PROMPT, num_inference_steps=2, generator=seeded(3), output_type="latent").latents
    assert torch.equal(before, after)
    loaded.save_pretrained(tmp_path / "again")  # written back under today's names
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["vae"][0].startswith(
        "dora_shapegen."
    )


def test_to_moves_every_component_dtype():
    pipe = make_tiny_pipeline().to("cpu", torch.float64)
    assert pipe.vae.dtype == pipe.transformer.dtype == pipe.text_encoder.dtype == torch.float64
    out = pipe(PROMPT, num_inference_steps=1, generator=seeded(0), output_type="latent")
    assert torch.isfinite(out.latents).all()


def test_token_limit_comes_from_vae_or_pipeline_config(pipe):
    assert pipe.token_limit == MAX_TRAIN_TOKENS
    assert pipe.default_num_tokens == NUM_TOKENS
    capped = make_tiny_pipeline()
    capped.register_to_config(max_tokens=16, default_num_tokens=8)
    assert capped.token_limit == 16 and capped.default_num_tokens == 8
    with pytest.raises(ValueError, match=r"num_tokens`=17 .*at most 16"):
        capped(PROMPT, num_tokens=17, num_inference_steps=1, output_type="latent")


def test_stored_guidance_is_the_call_default_survives_save_and_an_argument_overrides_it(tmp_path):
    pipe = make_tiny_pipeline(default_guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["default_guidance_scale"] == 2.0
    loaded = DoraTextTo3DPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.default_guidance_scale == 2.0

    def latents(**guidance):
        return loaded(
            PROMPT, num_inference_steps=2, generator=seeded(4), output_type="latent", **guidance
        ).latents

    by_default = latents()
    assert loaded.guidance_scale == 2.0
    assert torch.equal(by_default, latents(guidance_scale=2.0))
    assert not torch.allclose(by_default, latents(guidance_scale=5.0))  # not the former fixed default
    assert loaded.guidance_scale == 5.0
    latents(guidance_scale=0.0)  # 0 is a value (no guidance), not "unset"
    assert loaded.guidance_scale == 0.0
    loaded.register_to_config(default_guidance_scale=0.0)
    assert loaded.default_guidance_scale == 0.0


def test_a_folder_without_stored_guidance_loads_and_samples_at_5(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    del index["default_guidance_scale"]  # as written before pipelines stored their guidance
    index_path.write_text(json.dumps(index))
    loaded = DoraTextTo3DPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.default_guidance_scale == DEFAULT_GUIDANCE_SCALE == 5.0
    by_default = loaded(PROMPT, num_inference_steps=2, generator=seeded(4), output_type="latent").latents
    assert loaded.guidance_scale == 5.0
    explicit = loaded(
        PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=seeded(4), output_type="latent"
    ).latents
    assert torch.equal(by_default, explicit)


@pytest.mark.parametrize("bad", [-1.0, 101.0, float("nan"), "2"])
def test_a_stored_guidance_out_of_range_is_refused(pipe, bad):
    with pytest.raises(ValueError, match=r"`default_guidance_scale` must be a number in \[0, 100\], got"):
        DoraTextTo3DPipeline(**pipe.components, default_guidance_scale=bad)


BAD_INPUTS = [
    (dict(prompt=123), r"`prompt` must be a string or a list of strings, got int"),
    (dict(prompt=[]), r"`prompt` is an empty list"),
    (dict(prompt=["a chair", 3]), r"`prompt` items must be strings; item 1 is a int"),
    (dict(prompt=None), r"`prompt` must be a string or a list of strings, got NoneType"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), r"`negative_prompt` has 1 items but `prompt` has 2"),
    (dict(negative_prompt=5), r"`negative_prompt` must be a string or a list of strings"),
    (dict(num_tokens=0), r"`num_tokens` must be a positive integer, got 0"),
    (dict(num_tokens=-4), r"`num_tokens` must be a positive integer, got -4"),
    (dict(num_tokens=MAX_TRAIN_TOKENS + 1), rf"`num_tokens`={MAX_TRAIN_TOKENS + 1} is beyond .*at most {MAX_TRAIN_TOKENS}"),
    (dict(num_inference_steps=0), r"`num_inference_steps` must be an integer in \[1, 1000\], got 0"),
    (dict(num_inference_steps=-1), r"`num_inference_steps` must be an integer in \[1, 1000\], got -1"),
    (dict(num_inference_steps=5000), r"`num_inference_steps` must be an integer in \[1, 1000\], got 5000"),
    (dict(mesh_resolution=0), r"`mesh_resolution` must be an integer in \[16, 1024\], got 0"),
    (dict(mesh_resolution=3), r"`mesh_resolution` must be an integer in \[16, 1024\], got 3"),
    (dict(mesh_resolution=32.5), r"`mesh_resolution` must be an integer in \[16, 1024\], got 32.5"),
    (dict(mesh_resolution="64"), r"`mesh_resolution` must be an integer in \[16, 1024\], got '64'"),
    (dict(guidance_scale=float("nan")), r"`guidance_scale` must be a number in \[0, 100\], got nan"),
    (dict(guidance_scale=float("inf")), r"`guidance_scale` must be a number in \[0, 100\], got inf"),
    (dict(guidance_scale=-3.0), r"`guidance_scale` must be a number in \[0, 100\], got -3.0"),
    (dict(guidance_scale="5"), r"`guidance_scale` must be a number in \[0, 100\], got '5'"),
    (dict(mesh_threshold=0.0), r"`mesh_threshold` must be a number in \(0, 1\), got 0.0"),
    (dict(mesh_threshold=float("nan")), r"`mesh_threshold` must be a number in \(0, 1\), got nan"),
    (dict(max_faces=0), r"`max_faces` must be an integer in \[4, 2147483647\], got 0"),
    (dict(prompt="a \udcff chair"), r"`prompt` item 0: it is not valid UTF-8 text \(byte 0xff at character 2\)"),
    (dict(prompt=["a chair", "\ud800"]), r"`prompt` item 1: .*lone surrogate U\+D800"),
    (dict(num_shapes_per_prompt=0), r"`num_shapes_per_prompt` must be a positive integer"),
    (dict(output_type="mesh"), r"`output_type` must be one of"),
    (dict(latents=torch.zeros(1, NUM_TOKENS + 1, LATENT_CHANNELS)), rf"`latents` must have shape .*\(1, {NUM_TOKENS}, {LATENT_CHANNELS}\), got \(1, {NUM_TOKENS + 1}, {LATENT_CHANNELS}\)"),
    (dict(num_shapes_per_prompt=2, latents=torch.zeros(1, NUM_TOKENS, LATENT_CHANNELS)), r"`latents` must have shape .*\(2, "),
    (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), r"`callback_on_step_end_tensor_inputs` has to be in"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_check_inputs_rejects(pipe, monkeypatch, overrides, message):
    kwargs = dict(prompt=PROMPT, num_inference_steps=1, output_type="latent", mesh_resolution=32)
    kwargs.update(overrides)

    def fail(*args, **kwargs):  # nothing may run before the inputs are checked
        raise AssertionError("the text encoder ran before check_inputs rejected the call")

    monkeypatch.setattr(pipe, "encode_prompt", fail)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_dynamic_shifting_scheduler_gets_mu_from_the_token_count():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = make_tiny_pipeline()
    timesteps = {}

    def record(name):
        def callback(pipeline, step, timestep, callback_kwargs):
            timesteps.setdefault(name, []).append(float(timestep))
            return {}

        return callback

    pipe(PROMPT, num_inference_steps=3, output_type="latent", callback_on_step_end=record("fixed"))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)  # needs `mu` in set_timesteps
    pipe(PROMPT, num_inference_steps=3, output_type="latent", callback_on_step_end=record("dynamic"))
    assert len(timesteps["dynamic"]) == 3 and timesteps["dynamic"] != pytest.approx(timesteps["fixed"])


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_training_preview_samples_exactly_what_the_pipeline_generates(guidance):
    """`dora train-dit` previews (diffusion.sampling_preview) and `dora generate` (the pipeline) run one sampler:
    the same DiT, prompts, seed, steps, guidance and scheduler shift give bit-identical latents."""
    from dora_shapegen.diffusion.sampling_preview import sample_preview_latents

    pipe = make_tiny_pipeline()
    prompts = ["a chair", PROMPT]
    shift = pipe.scheduler.config.shift  # 3.0: the shift training saves beside the DiT, which previews use
    generated = pipe(
        prompts,
        num_inference_steps=3,
        guidance_scale=guidance,
        num_tokens=16,
        generator=seeded(7),
        output_type="latent",
    ).latents  # (2, 16, C) VAE space
    preview = sample_preview_latents(
        pipe.transformer,
        pipe.text_encoder_wrapper(),
        prompts,
        num_tokens=16,
        num_inference_steps=3,
        guidance_scale=guidance,
        shift=shift,
        seed=7,
    )  # (2, 16, C)
    assert preview.shape == generated.shape
    assert torch.equal(pipe.unnormalize_latents(preview.float()), generated)


def test_default_output_is_reduced_to_the_face_budget(pipe):
    """The pipeline's meshes carry at most DEFAULT_MAX_FACES faces unless ``max_faces=None``."""
    from dora_shapegen.pipelines.limits import DEFAULT_MAX_FACES

    pipe = make_tiny_pipeline()
    center_surface_on(pipe, PROMPT, num_inference_steps=2, generator=seeded(0))
    kwargs = dict(num_inference_steps=2, mesh_resolution=64, remove_floaters=False)
    budget = pipe(PROMPT, generator=seeded(0), **kwargs).meshes[0]
    full = pipe(PROMPT, generator=seeded(0), max_faces=None, **kwargs).meshes[0]
    assert len(full.faces) > DEFAULT_MAX_FACES >= len(budget.faces)
    assert budget.metadata["extracted_faces"] == len(full.faces)
    small = pipe(PROMPT, generator=seeded(0), max_faces=500, **kwargs).meshes[0]
    assert 0 < len(small.faces) <= 500


def test_empty_and_over_long_prompts_are_reported(pipe, caplog):
    """What the README says: an empty prompt (alone or in a list) is generated unconditionally, a prompt beyond
    the text encoder's token limit is cut there; both with a warning naming the prompt."""
    long_prompt = "a chair with " + "very " * 3000 + "long legs"  # ~15,000 characters
    with caplog.at_level("WARNING", logger="dora_shapegen.pipelines.pipeline_text_to_3d"):
        out = pipe(["a chair", "", long_prompt], num_inference_steps=1, output_type="latent")
    assert out.latents.shape[0] == 3
    assert "prompt 1 is empty: generating an unconditional shape" in caplog.text
    assert f"prompt 2 ({len(long_prompt)} characters) is longer than the text encoder's" in caplog.text
    assert "prompt 0" not in caplog.text
    # The empty prompt gets the unconditional embedding the DiT trained on (caption dropout encodes "").
    hidden, _, pooled = pipe.encode_prompt(["", "   "], do_classifier_free_guidance=False)
    unconditional = pipe.text_encoder_wrapper().encode([""])
    torch.testing.assert_close(pooled, unconditional.pooled.expand(2, -1), rtol=0, atol=1e-5)
    # Cut at the limit: the long prompt encodes exactly as its first max_length tokens do.
    limit = pipe.text_encoder_wrapper().max_length
    kept = pipe.tokenizer.decode(
        pipe.tokenizer(long_prompt, truncation=True, max_length=limit)["input_ids"], skip_special_tokens=True
    )
    assert torch.allclose(
        pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False)[2],
        pipe.encode_prompt(kept, do_classifier_free_guidance=False)[2],
        atol=1e-5,
    )

"""ShapeDiT: shapes, permutation equivariance, zero init, masking, save/load, gradient checkpointing, configs."""

from __future__ import annotations

import pytest
import torch

from dora_shapegen.config import load_yaml
from dora_shapegen.diffusion import ShapeDiT, ShapeDiTOutput

TINY = load_yaml("dit/tiny.yaml")["model"]
CHANNELS = TINY["in_channels"]
TEXT_DIM = TINY["cross_attention_dim"]
POOLED_DIM = TINY["pooled_projection_dim"]


def make_model(**overrides) -> ShapeDiT:
    torch.manual_seed(0)
    return ShapeDiT(**{**TINY, **overrides}).eval()


def randomize(model: ShapeDiT) -> ShapeDiT:
    """Replace the zero init by random weights so that outputs are non-trivial."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def make_inputs(batch_size: int = 2, num_tokens: int = 16, text_len: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, num_tokens, CHANNELS, generator=generator)
    timestep = torch.rand(batch_size, generator=generator) * 1000
    text = torch.randn(batch_size, text_len, TEXT_DIM, generator=generator)
    mask = torch.ones(batch_size, text_len, dtype=torch.long)
    mask[0, 3:] = 0  # first prompt is shorter
    pooled = torch.randn(batch_size, POOLED_DIM, generator=generator)
    return latents, timestep, text, mask, pooled


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_output_shape_any_token_count(num_tokens):
    model = randomize(make_model())
    latents, timestep, text, mask, pooled = make_inputs(num_tokens=num_tokens)
    output = model(latents, timestep, text, mask, pooled)
    assert isinstance(output, ShapeDiTOutput)
    assert output.sample.shape == latents.shape
    assert torch.isfinite(output.sample).all()
    as_tuple = model(latents, timestep, text, mask, pooled, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], output.sample)


@pytest.mark.parametrize("use_long_skips", [True, False])
def test_permutation_equivariance(use_long_skips):
    model = randomize(make_model(use_long_skips=use_long_skips, num_layers=3))
    latents, timestep, text, mask, pooled = make_inputs(num_tokens=12)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model(latents, timestep, text, mask, pooled).sample
        permuted = model(latents[:, permutation], timestep, text, mask, pooled).sample
    assert output.abs().mean() > 1e-3  # non-trivial output, so the check below means something
    torch.testing.assert_close(permuted, output[:, permutation], atol=1e-5, rtol=1e-4)


def test_zero_output_at_init():
    model = make_model()
    latents, timestep, text, mask, pooled = make_inputs()
    output = model(latents, timestep, text, mask, pooled).sample
    assert torch.count_nonzero(output) == 0


def test_timestep_text_and_pooled_change_the_output():
    model = randomize(make_model())
    latents, timestep, text, mask, pooled = make_inputs()
    with torch.no_grad():
        base = model(latents, timestep, text, mask, pooled).sample
        other_time = model(latents, timestep * 0.5, text, mask, pooled).sample
        other_text = model(latents, timestep, text.flip(1), mask, pooled).sample
        other_pooled = model(latents, timestep, text, mask, -pooled).sample
    for changed in (other_time, other_text, other_pooled):
        assert (changed - base).abs().max() > 1e-3


def test_text_context_pooled_reads_only_the_pooled_vector(tmp_path):
    model = randomize(make_model(text_context="pooled"))
    latents, timestep, text, mask, pooled = make_inputs()
    with torch.no_grad():
        base = model(latents, timestep, text, mask, pooled).sample
        other_tokens = model(latents, timestep, torch.randn_like(text), mask[:, :1], pooled).sample
        other_pooled = model(latents, timestep, text, mask, -pooled).sample
    assert torch.allclose(base, other_tokens)  # the token states do not matter, their count neither
    assert (other_pooled - base).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = ShapeDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.text_context == "pooled"
    with torch.no_grad():
        assert torch.equal(loaded(latents, timestep, text, mask, pooled).sample, base)
    with pytest.raises(ValueError, match="needs pooled_projections"):
        model(latents, timestep, text, mask, None)


def test_text_context_pooled_plus_tokens_reads_both():
    model = randomize(make_model(text_context="pooled+tokens"))
    latents, timestep, text, mask, pooled = make_inputs()
    with torch.no_grad():
        base = model(latents, timestep, text, mask, pooled).sample
        other_text = model(latents, timestep, text.flip(1), mask, pooled).sample
        other_pooled = model(latents, timestep, text, mask, -pooled).sample
        fully_masked = model(latents, timestep, text, torch.zeros_like(mask), pooled).sample
    assert (other_text - base).abs().max() > 1e-3 and (other_pooled - base).abs().max() > 1e-3
    assert torch.isfinite(fully_masked).all()  # the pooled token is always there to attend to
    with pytest.raises(ValueError, match="text_context"):
        make_model(text_context="words")
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        make_model(text_context="pooled", pooled_projection_dim=None)


def test_scalar_timestep_broadcasts():
    model = randomize(make_model())
    latents, _, text, mask, pooled = make_inputs()
    with torch.no_grad():
        scalar = model(latents, 500.0, text, mask, pooled).sample
        vector = model(latents, torch.full((2,), 500.0), text, mask, pooled).sample
    torch.testing.assert_close(scalar, vector)


def test_padding_tokens_are_ignored():
    model = randomize(make_model())
    latents, timestep, text, mask, pooled = make_inputs()
    garbage = torch.randn(2, 4, TEXT_DIM) * 10
    padded_text = torch.cat([text, garbage], dim=1)  # (B,L+4,D)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        output = model(latents, timestep, text, mask, pooled).sample
        padded = model(latents, timestep, padded_text, padded_mask, pooled).sample
    torch.testing.assert_close(padded, output, atol=1e-5, rtol=1e-4)


def test_fully_masked_rows_are_finite_and_ignore_text():
    model = randomize(make_model())
    latents, timestep, text, mask, pooled = make_inputs()
    mask[1] = 0  # second sample: no valid text token at all (unconditional)
    with torch.no_grad():
        output = model(latents, timestep, text, mask, pooled).sample
        other = model(latents, timestep, torch.randn_like(text), mask, pooled).sample
    assert torch.isfinite(output).all()
    torch.testing.assert_close(other[1], output[1])  # masked row does not read the text
    assert (other[0] - output[0]).abs().max() > 1e-3  # the unmasked row does


def public_config(model: ShapeDiT) -> dict:
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def test_save_load_round_trip(tmp_path):
    model = randomize(make_model())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = ShapeDiT.from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    latents, timestep, text, mask, pooled = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(latents, timestep, text, mask, pooled).sample,
            model(latents, timestep, text, mask, pooled).sample,
        )


def test_gradient_checkpointing_gives_same_gradients():
    model = randomize(make_model()).train()
    latents, timestep, text, mask, pooled = make_inputs()

    def gradients():
        model.zero_grad()
        model(latents, timestep, text, mask, pooled).sample.square().mean().backward()
        return [parameter.grad.clone() for parameter in model.parameters()]

    reference = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    for checkpointed, expected in zip(gradients(), reference):
        torch.testing.assert_close(checkpointed, expected, atol=1e-6, rtol=1e-5)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


def test_pooled_projection_switch_and_errors():
    latents, timestep, text, mask, pooled = make_inputs()
    without_pooled = make_model(pooled_projection_dim=None)
    assert without_pooled(latents, timestep, text, mask).sample.shape == latents.shape
    with pytest.raises(ValueError, match="pooled_projection_dim=None"):
        without_pooled(latents, timestep, text, mask, pooled)
    with pytest.raises(ValueError, match="pooled_projections is required"):
        make_model()(latents, timestep, text, mask)
    with pytest.raises(ValueError, match="divisible"):
        ShapeDiT(**{**TINY, "width": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="hidden_states must be"):
        make_model()(latents[..., :3], timestep, text, mask, pooled)


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_configs_build(name):
    config = load_yaml(f"dit/{name}.yaml")
    assert isinstance(config["text_encoder"], str)
    with torch.device("meta"):  # no memory for the big ones
        model = ShapeDiT(**config["model"])
    assert model.config.num_layers == config["model"]["num_layers"]


def test_sample_prediction_returns_the_velocity_of_its_clean_estimate():
    """x-prediction: the network's output is x0_hat and forward returns (x_t - x0_hat) / max(sigma, min_sigma),
    the velocity noise - x0 whenever x0_hat is right, so schedulers and the training loss need no change."""
    velocity_model = randomize(make_model())
    sample_model = make_model(prediction_type="sample", min_sigma=0.05)
    sample_model.load_state_dict(velocity_model.state_dict())
    latents, _, text, mask, pooled = make_inputs()
    timestep = torch.tensor([500.0, 10.0])  # sigma 0.5, and 0.01 below the floor
    with torch.no_grad():
        clean_estimate = velocity_model(latents, timestep, text, mask, pooled).sample  # the shared last layer
        velocity = sample_model(latents, timestep, text, mask, pooled).sample
    torch.testing.assert_close(velocity[0], (latents[0] - clean_estimate[0]) / 0.5)
    torch.testing.assert_close(velocity[1], (latents[1] - clean_estimate[1]) / 0.05)
    # A perfect clean estimate gives exactly the rectified-flow target.
    clean, noise = torch.randn(2, 16, CHANNELS), torch.randn(2, 16, CHANNELS)
    sigmas = torch.tensor([0.3, 0.9])
    noisy = (1 - sigmas[:, None, None]) * clean + sigmas[:, None, None] * noise
    target = sample_model._sample_to_velocity(noisy, clean, sigmas * 1000, 2)
    torch.testing.assert_close(target, noise - clean)


def test_prediction_type_is_checked_and_stored(tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        make_model(prediction_type="epsilon")
    with pytest.raises(ValueError, match="min_sigma"):
        make_model(prediction_type="sample", min_sigma=0.0)
    model = randomize(make_model(prediction_type="sample"))
    model.save_pretrained(tmp_path)
    loaded = ShapeDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.prediction_type == "sample"
    latents, timestep, text, mask, pooled = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(latents, timestep, text, mask, pooled).sample,
            model(latents, timestep, text, mask, pooled).sample,
        )

"""`dora train-dit` with ``condition: image | both``: condition images in the shards, the RenderEncoder trained
with the DiT (one module for the loop, EMA and export), exact resume, a frozen DINOv2, LoRA, the held-out split,
and clear errors for caches without renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_shapegen.config import load_config
from dora_shapegen.data.latent_shards import LatentShardDataset, LatentStats
from dora_shapegen.diffusion.conditioning import ImageConditionedDiT
from dora_shapegen.diffusion.image_encoder import ImageEncoder
from dora_shapegen.diffusion.modeling_render_encoder import RenderEncoder
from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
from dora_shapegen.diffusion.train import DiTTrainConfig, train
from dora_shapegen.diffusion.train_utils import InMemoryBatches, load_latent_table
from dora_shapegen.seeding import is_held_out
from tests.diffusion._image_cache import CHANNELS, RENDERS, SIZE, render_block, write_image_cache

IMAGE_TINY = "configs/dit/image_tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_image_cache(tmp_path_factory.mktemp("latents_img"), with_renders=True)


def image_config(shards: Path, path: str = IMAGE_TINY, **overrides) -> DiTTrainConfig:
    return load_config(
        DiTTrainConfig, path, {"data.shards": str(shards), "sampling.final": False, **overrides}
    )


# ------------------------------------------------------------------------------------------------ shards
def test_renders_round_trip_through_the_shards_and_old_readers_ignore_them(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["renders"]["num_views"] == RENDERS and "render_<v>.png" in manifest["sample_keys"]
    everything = list(LatentShardDataset(shards, num_tokens=8, shuffle_buffer=0, images="all"))
    by_id = {sample["shape_id"]: sample for sample in everything}
    images = by_id["lamp-0002"]["images"]  # (R, H, W, 3)
    assert images.shape == (RENDERS, SIZE, SIZE, 3) and images.dtype == torch.uint8
    for view in range(RENDERS):
        np.testing.assert_array_equal(images[view].numpy(), render_block(2, view))  # PNG is lossless
    one = next(iter(LatentShardDataset(shards, num_tokens=8, shuffle_buffer=0, images="one")))
    assert one["image"].shape == (SIZE, SIZE, 3)
    plain = next(iter(LatentShardDataset(shards, num_tokens=8, shuffle_buffer=0)))
    assert "image" not in plain and "images" not in plain and plain["latents"].shape == (8, CHANNELS)


def test_a_cache_without_renders_is_refused_by_image_training_and_readers(tmp_path):
    plain = write_image_cache(tmp_path / "plain", with_renders=False)
    with pytest.raises(ValueError, match="this cache has none; run `dora render-views"):
        train(image_config(plain), tmp_path / "run")
    with pytest.raises(ValueError, match="has no condition images"):
        next(iter(LatentShardDataset(plain, shuffle_buffer=0, images="one")))


def test_batches_carry_one_render_per_sample_and_text_batches_are_unchanged(shards):
    stats = LatentStats.from_manifest(json.loads((shards / "manifest.json").read_text()))
    with_images = load_latent_table(shards, 16, stats, with_images=True)
    text_only = load_latent_table(shards, 16, stats)
    assert with_images.images.shape == (8, RENDERS, SIZE, SIZE, 3) and text_only.images is None
    image_batch = InMemoryBatches(with_images, 4, 0, 0, 1).batch(3, torch.Generator().manual_seed(5))
    text_batch = InMemoryBatches(text_only, 4, 0, 0, 1).batch(3, torch.Generator().manual_seed(5))
    torch.testing.assert_close(image_batch["latents"], text_batch["latents"])  # the same draws come first
    assert image_batch["caption"] == text_batch["caption"]
    assert image_batch["image"].shape == (4, SIZE, SIZE, 3)


def test_held_out_shapes_never_reach_training(shards):
    stats = LatentStats.from_manifest(json.loads((shards / "manifest.json").read_text()))
    table = load_latent_table(shards, 16, stats, held_out_fraction=0.5)
    everything = load_latent_table(shards, 16, stats)
    expected = [shape for shape in everything.shape_ids if not is_held_out(shape, 0.5)]
    assert table.shape_ids == expected and 0 < len(expected) < 8


# ------------------------------------------------------------------------------------------------ training
def test_image_training_trains_encoder_and_dit_together_and_exports_both(shards, tmp_path):
    config = image_config(
        shards,
        **{"training.max_steps": 12, "training.checkpoint_every": 0, "training.learning_rate": 3e-3},
    )
    torch.manual_seed(config.training.seed)
    initial_encoder = RenderEncoder(**config.image_encoder_model).state_dict()  # what train() starts from
    ShapeDiT(**config.model)  # (the DiT is drawn first, as in train())
    result = train(config, tmp_path / "run")
    assert isinstance(result.model, ImageConditionedDiT)
    history = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert history["condition"] == "image" and history["cached_captions"] == 0
    moved = [
        name
        for name, value in result.model.image_encoder.model.state_dict().items()
        if not torch.equal(value, initial_encoder[name])
    ]
    assert moved  # the encoder got gradients through the DiT's loss
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() and (final / "image_encoder" / "config.json").is_file()
    encoder = ImageEncoder.from_name(f"render-cnn:{final / 'image_encoder'}")
    with torch.no_grad():
        from dora_shapegen.training.ema import ema_weights

        with ema_weights(result.model, result.ema):  # the export holds the encoder's EMA weights
            expected = result.model.image_encoder.model.state_dict()
            for name, value in encoder.model.state_dict().items():
                torch.testing.assert_close(value, expected[name])


def test_image_run_resumes_exactly(shards, tmp_path):
    config = image_config(shards, **{"training.max_steps": 4, "training.checkpoint_every": 2})
    straight = train(config, tmp_path / "straight")
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    resumed = train(config, tmp_path / "resumed", resume="latest")
    assert resumed.summary["resumed_from_step"] == 2
    for (name, expected), (_, actual) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters()
    ):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_both_with_a_frozen_dinov2_and_then_lora_on_top(shards, tmp_path):
    both = {
        "condition": "both",
        "text_encoder": "tiny-random:clip",
        "image_encoder": "tiny-random:dinov2",
        "model.image_embed_dim": 32,
        "model.image_pooled_projection_dim": 32,
        "training.caption_dropout": 0.3,
        "training.image_dropout": 0.3,
        "training.checkpoint_every": 0,
        "sampling.final": True,
    }
    from dora_shapegen.vae.modeling_dora_vae import DoraVAE

    vae_dir = tmp_path / "vae"  # a random VAE of the cache's width: the previews decode and draw meshes
    DoraVAE(
        width=32, heads=2, num_encoder_layers=1, num_decoder_layers=1, latent_channels=CHANNELS, n_uniform=64,
        n_salient=16,
    ).save_pretrained(vae_dir)  # fmt: skip
    result = train(image_config(shards, **both), tmp_path / "both", vae_dir=str(vae_dir))
    assert isinstance(result.model, ShapeDiT)  # a frozen encoder stays outside the trained module
    final = tmp_path / "both" / "final"
    assert not (final / "image_encoder").exists()
    assert list((tmp_path / "both" / "samples").glob("final_*.png"))  # image-conditioned previews

    lora = {**both, "lora.rank": 4, "training.use_ema": False, "sampling.final": False}
    adapted = train(image_config(shards, **lora, init_from=str(final)), tmp_path / "lora")
    assert adapted.summary["steps"] == 2
    assert (tmp_path / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()

    with pytest.raises(ValueError, match="condition='image' contradicts init_from"):
        train(image_config(shards, init_from=str(final)), tmp_path / "bad")


def test_a_dit_config_that_does_not_fit_the_image_encoder_is_named(shards, tmp_path):
    with pytest.raises(
        ValueError, match="image encoder gives 32-d tokens but model.cross_attention_dim is 48"
    ):
        train(image_config(shards, **{"model.cross_attention_dim": 48}), tmp_path / "run")
    with pytest.raises(ValueError, match="set model.image_embed_dim: 32"):
        train(image_config(shards, condition="both", text_encoder="tiny-random:clip"), tmp_path / "run2")


def test_shipped_image_configs_fit_their_encoders():
    from dora_shapegen.diffusion.conditioning import check_dit_fits

    config = load_config(DiTTrainConfig, "configs/quickstart/dit_image.yaml")
    encoder = ImageEncoder.from_name(config.image_encoder, config.image_encoder_model)
    check_dit_fits(ShapeDiT(**config.model).config, config.condition, None, encoder)
    assert (
        config.data.held_out_fraction
        == load_config(DiTTrainConfig, "configs/quickstart/dit_text_split.yaml").data.held_out_fraction
    )
    gpu = load_config(DiTTrainConfig, "configs/dit/image_dinov2.yaml")  # weights not here: the config only
    assert gpu.image_encoder.startswith("dinov2:") and gpu.image_size == 518
    assert gpu.model["cross_attention_dim"] == gpu.model["pooled_projection_dim"] == 1536


def test_image_training_streams_renders_from_resampled_shards(shards, tmp_path):
    config = image_config(
        shards,
        **{
            "data.in_memory": False,
            "data.num_workers": 0,
            "data.shuffle_buffer": 4,
            "training.checkpoint_every": 0,
        },
    )
    result = train(config, tmp_path / "stream")
    assert result.summary["steps"] == 2 and result.summary["final_loss"] is not None
    assert (tmp_path / "stream" / "final" / "image_encoder" / "config.json").is_file()

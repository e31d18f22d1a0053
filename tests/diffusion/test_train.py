"""`dora train-dit`: the training loop lowers the loss, writes checkpoints + export, resumes exactly, and keeps
replicas identical across 2 CPU processes. Data: tiny shards written with the real latent-cache writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dora_shapegen.config import load_config
from dora_shapegen.data.latent_shards import (
    LatentShardWriter,
    LatentStats,
    LatentSums,
    build_manifest,
    to_storage,
    write_manifest,
)
from dora_shapegen.diffusion import ShapeDiT
from dora_shapegen.diffusion.flow_matching import (
    add_noise,
    flow_matching_loss,
    sample_timesteps,
    velocity_target,
)
from dora_shapegen.diffusion.text_encoder import TextEncoder
from dora_shapegen.diffusion.train import DiTTrainConfig, main, train
from dora_shapegen.diffusion.train_utils import CaptionEmbeddingCache, InMemoryBatches, load_latent_table
from dora_shapegen.errors import ConfigError
from dora_shapegen.pipelines.assemble import _scheduler

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/dit/tiny.yaml"
CATEGORIES = ("chair", "table", "lamp", "mug")
NUM_TOKENS, CHANNELS = 32, 64  # tiny.yaml: in_channels 64, schedule up to 32 tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 synthetic shapes in 2 shards + manifest, via LatentShardWriter: the tokens of a shape scatter tightly around
    a per-category vector, so a denoiser can learn the distribution (iid noise latents would leave nothing to learn)."""
    out = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 2.0, size=(len(CATEGORIES), CHANNELS))  # (K,C)
    sums = LatentSums()
    with LatentShardWriter(out, max_samples=4) as writer:
        for index in range(8):
            category = CATEGORIES[index % len(CATEGORIES)]
            latents = centers[index % 4] + 0.3 * rng.normal(size=(1, NUM_TOKENS, CHANNELS))  # (V,N,C)
            stored = to_storage(latents, "fp16")
            captions = [f"a {category} number {index}", f"a {category}"]
            meta = {
                "shape_id": f"{category}-{index:04d}",
                "captions": captions,
                "category": category,
                "dtype": "fp16",
                "num_tokens": NUM_TOKENS,
                "latent_channels": CHANNELS,
            }
            writer.write(meta["shape_id"], stored, captions, "synthetic", meta)
            sums.update(stored)
    manifest = build_manifest(
        writer.records, sums, num_tokens=NUM_TOKENS, latent_channels=CHANNELS, num_views=1, dtype="fp16"
    )
    write_manifest(out, manifest)
    assert manifest["num_shards"] == 2
    return out


def tiny_config(shards: Path, **overrides) -> DiTTrainConfig:
    return load_config(
        DiTTrainConfig, TINY, {"data.shards": str(shards), "sampling.final": False, **overrides}
    )


def fixed_loss(model: torch.nn.Module, shards: Path, config: DiTTrainConfig) -> float:
    """Flow-matching loss of ``model`` on all 8 shapes with fixed noise and noise levels."""
    stats = LatentStats.from_manifest(json.loads((shards / "manifest.json").read_text()))
    table = load_latent_table(shards, 16, stats)
    embeddings = CaptionEmbeddingCache(TextEncoder.from_name(config.text_encoder), "cpu")
    text = embeddings([captions[0] for captions in table.captions])
    latents = table.latents[:, 0]  # (S,16,C)
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas, timesteps = sample_timesteps(len(latents), "uniform", generator)
    with torch.no_grad():
        prediction = model(
            add_noise(latents, noise, sigmas),
            timesteps,
            text.hidden_states,
            encoder_attention_mask=text.attention_mask,
            pooled_projections=text.pooled,
        ).sample
    return float(flow_matching_loss(prediction, velocity_target(latents, noise)))


def test_latent_table_reads_the_shards_normalised(shards):
    stats = LatentStats.from_manifest(json.loads((shards / "manifest.json").read_text()))
    table = load_latent_table(shards, NUM_TOKENS, stats)
    assert table.latents.shape == (8, 1, NUM_TOKENS, CHANNELS)
    assert table.shape_ids == sorted(table.shape_ids) and len(set(table.shape_ids)) == 8
    assert set(table.categories) == set(CATEGORIES)
    # normalised with the manifest's statistics: ~zero mean / unit std per channel over the whole cache
    flat = table.latents.reshape(-1, CHANNELS)
    assert flat.mean(0).abs().max() < 1e-2 and (flat.std(0) - 1).abs().max() < 2e-2


def test_in_memory_epoch_order_is_seeded_per_epoch_and_shared_by_ranks():
    table = list(range(40))  # the order needs only the table's length

    def order(seed: int, epoch: int, rank: int = 0) -> list[int]:
        return InMemoryBatches(table, 4, seed, rank, 2)._order(epoch).tolist()

    assert order(3, 0) == order(3, 0, rank=1) and sorted(order(3, 0)) == table
    assert order(3, 1) != order(3, 0) and order(4, 0) != order(3, 0)


def test_training_loop_lowers_the_loss_on_a_fixed_batch(shards, tmp_path):
    config = tiny_config(
        shards,
        **{
            "data.batch_size": 8,
            "training.max_steps": 20,
            "training.caption_dropout": 0.0,
            "training.use_ema": False,
            "training.checkpoint_every": 0,
            "training.learning_rate": 3e-3,
        },
    )
    torch.manual_seed(config.training.seed)
    before = fixed_loss(ShapeDiT(**config.model), shards, config)  # the initial weights train() starts from
    result = train(config, tmp_path / "run")
    after = fixed_loss(result.model, shards, config)
    assert result.summary["steps"] == 20
    assert after < 0.7 * before, (before, after)


def test_two_step_run_writes_checkpoint_export_and_preview(shards, tmp_path):
    from dora_shapegen.vae.modeling_dora_vae import DoraVAE

    vae_dir = tmp_path / "vae"  # a random VAE with the cache's channel count: previews must decode and render
    DoraVAE(
        width=32,
        heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        latent_channels=CHANNELS,
        n_uniform=64,
        n_salient=16,
    ).save_pretrained(vae_dir)
    out = tmp_path / "run"
    assert (
        main(
            [
                "--config",
                TINY,
                "--shards",
                str(shards),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--vae",
                str(vae_dir),
            ]
        )
        == 0
    )
    checkpoint = out / "checkpoints" / "checkpoint-2"
    for name in (
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "train_state.json",
        "config.yaml",
        "ema.safetensors",
        "ema.json",
    ):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "train_state.json").read_text())["global_step"] == 2
    final = out / "final"
    for name in (
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "run_config.yaml",
        "latent_stats.json",
        "scheduler/scheduler_config.json",
    ):
        assert (final / name).is_file(), name
    exported = ShapeDiT.from_pretrained(final)
    # the export holds the EMA weights (which differ from the raw weights after 2 steps)
    ema = load_file(checkpoint / "ema.safetensors")
    raw = load_file(checkpoint / "model.safetensors")
    for name, tensor in exported.named_parameters():
        torch.testing.assert_close(tensor, ema[name])
    assert any(not torch.equal(ema[name], raw[name]) for name in raw)
    run_config = yaml.safe_load((final / "run_config.yaml").read_text())
    assert run_config["text_encoder"] == "tiny-random:clip" and run_config["training"]["max_steps"] == 2
    manifest = json.loads((shards / "manifest.json").read_text())
    assert json.loads((final / "latent_stats.json").read_text())["stats"] == manifest["stats"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard log"
    assert list((out / "samples").glob("final_step*.png")), "no preview grid"


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(shards, tmp_path):
    config = tiny_config(shards, **{"training.max_steps": 4, "training.checkpoint_every": 2})
    straight = train(config, tmp_path / "straight")
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    resumed = train(config, tmp_path / "resumed", resume="latest")
    assert resumed.summary["resumed_from_step"] == 2 and resumed.summary["steps"] == 4
    assert resumed.summary["micro_steps"] == 4
    for (name, expected), (_, actual) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters()
    ):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=name)
    for expected, actual in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    assert resumed.ema.optimization_step == 4


def test_streaming_mode_trains_from_resampled_shards(shards, tmp_path):
    config = tiny_config(
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
    assert (tmp_path / "stream" / "final" / "config.json").is_file()
    # captions are encoded on first sight: "" plus those of the 2 batches of 4
    assert 2 <= result.summary["cached_captions"] <= 9


def test_incompatible_cache_gives_a_clear_error(shards, tmp_path):
    config = tiny_config(shards, **{"model.in_channels": 8})
    with pytest.raises(ValueError, match="in_channels"):
        train(config, tmp_path / "bad")
    config = tiny_config(shards, **{"schedule.phases": [{"until_step": None, "tokens": [64]}]})
    with pytest.raises(ValueError, match="only 32 are cached"):
        train(config, tmp_path / "bad2")


def test_sampling_shift_goes_to_the_exported_scheduler_and_the_pipeline(shards, tmp_path):
    # sampling.scheduler_shift changes how samples are drawn, not what the model learns: the run trains exactly as
    # one without it, and its exported scheduler (what `dora assemble-pipeline` gives the pipeline) has the shift.
    plain = train(tiny_config(shards, **{"training.max_steps": 1}), tmp_path / "plain")
    shifted = train(
        tiny_config(shards, **{"training.max_steps": 1, "sampling.scheduler_shift": 3.0}),
        tmp_path / "shifted",
    )
    for name, tensor in plain.model.state_dict().items():
        torch.testing.assert_close(shifted.model.state_dict()[name], tensor)

    def exported_shift(run: Path) -> float:
        return json.loads((run / "final" / "scheduler" / "scheduler_config.json").read_text())["shift"]

    assert exported_shift(tmp_path / "plain") == 1.0 and exported_shift(tmp_path / "shifted") == 3.0
    assert _scheduler(tmp_path / "shifted" / "final", None).config.shift == 3.0
    assert _scheduler(tmp_path / "shifted" / "final", 2.0).config.shift == 2.0  # --scheduler-shift wins
    with pytest.raises(ConfigError, match="sampling.scheduler_shift must be a positive number"):
        train(tiny_config(shards, **{"sampling.scheduler_shift": 0.0}), tmp_path / "bad")
    assert not (tmp_path / "bad" / "final").exists()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_cpu_processes_hold_identical_weights(shards, tmp_path):
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(PROJECT_ROOT / "tests" / "diffusion" / "_mp_train.py"),
        TINY,
        str(shards),
        str(out),
    ]
    completed = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = [json.loads((out / f"hash-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["num_processes"] == 2 and record["steps"] == 2 for record in records)
    assert records[0]["final"] == records[1]["final"]
    assert records[0]["final"] != records[0]["initial"]  # they trained, and stayed in sync


def test_wall_clock_cap_cuts_the_run_loudly(shards, tmp_path, caplog):
    config = tiny_config(shards, **{"training.max_steps": 50, "training.checkpoint_every": 0})
    with caplog.at_level("WARNING", logger="dora.train_dit"):
        result = train(config, tmp_path / "run", max_minutes=1e-6)  # out of time after the first step
    assert result.summary["stopped_by_time"] and result.summary["steps"] == 1
    assert "WALL-CLOCK CAP" in caplog.text and "step 1 of 50" in caplog.text
    assert (tmp_path / "run" / "final" / "config.json").exists()

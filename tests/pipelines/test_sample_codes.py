"""`dora sample-codes`: a tiny pipeline's DiT denoises each training shape's cached code back from a random noise
level (SDEdit); the codes folder it writes is what `dora train-vae --codes` reads. Also the assembly of a
decoder-only fine-tune of the cache's VAE (`decoder_fine_tune_of`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from dora_shapegen.data.latent_shards import (
    LatentShardWriter,
    LatentSums,
    build_manifest,
    to_storage,
    write_manifest,
)
from dora_shapegen.diffusion.sampling import sampling_timesteps
from dora_shapegen.pipelines.assemble import decoder_fine_tune_of
from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline
from dora_shapegen.pipelines.sample_codes import SampleCodesConfig, main, sample_codes
from dora_shapegen.seeding import is_held_out
from dora_shapegen.vae.train_data import CodeTable
from tests.pipelines._tiny_pipeline import LATENT_CHANNELS, make_tiny_pipeline

CACHED_TOKENS = 32
NUM_TOKENS = 16  # the codes: prefixes of the cached 32 tokens
HELD_OUT = 0.25
VAE_SHA256 = {"diffusion_pytorch_model.safetensors": "ab" * 32}
SHAPE_IDS = [f"shape-{index:03d}" for index in range(10)]


def _write_cache(out: Path, offset: float = 0.0) -> dict[str, np.ndarray]:
    """A latent cache of SHAPE_IDS (one view, 32 tokens, fp16, two captions each) written by the real writer,
    pinned to VAE_SHA256; returns each shape's stored latents (N, C) as read back. ``offset`` shifts every
    latent (another cache: other statistics)."""
    rng = np.random.default_rng(0)
    sums, stored_by_id = LatentSums(), {}
    with LatentShardWriter(out, max_samples=4) as writer:
        for index, shape_id in enumerate(SHAPE_IDS):
            latents = rng.normal(0.3 + offset, 2.0, size=(1, CACHED_TOKENS, LATENT_CHANNELS))  # (V, N, C)
            stored = to_storage(latents, "fp16")
            captions = [f"a shape number {index}", "a shape"]
            meta = {"shape_id": shape_id, "captions": captions, "category": "shape", "dtype": "fp16",
                    "num_tokens": CACHED_TOKENS, "latent_channels": LATENT_CHANNELS}  # fmt: skip
            writer.write(shape_id, stored, captions, "synthetic", meta)
            sums.update(stored)
            stored_by_id[shape_id] = stored[0].astype(np.float64)  # (N, C)
    manifest = build_manifest(
        writer.records, sums, num_tokens=CACHED_TOKENS, latent_channels=LATENT_CHANNELS, num_views=1,
        dtype="fp16", vae={"weights_sha256": VAE_SHA256},
    )  # fmt: skip
    write_manifest(out, manifest)
    return stored_by_id


def _pipeline_of(shards: Path) -> DoraTextTo3DPipeline:
    """The tiny pipeline with the cache's statistics, as `dora assemble-pipeline --manifest` stores them."""
    tiny = make_tiny_pipeline()
    stats = json.loads((shards / "manifest.json").read_text())["stats"]
    pipe = DoraTextTo3DPipeline(
        vae=tiny.vae, transformer=tiny.transformer, scheduler=tiny.scheduler, text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer, latent_mean=stats["mean"], latent_std=stats["std"],
        text_encoder_kind=tiny.config.text_encoder_kind, text_max_length=tiny.config.text_max_length,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    held = [shape_id for shape_id in SHAPE_IDS if is_held_out(shape_id, HELD_OUT)]
    assert 0 < len(held) < len(SHAPE_IDS) - 4, held  # both splits non-empty, more shapes than a batch below
    shards = tmp_path_factory.mktemp("latents")
    return shards, _write_cache(shards)


@pytest.fixture(scope="module")
def pipe(cache) -> DoraTextTo3DPipeline:
    return _pipeline_of(cache[0])


def _settings(**overrides) -> SampleCodesConfig:
    # batch_size 3 < the training shapes: several batches per variant.
    values = {"variants": 2, "num_inference_steps": 6, "num_tokens": NUM_TOKENS, "held_out_fraction": HELD_OUT,
              "batch_size": 3, "seed": 0}  # fmt: skip
    return SampleCodesConfig(**(values | overrides))


@pytest.fixture(scope="module")
def written(pipe, cache, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("codes")
    summary = sample_codes(pipe, cache[0], out, _settings())
    return out, summary


def test_sample_codes_writes_a_clean_and_variants_codes_per_training_shape(written, cache):
    out, summary = written
    _, stored = cache
    assert sorted(path.name for path in out.iterdir()) == ["codes.json", "codes.safetensors"]
    tensors = load_file(str(out / "codes.safetensors"))
    info = json.loads((out / "codes.json").read_text())
    assert info == json.loads(json.dumps(summary))
    training = [shape_id for shape_id in SHAPE_IDS if not is_held_out(shape_id, HELD_OUT)]
    assert info["shape_ids"] == training  # held-out shapes absent
    assert info["vae_weights_sha256"] == VAE_SHA256 and info["settings"]["variants"] == 2
    codes, index, sigma = tensors["codes"], tensors["shape_index"], tensors["sigma"]
    rows = len(training) * (1 + 2)
    assert codes.dtype == torch.float16 and codes.shape == (rows, NUM_TOKENS, LATENT_CHANNELS)
    assert index.shape == sigma.shape == (rows,) and info["num_codes"] == rows
    assert info["num_shapes"] == len(training) and info["num_tokens"] == NUM_TOKENS
    # Each shape: exactly one clean code and one generated code per variant (also across several batches).
    for position in range(len(training)):
        mine = sigma[index == position]
        assert (mine == 0).sum() == 1 and (mine > 0).sum() == 2, (training[position], mine)
    # The clean rows are the cached codes in the VAE's space (normalised, then denormalised: fp16 tolerance).
    for row in torch.nonzero(sigma == 0).flatten().tolist():
        expected = torch.as_tensor(stored[training[int(index[row])]][:NUM_TOKENS], dtype=torch.float32)
        torch.testing.assert_close(codes[row].float(), expected, rtol=2e-3, atol=2e-3)
    # The generated codes are the DiT's: not their source code, and finite.
    generated = sigma > 0
    assert torch.isfinite(codes.float()).all()
    for row in torch.nonzero(generated).flatten().tolist():
        source = torch.as_tensor(stored[training[int(index[row])]][:NUM_TOKENS], dtype=torch.float32)
        assert not torch.allclose(codes[row].float(), source, atol=1e-2)
    # The folder is what `dora train-vae --codes` reads.
    table = CodeTable(out)
    assert all(table.covers(shape_id) for shape_id in training)
    assert not any(table.covers(shape_id) for shape_id in SHAPE_IDS if shape_id not in training)


def test_noise_levels_are_the_schedules_within_the_range(written):
    out, summary = written
    sigma = load_file(str(out / "codes.safetensors"))["sigma"]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # the tiny pipeline's
    sampling_timesteps(scheduler, 6, NUM_TOKENS, "cpu")
    levels = scheduler.sigmas[:-1].float()  # (T,) from 1 down

    def nearest(value: float) -> float:
        return float(levels[torch.argmin((levels - value).abs())])

    low, high = nearest(0.3), nearest(0.8)  # the default sigma_min, sigma_max snapped to the schedule
    used = sorted(set(sigma[sigma > 0].tolist()))
    assert used
    for value in used:
        assert torch.isclose(levels, torch.tensor(value), atol=1e-6).any(), (value, levels)
        assert low - 1e-6 <= value <= high + 1e-6, (value, low, high)
    # distance_by_sigma: one entry per level used, counting its codes.
    by_level = summary["distance_by_sigma"]
    assert sorted(by_level) == sorted(f"{value:.3f}" for value in used)
    assert sum(entry["codes"] for entry in by_level.values()) == int((sigma > 0).sum())
    assert all(entry["rms_distance_std"] > 0 for entry in by_level.values())


def test_a_fixed_seed_gives_the_same_codes(pipe, cache, written, tmp_path):
    out, _ = written
    first = load_file(str(out / "codes.safetensors"))
    sample_codes(pipe, cache[0], tmp_path / "again", _settings())
    again = load_file(str(tmp_path / "again" / "codes.safetensors"))
    for key in first:
        assert torch.equal(first[key], again[key]), key
    sample_codes(pipe, cache[0], tmp_path / "other", _settings(seed=1))
    other = load_file(str(tmp_path / "other" / "codes.safetensors"))
    assert not torch.equal(first["codes"], other["codes"])


def test_a_pipeline_in_bfloat16_samples_in_its_dtype(cache, tmp_path):
    """A loaded pipeline in half precision (as on a GPU): the cached codes and the text go to the DiT's dtype."""
    half = _pipeline_of(cache[0]).to(torch.bfloat16)
    summary = sample_codes(half, cache[0], tmp_path / "bf16", _settings(variants=1, num_inference_steps=2))
    codes = load_file(str(tmp_path / "bf16" / "codes.safetensors"))["codes"]
    assert codes.dtype == torch.float16 and summary["num_codes"] == 2 * summary["num_shapes"]
    assert torch.isfinite(codes.float()).all()


def test_bad_settings_and_another_cache_are_refused(pipe, cache, tmp_path):
    for bad, match in (
        ({"sigma_min": 0.8, "sigma_max": 0.3}, "sigma_min <= sigma_max"),
        ({"sigma_max": 1.5}, "sigma_max <= 1"),
        ({"sigma_min": 0.0}, "0 < sigma_min"),
        ({"variants": 0}, "variants"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
    ):
        with pytest.raises(ValueError, match=match):
            sample_codes(pipe, cache[0], tmp_path / "bad", _settings(**bad))
    assert not (tmp_path / "bad").exists()  # refused before any work
    # A cache with other statistics (not the one the DiT was trained on) is refused, by mean or by std alone.
    shifted = tmp_path / "shifted"
    _write_cache(shifted, offset=1.0)
    with pytest.raises(ValueError, match="not the latent cache this pipeline's DiT was trained on"):
        sample_codes(pipe, shifted, tmp_path / "out", _settings())
    manifest = json.loads((cache[0] / "manifest.json").read_text())
    other_std = tmp_path / "other_std"
    other_std.mkdir()
    for shard in cache[0].glob("*.tar"):
        (other_std / shard.name).write_bytes(shard.read_bytes())
    manifest["stats"]["std"] = [2.0 * value for value in manifest["stats"]["std"]]
    write_manifest(other_std, manifest)
    with pytest.raises(ValueError, match="other statistics"):
        sample_codes(pipe, other_std, tmp_path / "out", _settings())
    assert not (tmp_path / "out").exists()
    # Only a text-to-3D pipeline that records its cache's statistics can redo the cached codes.
    from tests.pipelines._tiny_pipeline import make_tiny_image_pipeline

    with pytest.raises(ValueError, match="^DoraImageTo3DPipeline: sample-codes needs a text-to-3D pipeline"):
        sample_codes(make_tiny_image_pipeline("image"), cache[0], tmp_path / "out", _settings())
    bare = DoraTextTo3DPipeline(
        vae=pipe.vae, transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )  # fmt: skip
    with pytest.raises(ValueError, match="records no latent statistics"):
        sample_codes(bare, cache[0], tmp_path / "out", _settings())
    assert not (tmp_path / "out").exists()


def test_cli_runs_on_a_saved_pipeline_and_names_a_missing_one(pipe, cache, tmp_path, capsys):
    from dora_shapegen.pipelines.apps.cli import SUBCOMMANDS

    assert SUBCOMMANDS["sample-codes"][0] == "dora_shapegen.pipelines.sample_codes"
    shards = str(cache[0])
    missing = tmp_path / "no_pipeline"
    assert main(["--pipeline", str(missing), "--shards", shards, "--out", str(tmp_path / "out")]) == 2
    assert f"dora sample-codes: --pipeline {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    saved = tmp_path / "pipeline"
    pipe.save_pretrained(saved)
    config = tmp_path / "sample_codes.yaml"
    config.write_text(
        yaml.safe_dump({"num_tokens": NUM_TOKENS, "held_out_fraction": HELD_OUT, "variants": 3})
    )
    out = tmp_path / "codes"
    argv = ["--pipeline", str(saved), "--shards", shards, "--out", str(out), "--config", str(config)]
    assert main([*argv, "--variants", "1", "--steps", "2", "--seed", "5"]) == 0  # flags win over the YAML
    info = json.loads((out / "codes.json").read_text())
    assert info["settings"] | {"variants": 1, "num_inference_steps": 2, "seed": 5} == info["settings"]
    assert info["num_codes"] == 2 * info["num_shapes"]
    assert (
        f"wrote {info['num_codes']} codes of {info['num_shapes']} shapes to {out}" in capsys.readouterr().out
    )
    # A setting the YAML gets wrong is a one-line error too.
    config.write_text(yaml.safe_dump({"sigma_min": 0.9, "sigma_max": 0.2}))
    assert main([*argv[:-2], "--out", str(tmp_path / "bad"), "--config", str(config)]) == 2
    assert "need 0 < sigma_min <= sigma_max <= 1" in capsys.readouterr().err


# -------------------------------------------------------------- assembling a decoder fine-tune of the cache's VAE
def _run_record(folder: Path, trainable: str | None, sha256: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "training": {} if trainable is None else {"trainable": trainable},
        "init_from": "runs/vae/final",
    }
    if sha256 is not None:
        record["init_from_sha256"] = sha256
    (folder / "run_config.yaml").write_text(yaml.safe_dump(record))
    return folder


def test_decoder_fine_tune_of_needs_a_decoder_run_from_those_weights(tmp_path):
    assert decoder_fine_tune_of(_run_record(tmp_path / "refined", "decoder", VAE_SHA256), VAE_SHA256)
    assert not decoder_fine_tune_of(tmp_path / "no_record", VAE_SHA256)  # no run_config.yaml
    other = {"diffusion_pytorch_model.safetensors": "cd" * 32}
    assert not decoder_fine_tune_of(_run_record(tmp_path / "other", "decoder", other), VAE_SHA256)
    assert not decoder_fine_tune_of(_run_record(tmp_path / "all", "all", VAE_SHA256), VAE_SHA256)
    assert not decoder_fine_tune_of(_run_record(tmp_path / "default", None, VAE_SHA256), VAE_SHA256)
    assert not decoder_fine_tune_of(_run_record(tmp_path / "scratch", "decoder", None), VAE_SHA256)
    # A cache that records no VAE weights matches no run (not one that records none either).
    assert not decoder_fine_tune_of(_run_record(tmp_path / "unknown", "decoder", None), None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run_config.yaml").write_text("")
    assert not decoder_fine_tune_of(tmp_path / "empty", VAE_SHA256)


def test_assemble_accepts_a_decoder_fine_tune_of_the_caches_vae(tmp_path, capsys):
    from tests.pipelines.test_assemble import _assemble, _write_parts

    recorded = {"diffusion_pytorch_model.safetensors": "0" * 64}  # the cache's VAE: not the folder's weights
    parts = _write_parts(tmp_path, vae_sha256="0" * 64)
    assert _assemble(parts, tmp_path / "refused") == 2
    assert "come from a VAE with weights" in capsys.readouterr().err
    _run_record(parts["vae"], "all", recorded)  # retrained whole: its encoder (and codes) changed
    assert _assemble(parts, tmp_path / "refused") == 2
    capsys.readouterr()
    _run_record(parts["vae"], "decoder", recorded)  # the decoder alone retrained from the cache's VAE
    assert _assemble(parts, tmp_path / "pipeline") == 0, capsys.readouterr().err
    assert (tmp_path / "pipeline" / "model_index.json").exists()

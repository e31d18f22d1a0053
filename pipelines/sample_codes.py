"""`dora sample-codes`: the codes a pipeline's DiT makes from each training shape, for a decoder fine-tune.

A VAE decoder trained on its encoder's codes breaks on the codes a DiT samples, which lie off those codes in
ways random noise does not imitate (decoder noise training did not help here three times, docs/RESULTS.md). This
stage makes the DiT's own kind of error with a known target (SDEdit, Meng et al., arXiv 2108.01073): each cached
training code ``z0`` is noised to a random level ``sigma`` and denoised back by the DiT along the pipeline's
sampler, conditioned on one of the shape's captions with the pipeline's guidance. The result is a code the DiT
made that should still decode to ``z0``'s shape; `dora train-vae --init-from VAE --codes OUT` with
``training.trainable: decoder`` then teaches the decoder exactly that (the encoder stays frozen, so the latent
cache and the DiT stay valid).

Output (OUT/): ``codes.safetensors`` with ``codes`` (P, N, C) fp16 in the VAE's latent space, ``shape_index`` (P,)
and ``sigma`` (P,) (0 = the clean cached code, one per shape), and ``codes.json`` with the shape ids, the settings,
the VAE the cache was made with (``vae_weights_sha256``) and how far the DiT's codes land from their source code
per noise level, in latent-std units.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dora_shapegen import cli_types
from dora_shapegen.vae.train_data import CODES_FILE, CODES_INFO

logger = logging.getLogger("dora.sample_codes")


@dataclass
class SampleCodesConfig:
    variants: int = 3  # generated codes per training shape (each from its own noise level, noise and caption)
    # Noise levels are drawn uniformly in [sigma_min, sigma_max] and snapped to the sampler's schedule: below ~0.3
    # the DiT hands back nearly the clean code; above ~0.8 it draws another shape of the caption, which the source
    # shape's supervision would then contradict.
    sigma_min: float = 0.3
    sigma_max: float = 0.8
    num_inference_steps: int = 10  # the schedule the DiT integrates back on (its steps below the start level)
    guidance_scale: float | None = None  # None: the pipeline's default (what `dora generate` samples with)
    num_tokens: int | None = None  # None: the pipeline's default token count
    held_out_fraction: float = 0.1  # leave out the VAE's held-out split (its data.val_fraction)
    batch_size: int = 32
    seed: int = 0


def check_config(config: SampleCodesConfig) -> None:
    """A ValueError naming the first bad setting."""
    if config.variants < 1 or config.num_inference_steps < 1 or config.batch_size < 1:
        raise ValueError("variants, num_inference_steps and batch_size must be >= 1")
    if not 0.0 < config.sigma_min <= config.sigma_max <= 1.0:
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max <= 1, got sigma_min={config.sigma_min}, sigma_max={config.sigma_max}"
        )
    if not 0.0 <= config.held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {config.held_out_fraction}")


def _denoise_from(
    pipe: Any, clean: torch.Tensor, text: Any, sigma_target: float, config: SampleCodesConfig, guidance: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """DiT-space codes (B, N, C): ``clean`` noised to the schedule's level nearest ``sigma_target``, then the
    pipeline's guided Euler steps from there to 0. Returns the codes and the level used."""
    from dora_shapegen.diffusion.sampling import SamplingState, guided_sample, sampling_timesteps

    scheduler = pipe.scheduler
    timesteps = sampling_timesteps(scheduler, config.num_inference_steps, clean.shape[1], clean.device)
    # The levels scheduler.step integrates between (timesteps are these x num_train_timesteps): the code must be
    # noised to exactly the level the first step starts from.
    sigmas = scheduler.sigmas[: len(timesteps)].float().cpu()  # (T,) from ~1 down
    start = int(torch.argmin((sigmas - sigma_target).abs()))
    sigma = float(sigmas[start])
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)  # (B, N, C)
    noisy = (1.0 - sigma) * clean + sigma * noise.to(clean.device)  # (B, N, C): the flow's x_sigma
    scheduler.set_begin_index(start)  # the scheduler steps from this index, not from sigma = 1
    state = SamplingState(noisy, text)
    return guided_sample(pipe.transformer, scheduler, state, timesteps[start:], guidance), sigma  # (B, N, C)


@torch.no_grad()
def sample_codes(
    pipeline: str | Path | Any, shards: str | Path, out: str | Path, config: SampleCodesConfig | None = None
) -> dict[str, Any]:
    """Write OUT/codes.safetensors + codes.json (module docstring) and return the summary written to codes.json.

    ``pipeline``: a saved text-to-3D pipeline folder or a loaded ``DoraTextTo3DPipeline``; ``shards``: the latent
    cache its DiT was trained on."""
    from safetensors.torch import save_file

    from dora_shapegen.data.latent_shards import LatentStats, load_manifest
    from dora_shapegen.diffusion.sampling import encode_prompts, uses_guidance
    from dora_shapegen.diffusion.train_utils import load_latent_table
    from dora_shapegen.pipelines.pipeline_image_to_3d import DoraImageTo3DPipeline
    from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline

    config = config or SampleCodesConfig()
    check_config(config)
    from_folder = isinstance(pipeline, (str, Path))
    pipe = DoraTextTo3DPipeline.from_pretrained(str(pipeline)) if from_folder else pipeline
    where = str(pipeline) if from_folder else type(pipeline).__name__  # not a loaded pipeline's whole repr
    # An image pipeline is a DoraTextTo3DPipeline too, but its DiT reads image embeddings, which are not cached.
    if not isinstance(pipe, DoraTextTo3DPipeline) or isinstance(pipe, DoraImageTo3DPipeline):
        raise ValueError(f"{where}: sample-codes needs a text-to-3D pipeline, got {type(pipe).__name__}")
    if pipe.config.latent_mean is None:
        raise ValueError(f"{where}: the pipeline records no latent statistics (assemble it with --manifest)")
    stats = LatentStats(mean=np.asarray(pipe.config.latent_mean), std=np.asarray(pipe.config.latent_std))
    manifest = load_manifest(Path(shards))
    cached = LatentStats.from_manifest(manifest)
    # Mean and std both: the codes are denormalised with the pipeline's statistics (a cache of another channel
    # count must give this message too, not numpy's broadcasting error).
    if cached.mean.shape != stats.mean.shape or not (
        np.allclose(cached.mean, stats.mean, atol=1e-6) and np.allclose(cached.std, stats.std, atol=1e-6)
    ):
        raise ValueError(
            f"{shards}: not the latent cache this pipeline's DiT was trained on (other statistics)"
        )
    num_tokens = config.num_tokens or pipe.default_num_tokens
    guidance = pipe.default_guidance_scale if config.guidance_scale is None else float(config.guidance_scale)
    table = load_latent_table(shards, num_tokens, stats, held_out_fraction=config.held_out_fraction)
    device = pipe._execution_device
    dtype = next(pipe.transformer.parameters()).dtype  # a pipeline loaded in fp16/bf16 samples in its dtype
    clean = table.latents[:, 0].to(device=device, dtype=dtype)  # (S, N, C) DiT space: each shape's first view
    num_shapes = len(table)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    text_encoder = pipe.text_encoder_wrapper()
    codes, shape_index, levels, distances = [clean.cpu()], list(range(num_shapes)), [0.0] * num_shapes, []
    # One permutation per variant, cut into batches: every shape gets exactly one code per variant (a fresh
    # permutation per batch would give some shapes several and others none once there is more than one batch).
    batches = [
        rows
        for _ in range(config.variants)
        for rows in torch.randperm(num_shapes, generator=generator).split(config.batch_size)
    ]
    for rows in tqdm(batches, desc="sample-codes", unit="batch", disable=None):
        captions = [table.captions[i][int(rng.integers(len(table.captions[i])))] for i in rows.tolist()]
        text = encode_prompts(text_encoder, captions, guidance=uses_guidance(guidance), device=device)
        text = text.to(device, dtype)  # the DiT's dtype, as the pipeline's own denoising passes its streams
        target = float(rng.uniform(config.sigma_min, config.sigma_max))
        made, sigma = _denoise_from(pipe, clean[rows], text, target, config, guidance, generator)  # (B, N, C)
        codes.append(made.cpu())
        shape_index += rows.tolist()
        levels += [sigma] * len(rows)
        distances += (made.float() - clean[rows].float()).pow(2).mean(dim=(1, 2)).sqrt().tolist()  # RMS, stds
    dit_space = torch.cat(codes)  # (P, N, C)
    vae_space = stats.denormalize(dit_space.double()).to(torch.float16)  # (P, N, C): what the decoder reads
    by_level: dict[str, dict[str, float]] = {}
    generated_levels = np.asarray(levels[num_shapes:])
    for sigma in sorted(set(generated_levels.tolist())):
        picked = np.asarray(distances)[generated_levels == sigma]
        by_level[f"{sigma:.3f}"] = {"codes": int(len(picked)), "rms_distance_std": float(picked.mean())}
    summary = {
        "shape_ids": table.shape_ids,
        "num_codes": int(len(vae_space)),
        "num_shapes": num_shapes,
        "num_tokens": int(num_tokens),
        "guidance_scale": guidance,
        "settings": dict(vars(config)),
        "vae_weights_sha256": (manifest.get("vae") or {}).get("weights_sha256"),
        "distance_by_sigma": by_level,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "codes": vae_space.contiguous(),
        "shape_index": torch.tensor(shape_index, dtype=torch.int64),
        "sigma": torch.tensor(levels, dtype=torch.float32),
    }
    # Written under temporary names and renamed: an interrupted run never leaves a torn codes file.
    save_file(tensors, str(out / f"{CODES_FILE}.tmp"))
    (out / f"{CODES_INFO}.tmp").write_text(json.dumps(summary, indent=2))
    os.replace(out / f"{CODES_FILE}.tmp", out / CODES_FILE)
    os.replace(out / f"{CODES_INFO}.tmp", out / CODES_INFO)
    for sigma, figures in by_level.items():
        logger.info(
            "sigma %s: %d codes, %.3f latent std from their source",
            sigma,
            figures["codes"],
            figures["rms_distance_std"],
        )
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora sample-codes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a saved text-to-3D pipeline folder")
    parser.add_argument("--shards", required=True, help="the latent cache its DiT was trained on")
    parser.add_argument("--out", required=True, help="output folder (codes.safetensors + codes.json)")
    parser.add_argument("--config", default=None, help="YAML with SampleCodesConfig keys")
    parser.add_argument("--variants", type=cli_types.positive_int, default=None, help="codes per shape")
    parser.add_argument("--steps", type=cli_types.positive_int, default=None, help="num_inference_steps")
    parser.add_argument("--seed", type=cli_types.seed, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dora_shapegen.config import load_config

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {
        key: value
        for key, value in (
            ("variants", args.variants),
            ("num_inference_steps", args.steps),
            ("seed", args.seed),
        )
        if value is not None
    }
    try:
        if args.config:
            config = load_config(SampleCodesConfig, args.config, overrides)
        else:
            config = SampleCodesConfig(**overrides)
        for flag, path in (("--pipeline", args.pipeline), ("--shards", args.shards)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path} does not exist")
        summary = sample_codes(args.pipeline, args.shards, args.out, config)
    except (ValueError, FileNotFoundError) as error:
        print(f"dora sample-codes: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['num_codes']} codes of {summary['num_shapes']} shapes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

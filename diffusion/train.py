"""`dora train-dit`: train the ShapeDiT on cached VAE latents with accelerate, conditioned on text, an image or
both (``condition``).

Objective: rectified flow with the conventions of diffusers' ``FlowMatchEulerDiscreteScheduler`` (see
``diffusion/flow_matching.py``): ``x_t = (1 - s) x0 + s noise``, target ``v = noise - x0``, s from diffusers'
logit-normal timestep density, per-sample caption dropout for classifier-free guidance. Latents are normalised
with the cache manifest's per-channel statistics. Progressive token lengths: the cached tokens are in FPS order, so
a step trains on the prefix ``latents[:, :k]`` with k drawn from the ``schedule:`` section (the VAE's
``TokenSchedule``: a function of (seed, step), identical on every rank, as DDP needs equal shapes).

This module is the DiT's part, read top to bottom as the VAE's is: cache and model (``load_cache``,
``build_model``), the loss of one micro-batch (``compute_loss``) and export; ``train`` wires them, with the run
config (``diffusion/train_config.py``), the data (``build_data``, ``batch_source`` in ``diffusion/train_utils.py``)
and the previews of ``diffusion/sampling_preview.py``, into the shared training core, ``training/loop.py``
(accelerate, optimizer, EMA, budgets, checkpoints, logging). What an image / both run does differently at each of
these points is in ``diffusion/train_image.py``. Randomness of a micro-step (noise, timesteps, caption dropout,
caption/view choice) comes from generators seeded by (seed, micro-step, rank), and in-memory batches are a
function of the micro-step (see train_utils), so a run resumed from a checkpoint reproduces an uninterrupted one.
The same script runs one CPU process (fp32) or many GPUs / nodes (bf16) under ``accelerate launch`` unchanged;
see docs/SCALING.md.

Outputs in OUT: ``checkpoints/checkpoint-<step>/`` (accelerate ``save_state``: model, optimizer, LR scheduler,
RNG, + ema.safetensors/ema.json, train_state.json and config.yaml), ``logs/`` (tensorboard), ``samples/*.png``
(preview grids), ``final/`` (EMA weights via ``save_pretrained`` + run_config.yaml + latent_stats.json +
scheduler/), ``summary.json``.
"""

from __future__ import annotations

import os

from dora_shapegen.runtime import omp_wait_policy_environment  # light: no torch

# Before torch loads OpenMP (only effective when this module is imported first, as `dora train-dit` does): sleeping
# OpenMP workers when other work shares the cores, spinning ones when they are free (dora_shapegen.runtime).
os.environ.update(omp_wait_policy_environment())

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dora_shapegen.config import save_yaml, to_dict
from dora_shapegen.diffusion.train_config import (  # noqa: F401  (re-exported: the config's old import path)
    DataConfig,
    DiTTrainConfig,
    SamplingConfig,
    TrainingConfig,
    sampling_shift,
)
from dora_shapegen.errors import ConfigError
from dora_shapegen.training.config import add_run_arguments, load_run_config
from dora_shapegen.training.schedules import TokenSchedule

if TYPE_CHECKING:
    from dora_shapegen.training.loop import StepContext

logger = logging.getLogger("dora.train_dit")


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: torch.nn.Module  # the trained (non-EMA) replica of this process
    ema: Any | None


def check_compatibility(
    model_config: Any,
    manifest: dict[str, Any],
    encoder: Any,
    schedule: TokenSchedule,
    shards: str,
    condition: str = "text",
    image_encoder: Any = None,
) -> None:
    """Clear errors for a DiT config that cannot train on this cache / with these conditioners."""
    channels = manifest.get("latent_channels") or len(manifest["stats"]["mean"])
    if model_config.in_channels != channels:
        raise ConfigError(
            f"{shards}: cached latents have {channels} channels but model.in_channels is "
            f"{model_config.in_channels}; set model.in_channels: {channels} in the DiT config"
        )
    cached = manifest.get("num_tokens")
    if cached is not None and schedule.max_tokens > int(cached):
        raise ConfigError(
            f"{shards}: the token schedule asks for up to {schedule.max_tokens} tokens but only "
            f"{cached} are cached; lower schedule tokens or re-cache with --num-tokens"
        )
    if condition != "text":
        from dora_shapegen.diffusion.train_image import check_image_cache

        check_image_cache(model_config, manifest, shards, condition, encoder, image_encoder)
        return
    if encoder.hidden_size != model_config.cross_attention_dim:
        raise ConfigError(
            f"text encoder gives {encoder.hidden_size}-d tokens but model.cross_attention_dim is "
            f"{model_config.cross_attention_dim}"
        )
    if (
        model_config.pooled_projection_dim is not None
        and encoder.pooled_size != model_config.pooled_projection_dim
    ):
        raise ConfigError(
            f"text encoder gives a {encoder.pooled_size}-d pooled vector but "
            f"model.pooled_projection_dim is {model_config.pooled_projection_dim}"
        )


# ------------------------------------------------------------------------------------------- cache, model
def load_cache(config: DiTTrainConfig, vae_dir: str | None) -> tuple[DiTTrainConfig, dict[str, Any]]:
    """The latent cache's manifest, checked against the previews' VAE; a fine-tuning run's config and the base's
    latent statistics (``diffusion/finetune.py``)."""
    from dora_shapegen.data.latent_shards import load_manifest
    from dora_shapegen.diffusion.finetune import prepare_finetune
    from dora_shapegen.diffusion.train_image import check_init_condition
    from dora_shapegen.provenance import check_vae_identity

    manifest = load_manifest(config.data.shards)
    if vae_dir:  # previews decode these latents: only through the VAE that cached them
        check_vae_identity(manifest, vae_dir, f"{config.data.shards} with --vae")
    check_init_condition(config)  # a fine-tuned DiT keeps its conditioning
    return prepare_finetune(config, manifest, config.data.shards)  # init_from / LoRA; base latent stats


def build_model(
    config: DiTTrainConfig,
    manifest: dict[str, Any],
    text_encoder: Any,
    schedule: TokenSchedule,
    image_encoder: Any = None,
) -> Any:
    """The ShapeDiT (random, or init_from's weights, with LoRA adapters when asked), checked against the cache and
    the conditioners. Seed torch first: every rank must build the same weights. With an image encoder that trains
    (the RenderEncoder outside a LoRA run) the two come back as one module, ``ImageConditionedDiT``, so the
    optimizer, DDP, the EMA and checkpoints cover both."""
    from dora_shapegen.diffusion.finetune import build_dit
    from dora_shapegen.diffusion.train_image import with_image_encoder

    model = build_dit(config)
    check_compatibility(
        model.config, manifest, text_encoder, schedule, config.data.shards, config.condition, image_encoder
    )
    if config.training.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return with_image_encoder(model, image_encoder, config.condition)


# --------------------------------------------------------------------------------------------------- loss
def compute_loss(
    model: Any,
    batch: dict[str, Any],
    context: StepContext,
    captions: Any,
    training: TrainingConfig,
    use_pooled: bool,
    images: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rectified flow on the FPS prefix of ``context.num_tokens`` tokens (a coarse cover of the shape); the noise,
    timesteps and caption dropout come from the micro-step's generator (on the training device). ``use_pooled``:
    the model takes the pooled text vector. ``images``: the ``ImageConditioning`` of an image / both run (None
    for text). Returns the loss and the values to log as tensors (the core averages them on the device, with no
    host sync per micro-step)."""
    from dora_shapegen.diffusion.flow_matching import (
        add_noise,
        drop_captions,
        flow_matching_loss,
        sample_timesteps,
        velocity_target,
    )

    generator, device = context.generator, context.generator.device
    latents = batch["latents"][:, : context.num_tokens].to(device)  # (B,k,C)
    noise = torch.randn(latents.shape, generator=generator, device=device)  # (B,k,C)
    sigmas, timesteps = sample_timesteps(
        latents.shape[0],
        training.timestep_sampling,
        generator,
        device,
        training.logit_mean,
        training.logit_std,
        training.mode_scale,
        training.scheduler_shift,
    )  # (B,), (B,)
    if images is not None:
        prediction = images.predict(
            model, batch, add_noise(latents, noise, sigmas), timesteps, generator, captions
        )
    else:
        text = captions(drop_captions(batch["caption"], training.caption_dropout, generator))
        prediction = model(
            add_noise(latents, noise, sigmas),
            timesteps,
            text.hidden_states,
            encoder_attention_mask=text.attention_mask,
            pooled_projections=text.pooled if use_pooled else None,
            return_dict=False,
        )[0]
    loss = flow_matching_loss(prediction, velocity_target(latents, noise), training.loss_weighting, sigmas)
    return loss, {"loss": loss}


# -------------------------------------------------------------------------------------------------- export
def export_final(
    model: Any, ema: Any, directory: Path, config: DiTTrainConfig, manifest: dict[str, Any]
) -> None:
    """EMA weights via ``save_pretrained`` + run config + latent statistics + the scheduler, in one folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dora_shapegen.diffusion.conditioning import ImageConditionedDiT
    from dora_shapegen.diffusion.finetune import save_adapter
    from dora_shapegen.diffusion.train_image import save_image_model
    from dora_shapegen.training.ema import ema_weights

    if config.lora.rank > 0:
        save_adapter(model, directory)  # the adapter only: the base stays in init_from
    elif isinstance(model, ImageConditionedDiT):  # the DiT and the image encoder trained with it, both EMA
        save_image_model(model, ema, directory)
    else:
        with ema_weights(model, ema):
            model.save_pretrained(str(directory))
    save_yaml(to_dict(config), directory / "run_config.yaml")
    stats = {
        "stats": manifest["stats"],
        "latent_channels": manifest.get("latent_channels"),
        "num_tokens": manifest.get("num_tokens"),
        "vae": manifest.get("vae", {}).get("path"),
        "vae_sha256": manifest.get("vae", {}).get("weights_sha256"),
        "shards": manifest.get("base_url"),
    }
    (directory / "latent_stats.json").write_text(json.dumps(stats, indent=2))
    # The sampling shift (sampling.scheduler_shift, else the training one): `dora assemble-pipeline` takes this
    # scheduler, so the pipeline samples as the run's previews did.
    FlowMatchEulerDiscreteScheduler(shift=sampling_shift(config)).save_pretrained(
        str(directory / "scheduler")
    )


# ---------------------------------------------------------------------------------------------------- train
def train(
    config: DiTTrainConfig,
    output_dir: str | Path,
    resume: str | None = None,
    max_minutes: float | None = None,
    vae_dir: str | None = None,
) -> TrainResult:
    """Train, checkpoint, preview and export; returns the summary and this process's model."""
    from dora_shapegen.diffusion.conditioning import check_condition, uses_images, uses_text
    from dora_shapegen.diffusion.finetune import register_lora_checkpointing
    from dora_shapegen.diffusion.sampling_preview import build_previews, log_preview
    from dora_shapegen.diffusion.text_encoder import TextEncoder
    from dora_shapegen.diffusion.train_image import ImageConditioning, build_image_encoder
    from dora_shapegen.diffusion.train_utils import batch_source, build_data
    from dora_shapegen.provenance import check_resume_provenance
    from dora_shapegen.training.loop import Trainer

    output_dir = Path(output_dir)
    tcfg = config.training
    trainer = Trainer(tcfg, output_dir, "dit", logger, max_minutes)
    config, manifest = load_cache(config, vae_dir)
    sampling_shift(config)  # a bad shift fails here, not at the export after training
    schedule = TokenSchedule(config.schedule, seed=tcfg.seed)
    condition = check_condition(config.condition)
    text_encoder = None
    if uses_text(condition):
        text_encoder = TextEncoder.from_name(config.text_encoder, max_length=tcfg.text_max_length)
        text_encoder.model.to(trainer.device)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    image_encoder = build_image_encoder(config).to(trainer.device) if uses_images(condition) else None
    model = build_model(config, manifest, text_encoder, schedule, image_encoder)
    use_pooled = model.config.pooled_projection_dim is not None
    data = build_data(config, manifest, schedule, text_encoder, trainer)

    model, _ = trainer.prepare(model)
    images = None  # an image / both run's side of the step (diffusion/train_image.py)
    if image_encoder is not None:
        images = ImageConditioning(condition, image_encoder, trainer.unwrapped, tcfg)
    if config.lora.rank > 0:  # checkpoints hold the adapter, not the frozen base
        register_lora_checkpointing(trainer.accelerator, trainer.unwrapped)
    resumed_from = trainer.resume(
        resume, check=lambda checkpoint: check_resume_provenance(checkpoint, config)
    )
    state = trainer.state
    trainer.start(config)
    previews = None
    if trainer.is_main_process:
        previews = build_previews(
            config, text_encoder, data.stats, schedule, vae_dir, trainer, image_encoder, data.preview_renders
        )
        logger.info(
            "%d shapes, condition %s, %d cached captions, %s on %s x%d, %d parameters",
            data.num_shapes,
            condition,
            len(data.captions or {}),
            trainer.precision,
            trainer.device.type,
            trainer.accelerator.num_processes,
            sum(p.numel() for p in trainer.unwrapped.parameters()),
        )

    trainer.fit(
        lambda batch, context: compute_loss(model, batch, context, data.captions, tcfg, use_pooled, images),
        batch_source(config, data, schedule, trainer),
        schedule,
        evaluate=lambda step: log_preview(previews, trainer, f"step{step:07d}"),
        evaluate_every=config.sampling.every_steps,
    )

    last_checkpoint = trainer.save_checkpoint()
    history = state["history"]["loss"]
    summary = {
        "steps": state["global_step"],
        "micro_steps": state["micro_step"],
        "resumed_from_step": resumed_from,
        "stopped_by_time": trainer.out_of_time,
        "minutes": trainer.minutes(),
        "num_shapes": data.num_shapes,
        "num_processes": trainer.accelerator.num_processes,
        "condition": condition,
        "cached_captions": len(data.captions or {}),
        "final_loss": history[-1][1] if history else None,
        "checkpoint": str(last_checkpoint),
        "export": str(output_dir / "final"),
    }
    if trainer.is_main_process:
        if config.sampling.final:
            log_preview(previews, trainer, f"final_step{state['global_step']:07d}")
        export_final(trainer.unwrapped, trainer.ema, output_dir / "final", config, manifest)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.end()
    return TrainResult(summary, trainer.unwrapped, trainer.ema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora train-dit", description=__doc__.split("\n\n")[0])
    add_run_arguments(
        parser,
        "dit",
        "configs/dit/small.yaml",
        "checkpoint, preview and export",
        "fine-tune: start from this trained DiT folder (e.g. an earlier run's final/)",
    )
    parser.add_argument(
        "--shards", default=None, help="latent cache folder with manifest.json (overrides data.shards)"
    )
    parser.add_argument(
        "--vae", default=None, help="DoraVAE folder: preview samples are decoded to meshes + PNG"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config, output_dir = load_run_config(DiTTrainConfig, args, {"data.shards": args.shards})
    result = train(config, output_dir, resume=args.resume, max_minutes=args.max_minutes, vae_dir=args.vae)
    print(json.dumps(result.summary, indent=2))
    return 0


if __name__ == "__main__":  # torchrun / accelerate launch -m dora_shapegen.diffusion.train: an entry point
    from dora_shapegen.runtime import flush_denormals

    flush_denormals()  # denormals slow the CPU several-fold (see core/runtime.py)
    from dora_shapegen.errors import run_reporting_errors

    raise SystemExit(run_reporting_errors(main))  # one-line errors, as `dora` prints them

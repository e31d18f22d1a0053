"""`dora train-dit`: train the text-conditioned ShapeDiT on cached VAE latents with accelerate.

Objective: rectified flow with the conventions of diffusers' ``FlowMatchEulerDiscreteScheduler`` (see
``diffusion/flow_matching.py``): ``x_t = (1 - s) x0 + s noise``, target ``v = noise - x0``, s from diffusers'
logit-normal timestep density, per-sample caption dropout for classifier-free guidance. Latents are normalised
with the cache manifest's per-channel statistics. Progressive token lengths: the cached tokens are in FPS order, so
a step trains on the prefix ``latents[:, :k]`` with k drawn from the ``schedule:`` section (the VAE's
``TokenSchedule``: a function of (seed, step), identical on every rank, as DDP needs equal shapes).

Randomness of a micro-step (noise, timesteps, caption dropout, caption/view choice) comes from generators seeded
by (seed, micro-step, rank), and in-memory batches are a function of the micro-step (see train_utils), so a run
resumed from a checkpoint reproduces an uninterrupted one. The same script runs one CPU process (fp32) or many
GPUs / nodes (bf16) under ``accelerate launch`` unchanged; see the README's scaling section.

Outputs in OUT: ``checkpoints/checkpoint-<step>/`` (accelerate ``save_state``: model, optimizer, LR scheduler,
RNG, EMA via save hooks, + train_state.json and config.yaml), ``logs/`` (tensorboard), ``samples/*.png`` (preview
grids), ``final/`` (EMA weights via ``save_pretrained`` + run_config.yaml + latent_stats.json + scheduler/),
``summary.json``.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (only effective when this module is imported first, as `dora train-dit` does): idle
# OpenMP workers sleep instead of spinning. On a CPU shared with other processes spinning workers stall each other
# at every op; measured on 2 busy cores (load ~6): a step of batch 32 x 32 tokens took 12-19 s with 2 spinning
# threads and 0.3 s with PASSIVE. On an idle machine it costs nothing noticeable. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.config import load_config, save_yaml, to_dict
from diffusion.finetune import LoraConfig
from diffusion.text_encoder import DEFAULT_TEXT_ENCODER
from vae.schedules import ScheduleConfig, TokenSchedule

logger = logging.getLogger("dora.train_dit")


@dataclass
class DataConfig:
    shards: str = "runs/latents"   # latent cache folder (manifest.json + shards) or manifest URL; --shards wins
    in_memory: bool = True         # read the whole cache once (small caches); false = stream resampled shards
    batch_size: int = 32           # per process and micro-step
    num_workers: int = 2           # streaming only: DataLoader workers
    shuffle_buffer: int = 1000     # streaming only: samples in webdataset's shuffle buffer


@dataclass
class TrainingConfig:
    max_steps: int = 2000                # optimizer steps
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    lr_scheduler: str = "cosine"         # any diffusers.optimization.get_scheduler name
    warmup_steps: int = 100
    max_grad_norm: float = 1.0           # 0 disables clipping
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"        # auto = bf16 on CUDA, fp32 ("no") on CPU; or no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    caption_dropout: float = 0.1         # per-sample probability of training on "" (classifier-free guidance)
    timestep_sampling: str = "logit_normal"   # logit_normal | mode | uniform (diffusers.training_utils)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    scheduler_shift: float = 1.0         # FlowMatchEulerDiscreteScheduler shift, used in training and exported
    loss_weighting: str = "none"         # none | sigma_sqrt | cosmap (diffusers' SD3 weightings)
    use_ema: bool = True
    ema_decay: float = 0.999
    checkpoint_every: int = 500          # optimizer steps; 0 = only at the end
    checkpoints_total_limit: int = 3
    log_every: int = 10
    text_max_length: int = 77


@dataclass
class SamplingConfig:
    every_steps: int = 0                 # preview every N steps (0 = only at the end)
    final: bool = True                   # preview after training
    prompts: list[str] = field(default_factory=list)   # empty = the first prompt of num_prompts categories
    num_prompts: int = 8
    num_tokens: int | None = None        # None = the schedule's largest token count
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    mesh_resolution: int = 64
    seed: int = 0


@dataclass
class DiTTrainConfig:
    text_encoder: str = DEFAULT_TEXT_ENCODER            # TextEncoder.from_name argument (frozen)
    model: dict[str, Any] = field(default_factory=dict)  # passed unchanged to ShapeDiT(**model)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    init_from: str | None = None         # fine-tune a trained DiT folder (diffusion/finetune.py); --init-from
    init_from_sha256: dict[str, str] | None = None   # recorded by the run: sha256 of that folder's weight files
    lora: LoraConfig = field(default_factory=LoraConfig)   # rank > 0: train LoRA adapters only (needs init_from)


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: torch.nn.Module                # the trained (non-EMA) replica of this process
    ema: Any | None


def _flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat_hparams(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def check_compatibility(model_config: Any, manifest: dict[str, Any], encoder: Any, schedule: TokenSchedule,
                        shards: str) -> None:
    """Clear errors for a DiT config that cannot train on this cache / with this text encoder."""
    channels = manifest.get("latent_channels") or len(manifest["stats"]["mean"])
    if model_config.in_channels != channels:
        raise ValueError(f"{shards}: cached latents have {channels} channels but model.in_channels is "
                         f"{model_config.in_channels}; set model.in_channels: {channels} in the DiT config")
    cached = manifest.get("num_tokens")
    if cached is not None and schedule.max_tokens > int(cached):
        raise ValueError(f"{shards}: the token schedule asks for up to {schedule.max_tokens} tokens but only "
                         f"{cached} are cached; lower schedule tokens or re-cache with --num-tokens")
    if encoder.hidden_size != model_config.cross_attention_dim:
        raise ValueError(f"text encoder gives {encoder.hidden_size}-d tokens but model.cross_attention_dim is "
                         f"{model_config.cross_attention_dim}")
    if model_config.pooled_projection_dim is not None and encoder.pooled_size != model_config.pooled_projection_dim:
        raise ValueError(f"text encoder gives a {encoder.pooled_size}-d pooled vector but "
                         f"model.pooled_projection_dim is {model_config.pooled_projection_dim}")


def export_final(model: Any, ema: Any, directory: Path, config: DiTTrainConfig, manifest: dict[str, Any]) -> None:
    """EMA weights via ``save_pretrained`` + run config + latent statistics + the scheduler, in one folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion.finetune import save_adapter
    from diffusion.train_utils import ema_weights

    if config.lora.rank > 0:
        save_adapter(model, directory)  # the adapter only: the base stays in init_from
    else:
        with ema_weights(model, ema):
            model.save_pretrained(str(directory))
    save_yaml(to_dict(config), directory / "run_config.yaml")
    stats = {"stats": manifest["stats"], "latent_channels": manifest.get("latent_channels"),
             "num_tokens": manifest.get("num_tokens"), "vae": manifest.get("vae", {}).get("path"),
             "vae_sha256": manifest.get("vae", {}).get("weights_sha256"), "shards": manifest.get("base_url")}
    (directory / "latent_stats.json").write_text(json.dumps(stats, indent=2))
    FlowMatchEulerDiscreteScheduler(shift=config.training.scheduler_shift).save_pretrained(str(directory / "scheduler"))


def train(config: DiTTrainConfig, output_dir: str | Path, resume: str | None = None,
          max_minutes: float | None = None, vae_dir: str | None = None) -> TrainResult:
    """Train, checkpoint, preview and export; returns the summary and this process's model."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from data.latent_shards import LatentStats, load_manifest
    from diffusion.finetune import build_dit, prepare_finetune, register_lora_checkpointing
    from diffusion.flow_matching import (
        add_noise,
        drop_captions,
        flow_matching_loss,
        sample_timesteps,
        velocity_target,
    )
    from diffusion.modeling_shape_dit import ShapeDiT
    from diffusion.sampling_preview import default_prompts, render_preview
    from diffusion.text_encoder import TextEncoder
    from diffusion.train_utils import (
        CaptionEmbeddingCache,
        InMemoryBatches,
        ema_weights,
        find_checkpoint,
        is_multi_cpu_run,
        load_latent_table,
        read_train_state,
        register_ema_checkpointing,
        streaming_batches,
        warn_cut_by_time,
    )
    from vae.provenance import check_resume_provenance, check_vae_identity

    started = time.monotonic()
    output_dir = Path(output_dir)
    tcfg, dcfg, scfg = config.training, config.data, config.sampling
    precision = tcfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"  # bf16 on CPU is far slower than fp32
    accelerator = Accelerator(
        cpu=is_multi_cpu_run(), mixed_precision=precision, gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    manifest = load_manifest(dcfg.shards)
    if vae_dir:  # previews decode these latents: only through the VAE that cached them
        check_vae_identity(manifest, vae_dir, f"{dcfg.shards} with --vae")
    config, manifest = prepare_finetune(config, manifest, dcfg.shards)  # init_from / LoRA; base latent stats
    stats = LatentStats.from_manifest(manifest)
    schedule = TokenSchedule(config.schedule, seed=tcfg.seed)
    text_encoder = TextEncoder.from_name(config.text_encoder, max_length=tcfg.text_max_length)
    text_encoder.model.to(device)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_dit(config)
    check_compatibility(model.config, manifest, text_encoder, schedule, dcfg.shards)
    if tcfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    use_pooled = model.config.pooled_projection_dim is not None

    # Every unique caption is encoded once, up front (in-memory) or on first sight (streaming).
    captions = CaptionEmbeddingCache(text_encoder, device)
    if dcfg.in_memory:
        table = load_latent_table(dcfg.shards, schedule.max_tokens, stats)
        batches = InMemoryBatches(table, dcfg.batch_size, tcfg.seed, rank, world)
        captions.precompute([c for shape in table.captions for c in shape] + [""])
        num_shapes = len(table)
    else:
        captions.precompute([""])
        num_shapes = int(manifest.get("num_samples", 0))

    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or the LoRA layers only
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas),
                                  weight_decay=tcfg.weight_decay)
    # A prepared scheduler steps once per process per optimizer step: scale like diffusers' example scripts.
    lr_scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps * world,
                                 num_training_steps=tcfg.max_steps * world)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if config.lora.rank > 0:
        register_lora_checkpointing(accelerator, unwrapped)  # checkpoints hold the adapter, not the frozen base
    ema = None
    if tcfg.use_ema:
        ema = EMAModel(unwrapped.parameters(), decay=tcfg.ema_decay, model_cls=ShapeDiT,
                       model_config=unwrapped.config)
        ema.to(device)
        register_ema_checkpointing(accelerator, ema, ShapeDiT)

    state: dict[str, Any] = {"global_step": 0, "micro_step": 0, "history": []}
    checkpoint = find_checkpoint(output_dir, resume) if resume else None
    resumed_from = None
    if checkpoint is not None:
        check_resume_provenance(checkpoint, config)
        accelerator.load_state(str(checkpoint))
        state = read_train_state(checkpoint)
        resumed_from = state["global_step"]
        logger.info("resumed from %s at step %d", checkpoint, resumed_from)
    elif resume:
        logger.warning("--resume %s: no checkpoint under %s, starting from scratch", resume, output_dir)
    stream = None
    if not dcfg.in_memory:
        stream = streaming_batches(dcfg.shards, schedule.max_tokens, stats, dcfg.batch_size,
                                   tcfg.seed * 1_009 + state["global_step"], dcfg.shuffle_buffer, dcfg.num_workers)

    vae = None
    prompts = list(scfg.prompts) or default_prompts(scfg.num_prompts)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("dora_dit", config=_flat_hparams(to_dict(config)))
        save_yaml(to_dict(config), output_dir / "run_config.yaml")
        if vae_dir:
            from vae.modeling_dora_vae import DoraVAE

            vae = DoraVAE.from_pretrained(vae_dir).to(device).eval()
        logger.info("%d shapes, %d cached captions, %s on %s x%d, %d parameters", num_shapes, len(captions),
                    precision, device.type, world, sum(p.numel() for p in unwrapped.parameters()))

    def preview(tag: str) -> None:
        if not prompts:
            return
        with ema_weights(unwrapped, ema):
            metrics = render_preview(
                unwrapped, text_encoder, prompts, stats, output_dir / "samples" / f"{tag}.png",
                scfg.num_tokens or schedule.max_tokens, scfg.num_inference_steps, scfg.guidance_scale,
                tcfg.scheduler_shift, scfg.seed, vae, scfg.mesh_resolution)
        accelerator.log(metrics, step=state["global_step"])

    def save_checkpoint() -> Path:
        directory = output_dir / "checkpoints" / f"checkpoint-{state['global_step']}"
        accelerator.save_state(str(directory))  # + EMA through the registered hook
        if accelerator.is_main_process:
            (directory / "train_state.json").write_text(json.dumps(state))
            save_yaml(to_dict(config), directory / "config.yaml")
            old = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            for stale in old[: max(len(old) - tcfg.checkpoints_total_limit, 0)]:
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return directory

    progress = tqdm(total=tcfg.max_steps, initial=state["global_step"], desc="train-dit",
                    disable=not accelerator.is_local_main_process)
    model.train()
    running = torch.zeros(2, device=device)  # (loss sum, count) since the last log
    out_of_time = False
    while state["global_step"] < tcfg.max_steps and not out_of_time:
        micro = state["micro_step"]
        step_seed = (tcfg.seed * 1_000_003 + micro) * 1_009 + rank  # distinct per rank, replayed on resume
        data_generator = torch.Generator().manual_seed(step_seed)
        generator = torch.Generator(device).manual_seed(step_seed)
        batch = batches.batch(micro, data_generator) if stream is None else next(stream)
        num_tokens = schedule.sample(state["global_step"])
        with accelerator.accumulate(model):
            latents = batch["latents"][:, :num_tokens].to(device)  # (B,k,C): an FPS prefix = coarse cover
            noise = torch.randn(latents.shape, generator=generator, device=device)  # (B,k,C)
            sigmas, timesteps = sample_timesteps(
                latents.shape[0], tcfg.timestep_sampling, generator, device, tcfg.logit_mean, tcfg.logit_std,
                tcfg.mode_scale, tcfg.scheduler_shift)  # (B,), (B,)
            text = captions(drop_captions(batch["caption"], tcfg.caption_dropout, generator))
            prediction = model(add_noise(latents, noise, sigmas), timesteps, text.hidden_states,
                               encoder_attention_mask=text.attention_mask,
                               pooled_projections=text.pooled if use_pooled else None, return_dict=False)[0]
            loss = flow_matching_loss(prediction, velocity_target(latents, noise), tcfg.loss_weighting, sigmas)
            accelerator.backward(loss)
            if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state["micro_step"] += 1
        running += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        if not accelerator.sync_gradients:
            continue
        state["global_step"] += 1
        if ema is not None:
            ema.step(unwrapped.parameters())
        step = state["global_step"]
        progress.update(1)
        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            total = accelerator.reduce(running, reduction="sum")  # every rank reaches this step together
            logs = {"loss": float(total[0] / total[1].clamp_min(1)), "lr": lr_scheduler.get_last_lr()[0],
                    "tokens": num_tokens, "epoch": batches.epoch_of(micro) if stream is None else 0}
            accelerator.log(logs, step=step)
            state["history"].append([step, logs["loss"]])
            progress.set_postfix(loss=f"{logs['loss']:.4f}", tokens=num_tokens)
            running.zero_()
        if max_minutes is not None:  # every rank must agree on stopping
            flag = torch.tensor(float(time.monotonic() - started > 60.0 * max_minutes), device=device)
            out_of_time = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        done = step >= tcfg.max_steps or out_of_time
        if not done and scfg.every_steps and step % scfg.every_steps == 0:
            if accelerator.is_main_process:
                preview(f"step{step:07d}")
            accelerator.wait_for_everyone()
        if not done and tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
            save_checkpoint()
    progress.close()
    if out_of_time and accelerator.is_main_process:
        warn_cut_by_time(logger, state["global_step"], tcfg.max_steps, max_minutes)

    last_checkpoint = save_checkpoint()
    summary = {"steps": state["global_step"], "micro_steps": state["micro_step"], "resumed_from_step": resumed_from,
               "stopped_by_time": out_of_time, "minutes": (time.monotonic() - started) / 60.0,
               "num_shapes": num_shapes, "num_processes": world, "cached_captions": len(captions),
               "final_loss": state["history"][-1][1] if state["history"] else None,
               "checkpoint": str(last_checkpoint), "export": str(output_dir / "final")}
    if accelerator.is_main_process:
        if scfg.final:
            preview(f"final_step{state['global_step']:07d}")
        export_final(unwrapped, ema, output_dir / "final", config, manifest)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(summary, unwrapped, ema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora train-dit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (e.g. configs/dit/small.yaml)")
    parser.add_argument("--shards", default=None, help="latent cache folder with manifest.json (overrides data.shards)")
    parser.add_argument("--vae", default=None, help="DoraVAE folder: preview samples are decoded to meshes + PNG")
    parser.add_argument("--output-dir", default=None, help="run folder (default runs/dit_<config name>)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget of this invocation: then checkpoint, preview and export")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="'latest' (newest checkpoint in the output dir) or a checkpoint folder")
    parser.add_argument("--seed", type=int, default=None, help="override training.seed")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune: start from this trained DiT folder (e.g. an earlier run's final/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.max_steps is not None:
        overrides["training.max_steps"] = args.max_steps
    if args.seed is not None:
        overrides["training.seed"] = args.seed
    if args.shards is not None:
        overrides["data.shards"] = args.shards
    if args.init_from is not None:
        overrides["init_from"] = args.init_from
    config = load_config(DiTTrainConfig, args.config, overrides)
    output_dir = args.output_dir or f"runs/dit_{Path(args.config).stem}"
    result = train(config, output_dir, resume=args.resume, max_minutes=args.max_minutes, vae_dir=args.vae)
    print(json.dumps(result.summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

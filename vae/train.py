"""`dora train-vae`: train the Dora VAE on prepared samples with the shared training core (``training/loop.py``).

This module is the VAE's part: its run config, the model, the data (a seeded per-epoch permutation that a resumed run
replays, ``vae/train_data.py``), the loss, validation (held-out IoU/Chamfer, ``vae/train_validation.py``) and the
exports (``final/``, ``best/``). The core runs the loop the same way on a laptop CPU (fp32) and under
``accelerate launch`` on several GPUs or nodes (bf16): every rank draws the same token count per step, per-step
randomness (posterior sampling) is seeded by (seed, micro-step, rank), so a resumed run matches an uninterrupted one
within float tolerance. Checkpoints: see ``training/checkpoints.py`` (EMA as safetensors + JSON, nothing pickled).
"""

from __future__ import annotations

import os

from dora_shapegen.runtime import omp_wait_policy_environment  # light: no torch

# OpenMP's wait policy before torch loads it (see dora_shapegen.runtime.omp_wait_policy_environment): for
# `python -m dora_shapegen.vae.train` / torchrun, where this module is imported before torch.
os.environ.update(omp_wait_policy_environment())

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dora_shapegen.config import save_yaml, to_dict
from dora_shapegen.errors import ConfigError
from dora_shapegen.training.config import LoopConfig, add_run_arguments, load_run_config
from dora_shapegen.training.schedules import ScheduleConfig

logger = logging.getLogger("dora.train_vae")

# DoraVAE config keys a fine-tuning run may change: token / input point counts and runtime switches. Width,
# heads, layers, latent channels, output type, epsilon, TSDF truncation, ... must match the init_from folder.
VAE_FREE_KEYS = frozenset(
    {
        "default_num_tokens",
        "max_train_tokens",
        "n_uniform",
        "n_salient",
        "gradient_checkpointing",
        "decode_chunk_size",
        "sample_posterior",
    }
)


@dataclass
class DataConfig:
    root: str = "runs/prepared"  # a `dora prepare` output folder (holds samples/*.npz)
    # Per-item subsampling of the stored point clouds; None = the model's n_uniform / n_salient (what the exported
    # config records as the point counts it was trained with).
    n_uniform: int | None = None
    n_salient: int | None = None
    n_supervision: int | None = None  # supervision points per item and step (None = all)
    val_fraction: float = 0.1  # held-out split by shape-id hash (fixed across runs)
    batch_size: int = 8  # per process
    num_workers: int = 0
    cache_in_memory: bool = False  # keep decoded samples in RAM (small data sets: no npz decode per step)
    # A `dora sample-codes` folder: train the decoder on the codes a DiT made from each training shape's cached
    # code (needs init_from and training.trainable: decoder); --codes wins. clean_code_fraction of the draws
    # decode the clean cached code instead, so reconstruction is kept.
    codes: str | None = None
    clean_code_fraction: float = 0.25


@dataclass
class TrainingConfig(LoopConfig):
    """The ``training:`` section: the core's keys (optimizer, precision, EMA, checkpoints, ...) + the loss."""

    # The three weights multiply per-GROUP mean losses, so they set each group's share of the loss whatever its
    # point count (configs/vae/small.yaml shows the per-point equivalent it uses).
    volume_weight: float = 1.0
    near_weight: float = 1.0
    sharp_weight: float = 2.0  # Dora weights the sharp-near term 2x
    kl_weight: float = 1e-3
    anchor_weight: float = 1.0  # models with local_attention: squared error of each token's xyz + normal
    sample_posterior: bool = (
        True  # False: decode the posterior mean (KL still regularises it); see small.yaml
    )
    latent_noise: float = 0.0  # decode codes + this x their per-channel std x N(0,1): robust to DiT errors
    # How the noise level is drawn per code: "fixed" (every code gets latent_noise) or "half_normal" (each code
    # of the batch gets latent_noise x |N(0, 1)|, as RAE's noise-augmented decoder: most codes see little noise,
    # so on-manifold detail is not blurred away the way one fixed level blurs thin parts).
    latent_noise_sampling: str = "fixed"
    # "decoder": train only the decoder (from init_from), the encoder frozen. The codes stay the ones the encoder
    # gave, so latents cached (and a DiT trained) on the init_from model stay valid for the fine-tuned one; with
    # latent_noise it teaches the decoder to read the perturbed codes a DiT samples.
    trainable: str = "all"


@dataclass
class ValidationConfig:
    every_steps: int = 500  # 0 = only at the end
    token_counts: list[int] = field(default_factory=lambda: [512])  # IoU during training
    final_token_counts: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    mesh_token_counts: list[int] = field(default_factory=lambda: [512])  # Chamfer + PNG (mesh extraction)
    mesh_every_validation: bool = True  # False: meshes/Chamfer/PNG only at the final validation (CPU budgets)
    best_metric_tokens: int = 512  # OUT/best = highest iou@this
    max_shapes: int = 16  # held-out shapes used (0 = all)
    mesh_shapes: int = 4
    mesh_resolution: int = 64
    chamfer_points: int = 4096
    use_ema: bool = True  # validate/export EMA weights when EMA is on


@dataclass
class VAETrainConfig:
    model: dict[str, Any] = field(default_factory=dict)  # passed unchanged to DoraVAE(**model)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    init_from: str | None = None  # start from a save_pretrained VAE folder (core/provenance.py); --init-from
    init_from_sha256: dict[str, str] | None = (
        None  # recorded by the run: sha256 of that folder's weight files
    )


# ----------------------------------------------------------------------------------------------------- loss
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def noise_levels(
    training: TrainingConfig, batch_size: int, generator: torch.Generator | None = None
) -> float | torch.Tensor:
    """The decoder's latent-noise level: a float for "fixed", else one level per code (B,)."""
    if training.latent_noise <= 0 or training.latent_noise_sampling == "fixed":
        return training.latent_noise
    if training.latent_noise_sampling == "half_normal":
        device = generator.device if generator is not None else "cpu"
        draws = torch.randn(batch_size, generator=generator, device=device)  # (B,)
        return training.latent_noise * draws.abs()
    raise ValueError(
        f"training.latent_noise_sampling must be 'fixed' or 'half_normal', got {training.latent_noise_sampling!r}"
    )


def compute_loss(
    model: Any,
    batch: dict[str, Any],
    num_tokens: int,
    output_type: str,
    training: TrainingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction (BCE on occupancy logits or MSE on TSDF) per supervision group, weighted, plus KL (and the
    anchor term of models with local attention)."""
    latent_noise = noise_levels(training, batch["sup_occupancy"].shape[0], generator)
    out = model(
        uniform=batch["uniform"],
        salient=batch["salient"],
        query_points=batch["sup_points"],
        num_tokens=num_tokens,
        sample_posterior=training.sample_posterior,
        generator=generator,
        latent_noise=latent_noise,
        latents=batch.get("codes"),  # (B, N, C) codes a DiT made (data.codes), decoded instead of encoding
    )
    raw = out["raw"].float()  # (B, M)
    if output_type == "occupancy":
        per_point = F.binary_cross_entropy_with_logits(raw, batch["sup_occupancy"].float(), reduction="none")
    elif output_type == "tsdf":
        per_point = F.mse_loss(raw, batch["sup_tsdf"].float(), reduction="none")
    else:
        raise ConfigError(f"model.output_type must be 'occupancy' or 'tsdf', got {output_type!r}")
    group = batch["sup_group"]  # (B, M): 0 volume, 1 near-surface, 2 sharp-near
    parts = {
        "volume": masked_mean(per_point, group == 0),
        "near": masked_mean(per_point, group == 1),
        "sharp": masked_mean(per_point, group == 2),
    }
    loss = (
        training.volume_weight * parts["volume"]
        + training.near_weight * parts["near"]
        + training.sharp_weight * parts["sharp"]
    )
    if "kl" in out:  # not when decoding given codes (the encoder is frozen then)
        parts["kl"] = out["kl"].float().mean()
        loss = loss + training.kl_weight * parts["kl"]
    if "anchor_loss" in out:  # local attention: each token learns where it sits (its FPS point)
        parts["anchor"] = out["anchor_loss"].float().mean()
        loss = loss + training.anchor_weight * parts["anchor"]
    # Tensors, not floats: the core sums them on the device (a .item() here would sync the host every micro-step).
    return loss, {f"loss/{k}": v.detach() for k, v in parts.items()} | {"loss/total": loss.detach()}


# ------------------------------------------------------------------------------------------- model, export
def build_model(config: VAETrainConfig) -> Any:
    from dora_shapegen.provenance import load_init_weights
    from dora_shapegen.vae.modeling_dora_vae import DoraVAE

    model = DoraVAE(**config.model)
    if config.init_from:  # config.model is already the folder's (resolve_init_from in train())
        load_init_weights(model, config.init_from)
    if config.training.trainable == "decoder":
        freeze_encoder(model)
    elif config.training.trainable != "all":
        raise ConfigError(f"training.trainable must be 'all' or 'decoder', got {config.training.trainable!r}")
    return model


# Everything up to the posterior (DoraVAE.__init__'s "Encoder." part); the decoder starts at post_kl.
ENCODER_MODULES = (
    "uniform_proj",
    "cross_attn_uniform",
    "salient_proj",
    "cross_attn_salient",
    "encoder_blocks",
    "encoder_norm_out",
    "pre_kl",
)


def freeze_encoder(model: Any) -> None:
    """requires_grad=False on the encoder's parameters (the optimizer takes only trainable ones)."""
    for name in ENCODER_MODULES:
        module = getattr(model, name)
        if module is not None:
            module.requires_grad_(False)


def with_codes(config: VAETrainConfig, train_set: Any, train_idx: list[int]) -> tuple[Any, list[int]]:
    """The training set with ``data.codes`` attached (see CodedItems), and the training shapes that have codes;
    a ConfigError when the codes cannot belong to this run."""
    from dora_shapegen.vae.train_data import CodedItems, CodeTable, shape_ids_of

    if config.training.trainable != "decoder" or not config.init_from:
        raise ConfigError(
            "data.codes trains the decoder on codes made in a frozen encoder's latent space: it needs "
            "--init-from (that VAE) and training.trainable: decoder"
        )
    if not 0.0 <= config.data.clean_code_fraction <= 1.0:
        raise ConfigError(
            f"data.clean_code_fraction must be in [0, 1], got {config.data.clean_code_fraction}"
        )
    table = CodeTable(config.data.codes)
    made_with = table.info.get("vae_weights_sha256")
    if made_with and config.init_from_sha256 and made_with != config.init_from_sha256:
        raise ConfigError(
            f"data.codes {config.data.codes}: made in the latent space of a VAE with weights {made_with}, but "
            f"--init-from {config.init_from} has {config.init_from_sha256}"
        )
    channels = config.model.get("latent_channels")  # the init_from folder's (resolve_init_from)
    if channels is not None and table.codes.shape[-1] != int(channels):
        raise ConfigError(
            f"data.codes {config.data.codes}: codes of {table.codes.shape[-1]} channels, but the VAE of --init-from "
            f"{config.init_from} has {channels} latent channels"
        )
    shape_ids = shape_ids_of(train_set)
    covered = [index for index in train_idx if table.covers(shape_ids[index])]
    if not covered:
        raise ConfigError(
            f"data.codes {config.data.codes}: no code for any training shape of {config.data.root}"
        )
    if len(covered) < len(train_idx):
        logger.warning(
            "data.codes %s: %d of %d training shapes have no code and are left out (first: %s)",
            config.data.codes,
            len(train_idx) - len(covered),
            len(train_idx),
            next(shape_ids[i] for i in train_idx if not table.covers(shape_ids[i])),
        )
    logger.info(
        "decoder trained on %d codes (%d shapes; %.0f%% of draws clean) from %s",
        len(table.codes),
        len(covered),
        100 * config.data.clean_code_fraction,
        config.data.codes,
    )
    return CodedItems(train_set, table, config.data.clean_code_fraction), covered


def export_model(
    model: Any, ema: Any, use_ema: bool, directory: Path, config: VAETrainConfig, metrics: dict[str, Any]
) -> None:
    """``save_pretrained`` (config.json + safetensors) + the full run config and metrics beside it."""
    from dora_shapegen.training.ema import ema_weights

    with ema_weights(model, ema if use_ema else None):
        model.save_pretrained(str(directory))
    save_yaml(to_dict(config), directory / "run_config.yaml")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))


# ----------------------------------------------------------------------------------------------------- train
def train(
    config: VAETrainConfig,
    output_dir: str | Path,
    resume: str | None = None,
    max_minutes: float | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Train, validate, checkpoint and export; returns a summary (steps, final metrics, paths)."""
    from dora_shapegen.provenance import check_resume_provenance, resolve_init_from
    from dora_shapegen.training.ema import ema_weights
    from dora_shapegen.training.loop import Trainer, loader_batches
    from dora_shapegen.training.schedules import TokenSchedule
    from dora_shapegen.vae.modeling_dora_vae import DoraVAE
    from dora_shapegen.vae.train_data import EpochPermutationSampler, SeededItems, build_datasets, collate
    from dora_shapegen.vae.train_validation import save_curves_png, save_reconstruction_png, validate

    started = time.monotonic()
    config = resolve_init_from(config, DoraVAE, VAE_FREE_KEYS)
    output_dir = Path(output_dir)
    tcfg, vcfg = config.training, config.validation
    trainer = Trainer(tcfg, output_dir, "vae", logger, max_minutes, started)
    accelerator = trainer.accelerator
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    schedule = TokenSchedule(config.schedule, seed=tcfg.seed)
    model = build_model(config)
    output_type = model.config.output_type
    train_set, val_set, train_idx, val_idx = build_datasets(config, data_root or config.data.root)
    if config.data.codes:
        train_set, train_idx = with_codes(config, train_set, train_idx)
    loader = torch.utils.data.DataLoader(
        SeededItems(train_set, train_idx),
        batch_size=config.data.batch_size,
        sampler=EpochPermutationSampler(len(train_idx), tcfg.seed),
        collate_fn=collate,
        num_workers=config.data.num_workers,
        drop_last=len(train_idx) >= config.data.batch_size,
    )
    model, loader = trainer.prepare(model, loader)
    unwrapped, ema = trainer.unwrapped, trainer.ema
    trainer.state |= {"best_metric": -1.0, "best_step": -1}
    trainer.resume(resume, check=lambda checkpoint: check_resume_provenance(checkpoint, config))
    state = trainer.state  # the counters, the loss and IoU history, the best metric (train_state.json)

    # Fixed draws: the same held-out point subsets at every validation and in every run.
    held_out_items = SeededItems(val_set, val_idx[: vcfg.max_shapes] if vcfg.max_shapes else val_idx)
    held_out = [held_out_items[(i, 12_345 + i)] for i in range(len(held_out_items))]
    data_epsilon = train_set[train_idx[0]]["meta"].get("epsilon") if len(train_idx) else None
    if data_epsilon is not None and abs(float(data_epsilon) - float(unwrapped.config.epsilon)) > 1e-9:
        logger.warning(
            "data prepared at epsilon=%g but model.epsilon=%g: set model.epsilon to the data's so the "
            "exported model records (and warns about) the right scale",
            data_epsilon,
            unwrapped.config.epsilon,
        )
    trainer.start(config)
    if trainer.is_main_process:
        logger.info(
            "%d training / %d held-out shapes; %s precision on %s",
            len(train_idx),
            len(val_idx),
            trainer.precision,
            accelerator.device,
        )

    def run_validation(token_counts: list[int], tag: str) -> dict[str, float]:
        step = state["global_step"]
        mesh_tokens = vcfg.mesh_token_counts if (tag == "final" or vcfg.mesh_every_validation) else []
        with ema_weights(unwrapped, ema if vcfg.use_ema else None):
            metrics, meshes = validate(
                unwrapped,
                held_out,
                token_counts,
                mesh_tokens,
                vcfg.mesh_resolution,
                vcfg.mesh_shapes,
                vcfg.chamfer_points,
                accelerator.device,
            )
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        for key, value in metrics.items():
            if key.startswith("iou@"):
                state["history"].setdefault(key, []).append([step, value])
        save_reconstruction_png(held_out, meshes, output_dir / "samples" / f"{tag}_step{step:07d}.png")
        save_curves_png(state["history"], output_dir / "curves.png")
        metric = metrics.get(f"iou@{vcfg.best_metric_tokens}", -1.0)
        if metric > state["best_metric"]:
            state["best_metric"], state["best_step"] = metric, step
            export_model(unwrapped, ema, vcfg.use_ema, output_dir / "best", config, metrics | {"step": step})
        logger.info("validation at step %d: %s", step, json.dumps(metrics))
        return metrics

    def loss_step(batch: dict[str, Any], context: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return compute_loss(model, batch, context.num_tokens, output_type, tcfg, context.generator)

    trainer.fit(
        loss_step,
        loader_batches(accelerator, loader),
        schedule,
        loss_key="loss/total",
        evaluate=lambda step: run_validation(vcfg.token_counts, "val"),
        evaluate_every=vcfg.every_steps,
    )

    final_metrics: dict[str, float] = {}
    if trainer.is_main_process and held_out:
        final_metrics = run_validation(vcfg.final_token_counts, "final")
    accelerator.wait_for_everyone()
    trainer.save_checkpoint()
    if trainer.is_main_process:
        export_model(
            unwrapped,
            ema,
            vcfg.use_ema,
            output_dir / "final",
            config,
            final_metrics | {"step": state["global_step"]},
        )
        save_curves_png(state["history"], output_dir / "curves.png")
        summary = {
            "steps": state["global_step"],
            "minutes": trainer.minutes(),
            "stopped_by_time": trainer.out_of_time,
            "final": final_metrics,
            "best_step": state["best_step"],
            "best_metric": state["best_metric"],
            "train_shapes": len(train_idx),
            "held_out_shapes": len(val_idx),
            "num_processes": accelerator.num_processes,
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.end()
    return {
        "steps": state["global_step"],
        "final": final_metrics,
        "output_dir": str(output_dir),
        "stopped_by_time": trainer.out_of_time,
        "num_processes": accelerator.num_processes,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora train-vae", description=__doc__.split("\n\n")[0])
    add_run_arguments(
        parser,
        "vae",
        "configs/vae/small.yaml",
        "stop, validate and export",
        "fine-tune: start from this save_pretrained VAE folder (its config is the model's)",
    )
    parser.add_argument("--data", default=None, help="prepared data folder (overrides data.root)")
    parser.add_argument(
        "--codes",
        default=None,
        help="a `dora sample-codes` folder: fine-tune the decoder on the codes a DiT made (overrides data.codes)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config, output_dir = load_run_config(
        VAETrainConfig, args, {"data.root": args.data, "data.codes": args.codes}
    )
    summary = train(config, output_dir, resume=args.resume, max_minutes=args.max_minutes)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # torchrun / accelerate launch -m dora_shapegen.vae.train: an entry point
    from dora_shapegen.runtime import flush_denormals

    flush_denormals()  # denormals slow the CPU several-fold (see core/runtime.py)
    from dora_shapegen.errors import run_reporting_errors

    raise SystemExit(run_reporting_errors(main))  # one-line errors, as `dora` prints them

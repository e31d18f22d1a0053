"""`dora train-vae`: train the Dora VAE on prepared samples with accelerate.

The same script runs on a laptop CPU (fp32) and under ``accelerate launch`` on several GPUs or nodes (bf16): every
rank draws the same token count per step (see ``vae/schedules.py``), data order is a seeded per-epoch permutation
that a resumed run replays (skipping the consumed batches), and per-step randomness (posterior sampling) is seeded by
(seed, step, rank), so a resumed run matches an uninterrupted one within float tolerance.

Checkpoints: ``accelerator.save_state`` (model safetensors, optimizer, LR scheduler, RNG) plus, written by us,
``train_state.json`` (step counters, best metric, curves), ``ema.safetensors`` and ``config.yaml``. We do not use
``register_for_checkpointing`` because accelerate 1.15 reloads such objects with ``torch.load(weights_only=False)``
(an unpickle), which the project rules forbid; EMA weights go to safetensors and counters to JSON instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data.config import load_config, save_yaml, to_dict
from vae.schedules import ScheduleConfig, TokenSchedule
from vae.train_data import EpochPermutationSampler, SeededItems, build_datasets, collate

logger = logging.getLogger("dora.train_vae")


@dataclass
class DataConfig:
    root: str = "runs/prepared"          # a `dora prepare` output folder (holds samples/*.npz)
    n_uniform: int | None = None         # per-item subsampling of the stored point clouds (None = all)
    n_salient: int | None = None
    n_supervision: int | None = None     # supervision points per item and step (None = all)
    val_fraction: float = 0.1            # held-out split by shape-id hash (fixed across runs)
    batch_size: int = 8                  # per process
    num_workers: int = 0
    cache_in_memory: bool = False        # keep decoded samples in RAM (small data sets: no npz decode per step)


@dataclass
class TrainingConfig:
    max_steps: int = 1000                # optimizer steps
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    lr_scheduler: str = "cosine"         # any diffusers.optimization scheduler name
    warmup_steps: int = 100
    max_grad_norm: float = 1.0           # 0 disables clipping
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"        # auto = bf16 on CUDA, fp32 ("no") on CPU (bf16 is ~45x slower there)
    seed: int = 0
    # The three weights multiply per-GROUP mean losses, so they set each group's share of the loss whatever its
    # point count (configs/vae/small.yaml shows the per-point equivalent it uses).
    volume_weight: float = 1.0
    near_weight: float = 1.0
    sharp_weight: float = 2.0            # Dora weights the sharp-near term 2x
    kl_weight: float = 1e-3
    anchor_weight: float = 1.0           # models with local_attention: squared error of each token's xyz + normal
    sample_posterior: bool = True        # False: decode the posterior mean (KL still regularises it); see small.yaml
    latent_noise: float = 0.0            # decode codes + this x their per-channel std x N(0,1): robust to DiT errors
    use_ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    log_every: int = 10


@dataclass
class ValidationConfig:
    every_steps: int = 500               # 0 = only at the end
    token_counts: list[int] = field(default_factory=lambda: [512])       # IoU during training
    final_token_counts: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    mesh_token_counts: list[int] = field(default_factory=lambda: [512])  # Chamfer + PNG (mesh extraction)
    mesh_every_validation: bool = True   # False: meshes/Chamfer/PNG only at the final validation (CPU budgets)
    best_metric_tokens: int = 512        # OUT/best = highest iou@this
    max_shapes: int = 16                 # held-out shapes used (0 = all)
    mesh_shapes: int = 4
    mesh_resolution: int = 64
    chamfer_points: int = 4096
    use_ema: bool = True                 # validate/export EMA weights when EMA is on


@dataclass
class VAETrainConfig:
    model: dict[str, Any] = field(default_factory=dict)   # passed unchanged to DoraVAE(**model)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    init_from: str | None = None         # start from a save_pretrained VAE folder (vae/provenance.py); --init-from
    init_from_sha256: dict[str, str] | None = None   # recorded by the run: sha256 of that folder's weight files


# ----------------------------------------------------------------------------------------------------- loss
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def compute_loss(model: Any, batch: dict[str, Any], num_tokens: int, output_type: str,
                 training: TrainingConfig, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (BCE on occupancy logits or MSE on TSDF) per supervision group, weighted, plus KL (and the
    anchor term of models with local attention)."""
    out = model(uniform=batch["uniform"], salient=batch["salient"], query_points=batch["sup_points"], num_tokens=num_tokens,
                sample_posterior=training.sample_posterior, generator=generator, latent_noise=training.latent_noise)
    raw = out["raw"].float()  # (B, M)
    if output_type == "occupancy":
        per_point = F.binary_cross_entropy_with_logits(raw, batch["sup_occupancy"].float(), reduction="none")
    elif output_type == "tsdf":
        per_point = F.mse_loss(raw, batch["sup_tsdf"].float(), reduction="none")
    else:
        raise ValueError(f"model.output_type must be 'occupancy' or 'tsdf', got {output_type!r}")
    group = batch["sup_group"]  # (B, M): 0 volume, 1 near-surface, 2 sharp-near
    parts = {"volume": masked_mean(per_point, group == 0), "near": masked_mean(per_point, group == 1),
             "sharp": masked_mean(per_point, group == 2), "kl": out["kl"].float().mean()}
    loss = (training.volume_weight * parts["volume"] + training.near_weight * parts["near"]
            + training.sharp_weight * parts["sharp"] + training.kl_weight * parts["kl"])
    if "anchor_loss" in out:  # local attention: each token learns where it sits (its FPS point)
        parts["anchor"] = out["anchor_loss"].float().mean()
        loss = loss + training.anchor_weight * parts["anchor"]
    return loss, {f"loss/{k}": v.item() for k, v in parts.items()} | {"loss/total": loss.item()}


def warn_cut_by_time(log: logging.Logger, step: int, max_steps: int, max_minutes: float) -> None:
    """Loud: a run cut by the wall-clock cap is not the configured run (fewer steps, other figures)."""
    bar = "!" * 100
    log.warning("\n%s\nWALL-CLOCK CAP: --max-minutes %g stopped training at step %d of %d. The results are NOT those "
                "of the configured step budget; rerun with --resume latest (or without the cap) to finish it.\n%s",
                bar, max_minutes, step, max_steps, bar)


def is_multi_cpu_run() -> bool:
    """True under torchrun (WORLD_SIZE > 1) on a machine without GPUs. accelerate sets up gloo multi-CPU training
    only when told ``cpu=True`` (ACCELERATE_USE_CPU=1 does the same); without it every process would train alone.
    Shared by both training loops."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- checkpoint/export
def build_model(config: VAETrainConfig) -> Any:
    from vae.modeling_dora_vae import DoraVAE
    from vae.provenance import load_init_weights

    model = DoraVAE(**config.model)
    if config.init_from:  # config.model is already the folder's (resolve_init_from in train())
        load_init_weights(model, config.init_from)
    return model


def _ema_to_files(ema: Any, names: list[str], directory: Path) -> None:
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {name: p.detach().cpu().contiguous() for name, p in zip(names, state.pop("shadow_params"))}
    save_file(tensors, str(directory / "ema.safetensors"))
    (directory / "ema.json").write_text(json.dumps(state))


def _ema_from_files(ema: Any, names: list[str], directory: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "ema.safetensors"))
    state = json.loads((directory / "ema.json").read_text())
    ema.load_state_dict(state | {"shadow_params": [tensors[name] for name in names]})


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    if resume != "latest":
        path = Path(resume)
        if not (path / "train_state.json").exists():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no train_state.json)")
        return path
    found = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    found = [p for p in found if (p / "train_state.json").exists()]
    return found[-1] if found else None


def export_model(model: Any, ema: Any, use_ema: bool, directory: Path, config: VAETrainConfig,
                 metrics: dict[str, Any]) -> None:
    """``save_pretrained`` (config.json + safetensors) + the full run config and metrics beside it."""
    with ema_weights(model, ema if use_ema else None):
        model.save_pretrained(str(directory))
    save_yaml(to_dict(config), directory / "run_config.yaml")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))


class ema_weights:  # noqa: N801 - used as a context manager
    """Temporarily swap the EMA weights into the model (validation, export)."""

    def __init__(self, model: Any, ema: Any) -> None:
        self.model, self.ema = model, ema

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


# ----------------------------------------------------------------------------------------------------- train
def train(config: VAETrainConfig, output_dir: str | Path, resume: str | None = None,
          max_minutes: float | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Train, validate, checkpoint and export; returns a summary (steps, final metrics, paths)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from vae.modeling_dora_vae import DoraVAE
    from vae.provenance import VAE_FREE_KEYS, check_resume_provenance, resolve_init_from
    from vae.train_validation import save_curves_png, save_reconstruction_png, validate

    started = time.monotonic()
    config = resolve_init_from(config, DoraVAE, VAE_FREE_KEYS)
    output_dir = Path(output_dir)
    tcfg, vcfg = config.training, config.validation
    precision = tcfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        cpu=is_multi_cpu_run(), mixed_precision=precision, gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    schedule = TokenSchedule(config.schedule, seed=tcfg.seed)
    model = build_model(config)
    output_type = model.config.output_type
    train_set, val_set, train_idx, val_idx = build_datasets(config, data_root or config.data.root)
    loader = torch.utils.data.DataLoader(
        SeededItems(train_set, train_idx), batch_size=config.data.batch_size,
        sampler=EpochPermutationSampler(len(train_idx), tcfg.seed), collate_fn=collate,
        num_workers=config.data.num_workers, drop_last=len(train_idx) >= config.data.batch_size,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas),
                                  weight_decay=tcfg.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step: scale like diffusers' examples.
    lr_scheduler = get_scheduler(tcfg.lr_scheduler, optimizer,
                                 num_warmup_steps=tcfg.warmup_steps * accelerator.num_processes,
                                 num_training_steps=tcfg.max_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    param_names = [name for name, _ in unwrapped.named_parameters()]
    ema = None
    if tcfg.use_ema:
        # Imported only when used: diffusers.training_utils pulls in all of diffusers' models (slow on CPU).
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unwrapped.parameters(), decay=tcfg.ema_decay, model_cls=type(unwrapped),
                       model_config=unwrapped.config)
        ema.to(accelerator.device)

    state: dict[str, Any] = {"global_step": 0, "micro_step": 0, "best_metric": -1.0, "best_step": -1,
                             "history": {"loss": []}}
    checkpoint = find_checkpoint(output_dir, resume) if resume else None
    if checkpoint is not None:
        check_resume_provenance(checkpoint, config)
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "train_state.json").read_text())
        if ema is not None:
            _ema_from_files(ema, param_names, checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, state["global_step"])
    elif resume:
        logger.warning("--resume %s: no checkpoint under %s, starting from scratch", resume, output_dir)

    # Fixed draws: the same held-out point subsets at every validation and in every run.
    held_out_items = SeededItems(val_set, val_idx[: vcfg.max_shapes] if vcfg.max_shapes else val_idx)
    held_out = [held_out_items[(i, 12_345 + i)] for i in range(len(held_out_items))]
    data_epsilon = train_set[train_idx[0]]["meta"].get("epsilon") if len(train_idx) else None
    if data_epsilon is not None and abs(float(data_epsilon) - float(unwrapped.config.epsilon)) > 1e-9:
        logger.warning("data prepared at epsilon=%g but model.epsilon=%g: set model.epsilon to the data's so the "
                       "exported model records (and warns about) the right scale", data_epsilon,
                       unwrapped.config.epsilon)
    if accelerator.is_main_process:
        hparams = {k: (v if isinstance(v, int | float | str | bool) else str(v))
                   for section, values in to_dict(config).items() for k, v in
                   (((f"{section}.{key}", value) for key, value in values.items()) if isinstance(values, dict)
                    else [(section, values)])}  # top-level keys: init_from, init_from_sha256
        accelerator.init_trackers("dora_vae", config=hparams)
        save_yaml(to_dict(config), output_dir / "run_config.yaml")
        logger.info("%d training / %d held-out shapes; %s precision on %s", len(train_idx), len(val_idx),
                    precision, accelerator.device)

    def run_validation(token_counts: list[int], tag: str) -> dict[str, float]:
        step = state["global_step"]
        mesh_tokens = vcfg.mesh_token_counts if (tag == "final" or vcfg.mesh_every_validation) else []
        with ema_weights(unwrapped, ema if vcfg.use_ema else None):
            metrics, meshes = validate(unwrapped, held_out, token_counts, mesh_tokens,
                                       vcfg.mesh_resolution, vcfg.mesh_shapes, vcfg.chamfer_points,
                                       accelerator.device)
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

    def save_checkpoint() -> None:
        directory = output_dir / "checkpoints" / f"checkpoint-{state['global_step']}"
        accelerator.save_state(str(directory))
        if accelerator.is_main_process:
            (directory / "train_state.json").write_text(json.dumps(state))
            if ema is not None:
                _ema_to_files(ema, param_names, directory)
            save_yaml(to_dict(config), directory / "config.yaml")
            old = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            for stale in old[: max(len(old) - tcfg.checkpoints_total_limit, 0)]:
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    progress = tqdm(total=tcfg.max_steps, initial=state["global_step"], desc="train-vae",
                    disable=not accelerator.is_local_main_process)
    model.train()
    running: dict[str, float] = {}
    out_of_time = False
    batches_per_epoch = len(loader)
    while state["global_step"] < tcfg.max_steps and not out_of_time:
        epoch, consumed = divmod(state["micro_step"], batches_per_epoch)
        loader.set_epoch(epoch)
        active = accelerator.skip_first_batches(loader, consumed) if consumed else loader
        active.set_epoch(epoch)
        for batch in active:
            with accelerator.accumulate(model):
                step = state["global_step"]
                num_tokens = schedule.sample(step)
                # Posterior noise depends only on (seed, micro-step, rank): resume-exact and distinct per rank.
                noise_seed = (tcfg.seed * 1_000_003 + state["micro_step"]) * 1_009 + accelerator.process_index
                generator = torch.Generator(accelerator.device).manual_seed(noise_seed)
                loss, parts = compute_loss(model, batch, num_tokens, output_type, tcfg, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["micro_step"] += 1
            for key, value in parts.items():
                running[key] = running.get(key, 0.0) + value
            running["count"] = running.get("count", 0) + 1
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            if ema is not None:
                ema.step(unwrapped.parameters())
            progress.update(1)
            progress.set_postfix(loss=f"{parts['loss/total']:.4f}", tokens=num_tokens)
            if state["global_step"] % tcfg.log_every == 0 or state["global_step"] == tcfg.max_steps:
                count = running.pop("count")
                logs = {k: v / count for k, v in running.items()}
                logs |= {"lr": lr_scheduler.get_last_lr()[0], "tokens": num_tokens, "epoch": epoch}
                accelerator.log(logs, step=state["global_step"])
                state["history"]["loss"].append([state["global_step"], logs["loss/total"]])
                running = {}
            # Every rank must agree on stopping: take the max of the per-rank "out of time" flags.
            if max_minutes is not None:
                flag = torch.tensor(float(time.monotonic() - started > 60.0 * max_minutes), device=accelerator.device)
                out_of_time = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            done = state["global_step"] >= tcfg.max_steps or out_of_time
            if not done and vcfg.every_steps and state["global_step"] % vcfg.every_steps == 0:
                if accelerator.is_main_process:
                    run_validation(vcfg.token_counts, "val")
                accelerator.wait_for_everyone()
            if not done and tcfg.checkpoint_every and state["global_step"] % tcfg.checkpoint_every == 0:
                save_checkpoint()
            if done:
                break
    progress.close()
    if out_of_time and accelerator.is_main_process:
        warn_cut_by_time(logger, state["global_step"], tcfg.max_steps, max_minutes)

    final_metrics: dict[str, float] = {}
    if accelerator.is_main_process and held_out:
        final_metrics = run_validation(vcfg.final_token_counts, "final")
    accelerator.wait_for_everyone()
    save_checkpoint()
    if accelerator.is_main_process:
        export_model(unwrapped, ema, vcfg.use_ema, output_dir / "final", config,
                     final_metrics | {"step": state["global_step"]})
        save_curves_png(state["history"], output_dir / "curves.png")
        summary = {"steps": state["global_step"], "minutes": (time.monotonic() - started) / 60.0,
                   "stopped_by_time": out_of_time, "final": final_metrics, "best_step": state["best_step"],
                   "best_metric": state["best_metric"], "train_shapes": len(train_idx), "held_out_shapes": len(val_idx),
                   "num_processes": accelerator.num_processes}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return {"steps": state["global_step"], "final": final_metrics, "output_dir": str(output_dir),
            "stopped_by_time": out_of_time, "num_processes": accelerator.num_processes}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora train-vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config (e.g. configs/vae/small.yaml)")
    parser.add_argument("--output-dir", default=None, help="run folder (default runs/vae_<config name>)")
    parser.add_argument("--data", default=None, help="prepared data folder (overrides data.root)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget of this invocation: then stop, validate and export")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="'latest' (newest checkpoint in the output dir) or a checkpoint folder")
    parser.add_argument("--seed", type=int, default=None, help="override training.seed")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune: start from this save_pretrained VAE folder (its config is the model's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.max_steps is not None:
        overrides["training.max_steps"] = args.max_steps
    if args.seed is not None:
        overrides["training.seed"] = args.seed
    if args.data is not None:
        overrides["data.root"] = args.data
    if args.init_from is not None:
        overrides["init_from"] = args.init_from
    config = load_config(VAETrainConfig, args.config, overrides)
    output_dir = args.output_dir or f"runs/vae_{Path(args.config).stem}"
    summary = train(config, output_dir, resume=args.resume, max_minutes=args.max_minutes)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

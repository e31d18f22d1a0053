"""The training core of `dora train-vae` and `dora train-dit`: one accelerate loop, fed by each stage.

A stage builds its model and its data, then hands the core a batch source and a step function (the loss of one
micro-batch); the core owns everything else:

- device and precision (bf16 on CUDA, fp32 on CPU), the ``Accelerator`` (gloo process group under torchrun on
  machines without GPUs), tensorboard trackers under OUT/logs;
- AdamW and the diffusers LR scheduler, gradient accumulation and clipping, the EMA (``training/ema.py``);
- the step budget (``max_steps``) and the wall-clock budget (``--max-minutes``, agreed on by every rank);
- checkpoints (``training/checkpoints.py``) with exact resume: per-micro-step randomness comes from generators
  seeded by (seed, micro-step, rank), batch sources restart at a micro-step, and the token count of a step is a
  function of (seed, step) (``training/schedules.py``), so a resumed run reproduces an uninterrupted one;
- logging: per-key means over the micro-steps (and ranks) since the last log, the loss history in
  ``train_state.json``, a progress bar over the real step total.

Typical use (see ``vae/train.py`` and ``diffusion/train.py``)::

    trainer = Trainer(config.training, output_dir, "vae", logger, max_minutes)
    model = build_model(config)                         # after seeding: identical weights on every rank
    model, loader = trainer.prepare(model, loader)      # optimizer, LR scheduler, EMA
    trainer.resume(resume, check=...)                   # --resume: weights, optimizer, RNG, counters, EMA
    trainer.start(config)                               # trackers + OUT/run_config.yaml
    trainer.fit(step_fn, loader_batches(trainer.accelerator, loader), schedule, evaluate=..., evaluate_every=N)
    ... final evaluation; trainer.save_checkpoint(); exports ...
    trainer.end()
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dora_shapegen.config import save_yaml, to_dict
from dora_shapegen.errors import ConfigError, DiskFullError, is_disk_full
from dora_shapegen.seeding import derive_seed
from dora_shapegen.training.checkpoints import (
    CHECKPOINTS,
    find_checkpoint,
    read_train_state,
    rotate_checkpoints,
    write_train_state,
)
from dora_shapegen.training.config import LoopConfig, flat_hparams
from dora_shapegen.training.ema import create_ema, load_ema, save_ema
from dora_shapegen.training.schedules import TokenSchedule


@dataclass
class StepContext:
    """What a step function gets besides its batch."""

    num_tokens: int  # this step's token count (the schedule's draw, the same on every rank)
    generator: torch.Generator  # on the device, seeded by (seed, micro-step, rank): resume-exact randomness
    micro_step: int
    global_step: int


# (batch, context) -> (loss to backpropagate, values to log: floats or 0-d tensors, averaged between logs)
StepFn = Callable[[Any, StepContext], tuple[torch.Tensor, dict[str, Any]]]
# start micro-step -> endless (epoch, batch) pairs from that micro-step on
BatchSource = Callable[[int], Iterator[tuple[int, Any]]]


def is_multi_cpu_run() -> bool:
    """True under torchrun (WORLD_SIZE > 1) on a machine without GPUs. accelerate sets up gloo multi-CPU training
    only when told ``cpu=True`` (ACCELERATE_USE_CPU=1 does the same); without it every process would train alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# Process counts set by MPI launchers (the only way accelerate's `--cpu` launcher starts several processes).
_MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
CPU_LAUNCH_RECIPE = (
    "for N processes on CPUs use `torchrun --standalone --nproc_per_node N -m MODULE ...` or "
    "`accelerate launch --multi_gpu --num_processes N -m MODULE ...` (gloo on CPUs)"
)


def check_cpu_launch(environ: dict[str, str] | None = None) -> None:
    """Refuse a run that asked accelerate for several CPU processes and got one.

    ``accelerate launch --cpu --num_processes N`` (accelerate 1.x) starts N processes only through MPI
    (``--mpirun_hostfile``); without it, it runs the script once, with MASTER_ADDR set for the group it never
    forms, and that process trains alone. That launch is recognisable here: accelerate's CPU flag plus a
    rendezvous address, and no world size from torchrun or MPI.
    """
    environ = os.environ if environ is None else environ
    on_cpu = environ.get("ACCELERATE_USE_CPU", "").strip().lower() in {"1", "true", "yes"}
    world = max((int(environ.get(name, "1") or 1) for name in _MPI_WORLD_SIZES), default=1)
    if on_cpu and "MASTER_ADDR" in environ and world <= 1:
        raise ConfigError(
            "`accelerate launch --cpu --num_processes N` started a single process (accelerate's --cpu launcher "
            f"needs MPI for more): {CPU_LAUNCH_RECIPE}; for one process, leave out --num_processes (or unset "
            "MASTER_ADDR)"
        )


def choose_precision(mixed_precision: str) -> str:
    """``auto``: bf16 on CUDA, fp32 ("no") on CPU, where bf16 is far slower than fp32."""
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mixed_precision


def warn_cut_by_time(log: logging.Logger, step: int, max_steps: int, max_minutes: float) -> None:
    """Loud: a run cut by the wall-clock cap is not the configured run (fewer steps, other figures)."""
    bar = "!" * 100
    log.warning(
        "\n%s\nWALL-CLOCK CAP: --max-minutes %g stopped training at step %d of %d. The results are NOT those "
        "of the configured step budget; rerun with --resume latest (or without the cap) to finish it.\n%s",
        bar,
        max_minutes,
        step,
        max_steps,
        bar,
    )


def loader_batches(accelerator: Any, loader: Any) -> BatchSource:
    """A batch source over a prepared DataLoader whose sampler has ``set_epoch``: epoch after epoch, a resumed run
    skipping the batches its epoch had already consumed (the order is a function of the epoch)."""

    def batches(start: int) -> Iterator[tuple[int, Any]]:
        per_epoch, micro = len(loader), start
        while True:
            epoch, consumed = divmod(micro, per_epoch)
            loader.set_epoch(epoch)
            active = accelerator.skip_first_batches(loader, consumed) if consumed else loader
            active.set_epoch(epoch)
            for batch in active:
                micro += 1
                yield epoch, batch

    return batches


class RunningMeans:
    """Sums of the logged values since the last log, kept on the device (no host sync per micro-step)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.keys, self.sums = device, [], None

    def add(self, values: dict[str, Any]) -> None:
        row = torch.stack(
            [torch.as_tensor(v).detach().to(self.device, torch.float32).reshape(()) for v in values.values()]
            + [torch.ones((), device=self.device)]
        )
        if self.sums is None:
            self.keys, self.sums = list(values), torch.zeros_like(row)
        self.sums += row

    def means(self, accelerator: Any) -> dict[str, float]:
        """Means over every rank's micro-steps (a collective: every rank calls it at the same step); resets."""
        total = accelerator.reduce(self.sums, reduction="sum")
        count = total[-1].clamp_min(1.0)
        means = {key: float(total[index] / count) for index, key in enumerate(self.keys)}
        self.sums.zero_()
        return means


class Trainer:
    """The shared loop; see the module docstring for the order of calls."""

    def __init__(
        self,
        loop: LoopConfig,
        output_dir: str | Path,
        stage: str,
        log: logging.Logger,
        max_minutes: float | None = None,
        started: float | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        check_cpu_launch()
        self.loop, self.output_dir, self.stage, self.log = loop, Path(output_dir), stage, log
        self.max_minutes = max_minutes
        self.started = time.monotonic() if started is None else started
        self.precision = choose_precision(loop.mixed_precision)
        self.accelerator = Accelerator(
            cpu=is_multi_cpu_run(),
            mixed_precision=self.precision,
            gradient_accumulation_steps=loop.gradient_accumulation_steps,
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        self.device = self.accelerator.device
        self.state: dict[str, Any] = {"global_step": 0, "micro_step": 0, "history": {"loss": []}}
        self.model: Any = None  # as prepared (DDP-wrapped on several processes)
        self.unwrapped: Any = None  # the model itself (save_pretrained, EMA, validation)
        self.optimizer: Any = None
        self.lr_scheduler: Any = None
        self.ema: Any = None
        self.run_config: Any = None
        self.out_of_time = False

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_step(self) -> int:
        return self.state["global_step"]

    def step_seed(self, purpose: str, micro_step: int) -> int:
        """Seed of a micro-step's randomness for ``purpose``: distinct per rank, replayed on resume."""
        return derive_seed(self.loop.seed, purpose, micro_step, self.accelerator.process_index)

    # ------------------------------------------------------------------------------------------------- setup
    def prepare(self, model: torch.nn.Module, loader: Any | None = None) -> tuple[Any, Any]:
        """AdamW over the trainable parameters, the LR scheduler, ``accelerator.prepare``, the EMA (when on).
        Returns (prepared model, prepared loader or None)."""
        from diffusers.optimization import get_scheduler

        loop, world = self.loop, self.accelerator.num_processes
        trainable = [
            p for p in model.parameters() if p.requires_grad
        ]  # all of them, or e.g. LoRA layers only
        optimizer = torch.optim.AdamW(
            trainable, lr=loop.learning_rate, betas=tuple(loop.adam_betas), weight_decay=loop.weight_decay
        )
        # accelerate steps a prepared scheduler once per process per optimizer step: scale like diffusers' examples.
        lr_scheduler = get_scheduler(
            loop.lr_scheduler,
            optimizer,
            num_warmup_steps=loop.warmup_steps * world,
            num_training_steps=loop.max_steps * world,
        )
        if loader is None:
            model, optimizer, lr_scheduler = self.accelerator.prepare(model, optimizer, lr_scheduler)
        else:
            model, optimizer, loader, lr_scheduler = self.accelerator.prepare(
                model, optimizer, loader, lr_scheduler
            )
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.unwrapped = self.accelerator.unwrap_model(model)
        if loop.use_ema:
            self.ema = create_ema(self.unwrapped, loop.ema_decay, self.device)
        return model, loader

    def resume(self, resume: str | None, check: Callable[[Path], None] | None = None) -> int | None:
        """Load the checkpoint ``--resume`` names (after ``check(checkpoint)``, e.g. provenance); returns the step
        resumed from, or None when starting from scratch."""
        checkpoint = find_checkpoint(self.output_dir, resume) if resume else None
        if checkpoint is None:
            if resume:
                self.log.warning(
                    "--resume %s: no checkpoint under %s, starting from scratch", resume, self.output_dir
                )
            return None
        if check is not None:
            check(checkpoint)
        self.accelerator.load_state(str(checkpoint))
        self.state = read_train_state(checkpoint)
        if self.ema is not None:
            load_ema(self.ema, self.unwrapped, checkpoint, self.device)
        self.log.info("resumed from %s at step %d", checkpoint, self.state["global_step"])
        return self.state["global_step"]

    def start(self, run_config: Any) -> None:
        """Trackers (with the run config as hyper-parameters) and OUT/run_config.yaml, on the main process."""
        self.run_config = run_config
        if self.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.accelerator.init_trackers(f"dora_{self.stage}", config=flat_hparams(to_dict(run_config)))
            save_yaml(to_dict(run_config), self.output_dir / "run_config.yaml")

    # -------------------------------------------------------------------------------------------------- loop
    def fit(
        self,
        step_fn: StepFn,
        batches: BatchSource,
        schedule: TokenSchedule,
        loss_key: str = "loss",
        evaluate: Callable[[int], None] | None = None,
        evaluate_every: int = 0,
    ) -> None:
        """Train until ``max_steps`` or the wall-clock budget. ``evaluate(step)`` runs on the main process every
        ``evaluate_every`` steps (never at the last step: the stage evaluates its final model itself)."""
        from tqdm.auto import tqdm

        loop, accelerator, state = self.loop, self.accelerator, self.state
        progress = tqdm(
            total=loop.max_steps,
            initial=state["global_step"],
            desc=f"train-{self.stage}",
            disable=not accelerator.is_local_main_process,
        )
        self.model.train()
        running = RunningMeans(self.device)
        source = batches(state["micro_step"])
        while state["global_step"] < loop.max_steps and not self.out_of_time:
            epoch, batch = next(source)
            micro = state["micro_step"]
            num_tokens = schedule.sample(state["global_step"])
            with accelerator.accumulate(self.model):
                generator = torch.Generator(self.device).manual_seed(self.step_seed("train-step", micro))
                loss, values = step_fn(batch, StepContext(num_tokens, generator, micro, state["global_step"]))
                accelerator.backward(loss)
                if accelerator.sync_gradients and loop.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), loop.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            state["micro_step"] += 1
            running.add(values)
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            step = state["global_step"]
            if self.ema is not None:
                self.ema.step(self.unwrapped.parameters())
            progress.update(1)
            if step % loop.log_every == 0 or step == loop.max_steps:
                logs = running.means(accelerator)
                logs |= {"lr": self.lr_scheduler.get_last_lr()[0], "tokens": num_tokens, "epoch": epoch}
                accelerator.log(logs, step=step)
                state["history"]["loss"].append([step, logs[loss_key]])
                progress.set_postfix(loss=f"{logs[loss_key]:.4f}", tokens=num_tokens)
            self.out_of_time = self._past_budget()
            done = step >= loop.max_steps or self.out_of_time
            if not done and evaluate is not None and evaluate_every and step % evaluate_every == 0:
                if self.is_main_process:
                    evaluate(step)
                accelerator.wait_for_everyone()
            if not done and loop.checkpoint_every and step % loop.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        if self.out_of_time and self.is_main_process:
            warn_cut_by_time(self.log, state["global_step"], loop.max_steps, self.max_minutes)

    def _past_budget(self) -> bool:
        """Whether any rank is past ``max_minutes``: every rank must agree on stopping, so the flags are summed."""
        if self.max_minutes is None:
            return False
        flag = torch.tensor(
            float(time.monotonic() - self.started > 60.0 * self.max_minutes), device=self.device
        )
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # ------------------------------------------------------------------------------------- checkpoints, end
    def save_checkpoint(self) -> Path:
        """OUT/checkpoints/checkpoint-<step> (every rank takes part), then rotation to the newest few.

        A full disk stops the run with a :class:`DiskFullError` naming the folder; the partial folder is removed
        (it frees the space it took and could never be resumed from: ``train_state.json`` comes last), the older
        checkpoints are untouched, so ``--resume latest`` after freeing space continues from the newest of them."""
        directory = self.output_dir / CHECKPOINTS / f"checkpoint-{self.state['global_step']}"
        try:
            self.accelerator.save_state(str(directory))
            if self.is_main_process:
                if self.ema is not None:
                    save_ema(self.ema, self.unwrapped, directory)
                save_yaml(to_dict(self.run_config), directory / "config.yaml")
                write_train_state(directory, self.state)  # last: marks the checkpoint complete
        except Exception as error:
            if not is_disk_full(error, directory):
                raise
            if self.is_main_process:
                shutil.rmtree(directory, ignore_errors=True)
            raise DiskFullError(directory, f"{type(error).__name__}: {error}") from error
        if self.is_main_process:
            rotate_checkpoints(self.output_dir, self.loop.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return directory

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60.0

    def end(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

"""The training core (training/): EMA persistence, checkpoint finding and rotation, the step and time budgets, exact
resume, the hyper-parameter flattener — on a toy regression model, so each test takes about a second."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dora_shapegen.errors import CheckpointError, ConfigError, DiskFullError
from dora_shapegen.training.checkpoints import (
    checkpoint_folders,
    find_checkpoint,
    read_train_state,
    rotate_checkpoints,
    verify_checkpoint,
    write_train_state,
)
from dora_shapegen.training.config import LoopConfig, flat_hparams
from dora_shapegen.training.ema import create_ema, ema_weights, load_ema, save_ema
from dora_shapegen.training.loop import StepContext, Trainer, check_cpu_launch
from dora_shapegen.training.schedules import ScheduleConfig, TokenSchedule


@dataclass
class ToyRunConfig:
    training: LoopConfig = field(default_factory=LoopConfig)
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(phases=[{"until_step": None, "tokens": [2, 4]}])
    )
    model: dict[str, Any] = field(default_factory=lambda: {"width": 4, "tags": ["a", "b"]})


def toy_config(**training: Any) -> ToyRunConfig:
    loop = LoopConfig(
        max_steps=6,
        learning_rate=0.05,
        warmup_steps=1,
        checkpoint_every=2,
        checkpoints_total_limit=10,
        log_every=1,
        use_ema=True,
        ema_decay=0.9,
    )
    for key, value in training.items():
        setattr(loop, key, value)
    return ToyRunConfig(training=loop)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.frozen = torch.nn.Parameter(
            torch.ones(2), requires_grad=False
        )  # copied by the EMA, not averaged


def run_toy(
    output_dir: Path, config: ToyRunConfig, resume: str | None = None, max_minutes: float | None = None
) -> Trainer:
    """A run of the core: data and noise are functions of the micro-step, as in both stages."""
    import logging

    trainer = Trainer(config.training, output_dir, "toy", logging.getLogger("dora.test_core"), max_minutes)
    torch.manual_seed(0)
    model, _ = trainer.prepare(Toy())
    trainer.resume(resume)
    trainer.start(config)
    inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def batches(start: int):
        for micro in itertools.count(start):
            rows = torch.arange(4) + 4 * (micro % 4)
            yield micro // 4, (inputs[rows], targets[rows])

    def step(batch: Any, context: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        noise = 0.01 * torch.randn(y.shape, generator=context.generator)  # per-micro-step randomness
        prediction = model.layer(x).squeeze(1) * (
            context.num_tokens / 4
        )  # the schedule's draw reaches the step
        loss = torch.nn.functional.mse_loss(prediction, y + noise)
        return loss, {"loss": loss, "tokens_seen": float(context.num_tokens)}

    trainer.fit(step, batches, TokenSchedule(config.schedule, seed=0))
    trainer.save_checkpoint()
    trainer.end()
    return trainer


# ----------------------------------------------------------------------------------------------------------- EMA
def test_ema_round_trip_through_safetensors_and_json(tmp_path):
    model = Toy()
    ema = create_ema(model, decay=0.9, device="cpu")
    for _ in range(3):  # (diffusers' first EMA step copies the weights; later ones average)
        with torch.no_grad():
            model.layer.weight.add_(1.0)
        ema.step(model.parameters())
    save_ema(ema, model, tmp_path)
    stored = load_file(str(tmp_path / "ema.safetensors"))
    assert set(stored) == {"layer.weight", "layer.bias", "frozen"}  # keyed by parameter name
    counters = json.loads((tmp_path / "ema.json").read_text())
    assert counters["optimization_step"] == 3 and "shadow_params" not in counters
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))  # nothing pickled

    fresh = create_ema(Toy(), decay=0.5, device="cpu")
    load_ema(fresh, model, tmp_path, "cpu")
    assert fresh.optimization_step == 3 and fresh.decay == 0.9
    for expected, actual in zip(ema.shadow_params, fresh.shadow_params, strict=True):
        assert torch.equal(expected, actual)
    # ema_weights swaps the averaged weights in and restores the trained ones after
    trained = model.layer.weight.detach().clone()
    averaged = dict(zip([name for name, _ in model.named_parameters()], fresh.shadow_params, strict=True))
    assert torch.equal(averaged["layer.weight"], stored["layer.weight"])
    assert not torch.equal(averaged["layer.weight"], trained)  # an average, not a copy
    with ema_weights(model, fresh):
        assert torch.equal(model.layer.weight, averaged["layer.weight"])
    assert torch.equal(model.layer.weight, trained)


def test_ema_reads_the_older_dit_folder_layout(tmp_path):
    """DiT checkpoints written before the core kept the EMA as a save_pretrained folder ema/."""
    model = Toy()
    shadow = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
    (tmp_path / "ema").mkdir()
    save_file(shadow, str(tmp_path / "ema" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "ema" / "config.json").write_text(
        json.dumps(
            {"_class_name": "ShapeDiT", "width": 4, "decay": 0.8, "optimization_step": 12, "min_decay": 0.0}
        )
    )
    ema = create_ema(model, decay=0.9, device="cpu")
    load_ema(ema, model, tmp_path, "cpu")
    assert ema.optimization_step == 12 and ema.decay == 0.8
    assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in ema.shadow_params)


def test_ema_load_names_a_checkpoint_without_ema(tmp_path):
    with pytest.raises(FileNotFoundError, match="no EMA weights"):
        load_ema(create_ema(Toy(), 0.9, "cpu"), Toy(), tmp_path, "cpu")


# --------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    folder = out / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        write_train_state(folder, {"global_step": step, "micro_step": step, "history": {"loss": []}})
    return folder


def test_find_checkpoint_latest_is_the_newest_complete_one(tmp_path):
    assert find_checkpoint(tmp_path, "latest") is None  # nothing yet: start from scratch
    for step in (2, 10, 9):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 12, complete=False)  # cut while being written: never resumed from
    (tmp_path / "checkpoints" / "checkpoint-notes").mkdir()  # not a step: ignored
    assert (
        find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "checkpoint-10"
    )  # 10 > 9 (numeric)


def test_find_checkpoint_named_folder_must_be_complete(tmp_path):
    named = _checkpoint(tmp_path, 4)
    assert find_checkpoint(tmp_path / "elsewhere", str(named)) == named
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        find_checkpoint(tmp_path, str(_checkpoint(tmp_path, 6, complete=False)))


def test_rotation_keeps_the_newest_and_zero_keeps_all(tmp_path):
    for step in (1, 20, 3, 100):
        _checkpoint(tmp_path, step)
    assert [p.name for p in rotate_checkpoints(tmp_path, 0)] == []
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-100", "checkpoint-20"]


def test_train_state_of_older_dit_checkpoints_reads_into_todays_layout(tmp_path):
    (tmp_path / "train_state.json").write_text(
        json.dumps({"global_step": 2, "micro_step": 2, "history": [[1, 0.5], [2, 0.4]]})
    )
    assert read_train_state(tmp_path)["history"] == {"loss": [[1, 0.5], [2, 0.4]]}


def test_flat_hparams_flattens_every_level():
    flat = flat_hparams(
        {
            "training": {"lr": 0.1, "betas": [0.9, 0.99]},
            "schedule": {"mixture": {"tokens": [8]}},
            "init_from": None,
            "seed": 3,
        }
    )
    assert flat == {
        "training.lr": 0.1,
        "training.betas": "[0.9, 0.99]",
        "schedule.mixture.tokens": "[8]",
        "init_from": "None",
        "seed": 3,
    }


# ---------------------------------------------------------------------------------------------------- the loop
def test_step_budget_checkpoints_rotation_and_logs(tmp_path):
    trainer = run_toy(tmp_path / "run", toy_config(checkpoints_total_limit=2))
    assert trainer.state["global_step"] == 6 and not trainer.out_of_time
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    final = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    for name in ("model.safetensors", "ema.safetensors", "ema.json", "config.yaml", "train_state.json"):
        assert (final / name).is_file(), name
    state = read_train_state(final)
    assert [step for step, _ in state["history"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "run_config.yaml").is_file() and list(
        (tmp_path / "run" / "logs").rglob("events*")
    )


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    trainer = run_toy(
        tmp_path / "run", toy_config(gradient_accumulation_steps=2, use_ema=False, checkpoint_every=0)
    )
    assert trainer.state["global_step"] == 6 and trainer.state["micro_step"] == 12


def test_time_budget_stops_every_rank_and_warns_loudly(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dora.test_core"):
        trainer = run_toy(tmp_path / "run", toy_config(max_steps=50, checkpoint_every=0), max_minutes=1e-9)
    assert trainer.out_of_time and trainer.state["global_step"] == 1
    assert "WALL-CLOCK CAP" in caplog.text and "step 1 of 50" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-1" / "train_state.json").is_file()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    config = toy_config()
    straight = run_toy(tmp_path / "straight", config)
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    resumed = run_toy(tmp_path / "resumed", config, resume="latest")
    assert resumed.state["history"] == straight.state["history"]
    for expected, actual in zip(straight.unwrapped.parameters(), resumed.unwrapped.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for expected, actual in zip(straight.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert resumed.ema.optimization_step == 6


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dora.test_core"):
        trainer = run_toy(tmp_path / "run", toy_config(max_steps=2), resume="latest")
    assert trainer.state["global_step"] == 2 and "starting from scratch" in caplog.text


# ----------------------------------------------------------------------------- damaged checkpoints, a full disk
def _cut(path: Path, fraction: float = 0.5) -> None:
    """Truncate a file as a partial copy or a full disk would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_verify_checkpoint_names_each_damaged_file(tmp_path):
    run_toy(tmp_path / "run", toy_config(max_steps=2, checkpoint_every=0))
    intact = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert verify_checkpoint(intact) == []
    cases = {
        "model.safetensors": lambda path: _cut(path),
        "ema.safetensors": lambda path: path.write_bytes(path.read_bytes() + b"\0" * 8),
        "optimizer.bin": lambda path: _cut(path, 0.9),
        "train_state.json": lambda path: path.write_text('{"global_step": 2, "mic'),
    }
    for name, damage in cases.items():
        copy = tmp_path / name / "checkpoint-2"
        shutil.copytree(intact, copy)
        damage(copy / name)
        problems = verify_checkpoint(copy)
        assert len(problems) == 1 and problems[0].startswith(f"{name}: "), (name, problems)
    assert "truncated" in verify_checkpoint(tmp_path / "model.safetensors" / "checkpoint-2")[0]


def test_resume_falls_back_past_a_truncated_checkpoint_and_matches_the_uninterrupted_run(tmp_path, caplog):
    """The issue's case: the newest checkpoint's model.safetensors is cut; --resume latest takes the one before,
    says which it skipped and why, and ends with the weights of a run never interrupted."""
    config = toy_config()
    straight = run_toy(tmp_path / "straight", config)
    for step in (2, 4):
        shutil.copytree(
            tmp_path / "straight" / "checkpoints" / f"checkpoint-{step}",
            tmp_path / "resumed" / "checkpoints" / f"checkpoint-{step}",
        )
    _cut(tmp_path / "resumed" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    with caplog.at_level("WARNING", logger="dora_shapegen.training.checkpoints"):
        resumed = run_toy(tmp_path / "resumed", config, resume="latest")
    assert "resuming from checkpoint-2: skipped the damaged checkpoint-4 (model.safetensors:" in caplog.text
    assert resumed.state["history"] == straight.state["history"]
    for expected, actual in zip(straight.unwrapped.parameters(), resumed.unwrapped.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert verify_checkpoint(tmp_path / "resumed" / "checkpoints" / "checkpoint-4") == []  # written anew


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run_toy(tmp_path / "run", toy_config(max_steps=2, checkpoint_every=0))
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    _cut(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="every completed checkpoint .* is damaged .*model.safetensors"):
        find_checkpoint(tmp_path / "run", "latest")
    with pytest.raises(CheckpointError, match="damaged checkpoint .*model.safetensors"):
        find_checkpoint(tmp_path / "run", str(checkpoint))


def test_rotation_never_deletes_the_newest_intact_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save_file({"w": torch.ones(4)}, str(_checkpoint(tmp_path, step) / "model.safetensors"))
    _cut(tmp_path / "checkpoints" / "checkpoint-3" / "model.safetensors")  # the newest is damaged
    removed = rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "checkpoint-2"


def test_disk_full_while_checkpointing_keeps_the_older_ones_and_a_rerun_finishes(tmp_path, monkeypatch):
    """ENOSPC in the middle of the step-4 checkpoint: the run stops with an error naming the folder and saying
    the disk is full; checkpoint-2 stays intact; after "freeing space" the rerun resumes and ends exactly where
    an uninterrupted run does, with each checkpoint once."""
    from accelerate import Accelerator

    config = toy_config()
    straight = run_toy(tmp_path / "straight", config)
    original, calls = Accelerator.save_state, []

    def fill_the_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the step-4 checkpoint: part of the model file, then no space
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 64)
            raise OSError(
                errno.ENOSPC, "No space left on device", str(Path(output_dir) / "model.safetensors")
            )
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fill_the_disk)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"disk full: no space left to write .*checkpoint-4"):
        run_toy(run, config, resume="latest")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-2"
    ]  # the partial one removed
    assert verify_checkpoint(run / "checkpoints" / "checkpoint-2") == []
    monkeypatch.setattr(Accelerator, "save_state", original)
    resumed = run_toy(run, config, resume="latest")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    assert resumed.state["history"] == straight.state["history"]  # each step logged once
    for expected, actual in zip(straight.unwrapped.parameters(), resumed.unwrapped.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def test_a_real_full_filesystem_while_checkpointing(tmp_path):
    """The same on a real tiny filesystem (a tmpfs; needs root and mount, else skipped): whatever library hits
    the full disk (torch.save reports it as "unexpected pos ..."), the error is a DiskFullError naming the
    checkpoint, what was written before stays intact, and after the filesystem grows the rerun finishes."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("mounting a tmpfs needs root and the mount command")
    try:
        config = toy_config(max_steps=12, checkpoint_every=1, checkpoints_total_limit=0)
        with pytest.raises(DiskFullError, match=r"disk full: no space left to write .*checkpoint-\d+"):
            run_toy(disk / "run", config)
        kept = [path for path in checkpoint_folders(disk / "run")]
        assert kept and all(verify_checkpoint(path) == [] for path in kept)
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        trainer = run_toy(disk / "run", config, resume="latest")
        assert trainer.state["global_step"] == 12
        steps = [step for step, _ in trainer.state["history"]["loss"]]
        assert steps == list(range(1, 13))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_accelerate_cpu_launch_of_several_processes_is_refused():
    """`accelerate launch --cpu --num_processes 2` runs the script once (no MPI) with MASTER_ADDR set: refused with
    the recipe that works. Single processes, torchrun and MPI worlds pass."""
    cpu_launch = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(
        ConfigError, match="started a single process.*torchrun --standalone --nproc_per_node N"
    ):
        check_cpu_launch(cpu_launch)
    check_cpu_launch({"ACCELERATE_USE_CPU": "True"})  # --cpu, one process
    check_cpu_launch({**cpu_launch, "WORLD_SIZE": "2", "RANK": "0"})  # torchrun / --multi_gpu
    check_cpu_launch({**cpu_launch, "OMPI_COMM_WORLD_SIZE": "2"})  # --cpu under mpirun
    check_cpu_launch({})


def test_step_seeds_are_distinct_per_purpose_micro_step_and_rank():
    def step_seed(purpose: str, micro: int, rank: int, run_seed: int = 0) -> int:
        trainer = SimpleNamespace(
            loop=SimpleNamespace(seed=run_seed), accelerator=SimpleNamespace(process_index=rank)
        )
        return Trainer.step_seed(trainer, purpose, micro)

    assert step_seed("train-step", 7, 1) == step_seed("train-step", 7, 1)  # replayed on resume
    seeds = {
        step_seed(p, m, r) for p in ("train-step", "dit-batch-picks") for m in range(50) for r in range(4)
    }
    assert len(seeds) == 2 * 50 * 4  # the DiT's batch picks never reuse a step's noise stream
    assert step_seed("train-step", 0, 0, run_seed=1) != step_seed("train-step", 0, 0)

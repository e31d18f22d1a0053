"""Checkpoint folders of both training stages: finding one to resume, rotation, the step counters.

A run folder holds ``checkpoints/checkpoint-<step>/``: accelerate's ``save_state`` (model safetensors, optimizer,
LR scheduler, RNG states), and, written by the core, ``config.yaml``, the EMA weights (``training/ema.py``) and
``train_state.json`` (step counters, loss history, a stage's own fields such as the best metric). The core writes
``train_state.json`` last, so a checkpoint folder without it is one whose writing was cut: it is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every ``OUT/checkpoints/checkpoint-<step>`` folder, complete or not, oldest step first."""
    found = []
    for path in (Path(output_dir) / CHECKPOINTS).glob("checkpoint-*"):
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` = the newest complete checkpoint under OUT/checkpoints (None
    when there is none: the run starts from scratch); anything else is a checkpoint folder, which must be complete
    (hold ``train_state.json``)."""
    if resume != "latest":
        path = Path(resume)
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {TRAIN_STATE})")
        return path
    complete = [path for path in checkpoint_folders(output_dir) if (path / TRAIN_STATE).is_file()]
    return complete[-1] if complete else None


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoint folders (``keep`` < 1 keeps them all); returns the deleted."""
    folders = checkpoint_folders(output_dir)
    stale = folders[: max(len(folders) - keep, 0)] if keep >= 1 else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    (Path(directory) / TRAIN_STATE).write_text(json.dumps(state))


def read_train_state(checkpoint: str | Path) -> dict[str, Any]:
    """The counters of a checkpoint. DiT checkpoints written before the shared core kept the loss history as a
    bare list; it is read into today's ``{"loss": [[step, loss], ...]}``."""
    state = json.loads((Path(checkpoint) / TRAIN_STATE).read_text())
    if isinstance(state.get("history"), list):
        state["history"] = {"loss": state["history"]}
    return state


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of a model's weights (names + bytes), to compare replicas across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

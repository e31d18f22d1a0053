"""Checkpoint folders of both training stages: finding one to resume, rotation, the step counters.

A run folder holds ``checkpoints/checkpoint-<step>/``: accelerate's ``save_state`` (model safetensors, optimizer,
LR scheduler, RNG states), and, written by the core, ``config.yaml``, the EMA weights (``training/ema.py``) and
``train_state.json`` (step counters, loss history, a stage's own fields such as the best metric). The core writes
``train_state.json`` last, so a checkpoint folder without it is one whose writing was cut: it is never resumed from.

A complete folder can still be damaged after the fact (a partial copy, a full disk, a bad sector): before
resuming, every weight file is checked against its own structure (a safetensors header must describe exactly the
file's size; a torch zip archive must hold its central directory and every member inside the file), and
``--resume latest`` falls back to the newest intact checkpoint with a warning naming what it skipped. Rotation
never deletes the newest intact checkpoint, whatever came after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from dora_shapegen.errors import CheckpointError

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_ZIP_MAGIC = b"PK\x03\x04"
logger = logging.getLogger(__name__)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every ``OUT/checkpoints/checkpoint-<step>`` folder, complete or not, oldest step first."""
    found = []
    for path in (Path(output_dir) / CHECKPOINTS).glob("checkpoint-*"):
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is damaged (None if its header describes exactly its bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes: shorter than a safetensors header"
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            return f"{size} bytes: truncated inside its {header_size}-byte header"
        try:
            header = json.loads(handle.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return f"unreadable header ({error})"
    try:
        data_end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as error:
        return f"malformed header ({type(error).__name__}: {error})"
    expected = 8 + header_size + data_end
    if size != expected:
        return f"{size} bytes where its header describes {expected}: {'truncated' if size < expected else 'overlong'}"
    return None


def _zip_problem(path: Path) -> str | None:
    """Why a torch.save zip archive is damaged (None if its directory and every member lie inside the file)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.header_offset + member.compress_size > size:
                    return f"{size} bytes: member {member.filename} runs past the end"
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"{size} bytes: not a complete archive ({error})"
    return None


def verify_checkpoint(checkpoint: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder, one entry per damaged or missing part; empty when it is intact.

    Checks ``train_state.json`` (present, a JSON object with ``global_step``), every ``*.safetensors`` (header vs.
    size), every torch zip archive (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl`` written by ``torch.save``) and every
    other ``*.json``. Reads headers and directories only: milliseconds, whatever the model size.
    """
    folder = Path(checkpoint)
    problems = []
    state_path = folder / TRAIN_STATE
    if not state_path.is_file():
        return [f"no {TRAIN_STATE} (its writing was cut)"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        try:
            if path.suffix == ".safetensors":
                problem = _safetensors_problem(path)
            elif path.suffix in {".bin", ".pt", ".pth", ".pkl"}:
                with open(path, "rb") as handle:
                    magic = handle.read(4)
                problem = _zip_problem(path) if magic == _ZIP_MAGIC else ("empty" if not magic else None)
            elif path.suffix == ".json":
                content = json.loads(path.read_text())
                problem = None
                if path == state_path and not (isinstance(content, dict) and "global_step" in content):
                    problem = "no global_step"
            else:
                continue
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def find_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` = the newest intact checkpoint under OUT/checkpoints.

    Folders without ``train_state.json`` (a cut write) are passed over quietly; damaged ones with a warning that
    names each damaged file. None when no checkpoint was ever completed (the run starts from scratch); a
    :class:`CheckpointError` when completed ones exist but every one is damaged (starting over would silently
    discard them). Anything else than ``latest`` is a checkpoint folder, which must be intact.
    """
    if resume != "latest":
        path = Path(resume)
        if not (path / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {TRAIN_STATE})")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"--resume {resume}: damaged checkpoint ({'; '.join(problems)})")
        return path
    skipped = []
    for path in reversed(checkpoint_folders(output_dir)):
        if not (path / TRAIN_STATE).is_file():
            continue
        problems = verify_checkpoint(path)
        if not problems:
            if skipped:
                logger.warning(
                    "resuming from %s: skipped the damaged %s",
                    path.name,
                    "; ".join(f"{name} ({', '.join(found)})" for name, found in skipped),
                )
            return path
        skipped.append((path.name, problems))
    if skipped:
        raise CheckpointError(
            f"--resume latest: every completed checkpoint under {Path(output_dir) / CHECKPOINTS} is damaged ("
            + "; ".join(f"{name}: {', '.join(found)}" for name, found in skipped)
            + "); move them away to start from scratch, or restore one"
        )
    return None


def newest_intact_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint folder that is complete and passes :func:`verify_checkpoint`."""
    for path in reversed(checkpoint_folders(output_dir)):
        if (path / TRAIN_STATE).is_file() and not verify_checkpoint(path):
            return path
    return None


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoint folders (``keep`` < 1 keeps them all); returns the deleted.
    The newest intact checkpoint is never deleted, even when newer folders are damaged or incomplete: it may be
    the only one a run can resume from."""
    folders = checkpoint_folders(output_dir)
    stale = folders[: max(len(folders) - keep, 0)] if keep >= 1 else []
    if stale:
        protected = newest_intact_checkpoint(output_dir)
        stale = [path for path in stale if path != protected]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Atomically (a temporary file, then a rename): this file marks the checkpoint complete."""
    path = Path(directory) / TRAIN_STATE
    temporary = path.with_name(f".{TRAIN_STATE}.tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(path)


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

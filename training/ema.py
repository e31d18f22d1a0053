"""The one EMA scheme of both training stages: diffusers' ``EMAModel``, kept in checkpoints as safetensors + JSON.

A checkpoint holds ``ema.safetensors`` (one tensor per parameter, under the model's parameter name) and
``ema.json`` (the small counters: decay, optimization step, warm-up settings). Nothing is pickled: accelerate's
``register_for_checkpointing`` would reload the EMA with ``torch.load(weights_only=False)``, which the project
forbids. DiT checkpoints written before this scheme kept the EMA as a ``save_pretrained`` folder ``ema/``; they are
still read, so such a run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dora_shapegen.errors import ConfigError

EMA_WEIGHTS = "ema.safetensors"
EMA_COUNTERS = "ema.json"
OLD_EMA_FOLDER = "ema"  # the DiT's earlier layout: config.json (counters + model config) + model safetensors


def create_ema(model: torch.nn.Module, decay: float, device: torch.device | str) -> Any:
    """An EMA of every parameter of ``model`` (frozen ones are copied, not averaged: diffusers' rule)."""
    # Imported only when used: diffusers.training_utils pulls in all of diffusers' models (slow on CPU).
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=decay)
    ema.to(device)
    return ema


def _parameter_names(model: torch.nn.Module) -> list[str]:
    # named_parameters() walks the parameters in the order (and with the deduplication) of parameters(), which
    # is the order of the EMA's shadow list.
    return [name for name, _ in model.named_parameters()]


def save_ema(ema: Any, model: torch.nn.Module, directory: str | Path) -> None:
    """Write ``ema.safetensors`` + ``ema.json`` into a checkpoint folder."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {
        name: p.detach().cpu().contiguous() for name, p in zip(_parameter_names(model), shadow, strict=True)
    }
    save_file(tensors, str(Path(directory) / EMA_WEIGHTS))
    (Path(directory) / EMA_COUNTERS).write_text(json.dumps(state))


def load_ema(ema: Any, model: torch.nn.Module, directory: str | Path, device: torch.device | str) -> None:
    """Read a checkpoint's EMA into ``ema`` (today's files, else the DiT's earlier ``ema/`` folder)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    names = _parameter_names(model)
    if (directory / EMA_WEIGHTS).is_file():
        tensors = load_file(str(directory / EMA_WEIGHTS))
        counters = json.loads((directory / EMA_COUNTERS).read_text())
    elif (directory / OLD_EMA_FOLDER / "config.json").is_file():
        old = directory / OLD_EMA_FOLDER
        (weights,) = sorted(old.glob("*.safetensors"))
        tensors = load_file(str(weights))
        recorded = json.loads((old / "config.json").read_text())
        counters = {
            key: recorded[key] for key in ema.state_dict() if key in recorded and key != "shadow_params"
        }
    else:
        raise FileNotFoundError(f"checkpoint {directory} has no EMA weights ({EMA_WEIGHTS}); was EMA off?")
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ConfigError(f"{directory}: the EMA weights do not fit the model (missing {missing[:5]})")
    ema.load_state_dict(counters | {"shadow_params": [tensors[name] for name in names]})
    ema.to(device)  # safetensors load onto the CPU


class ema_weights:  # noqa: N801 - used as a context manager
    """Temporarily swap the EMA weights into the model (validation, previews, export); no-op when ``ema`` is None."""

    def __init__(self, model: torch.nn.Module, ema: Any | None) -> None:
        self.model, self.ema = model, ema

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.model.parameters())

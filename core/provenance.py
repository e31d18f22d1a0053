"""Where a model's weights come from: starting a training run from a ``save_pretrained`` folder, weight hashes,
and the VAE identity that ties a latent cache (and every DiT trained on it) to one set of VAE weights.

Shared by `dora train-vae` and `dora train-dit`, and by the stages that check a VAE identity (cache-latents,
assemble-pipeline, generate); each model lists the config keys a fine-tuning run may change beside its training
(``VAE_FREE_KEYS`` in vae/train.py, ``DIT_FREE_KEYS`` in diffusion/finetune.py).

``init_from`` semantics, the same in both loops:

- the model config comes from the folder's ``config.json``; a ``model:`` key in the run config that contradicts it
  is an error naming the key, except the keys a fine-tuning run may change (``free_keys``: token / point counts,
  dropout, runtime switches). Training settings (learning rate, schedule, batch, ...) are never checked.
- the folder's weights are loaded strictly (every tensor, every shape).
- provenance goes into the run config: ``init_from`` (the folder) and ``init_from_sha256`` (sha256 of each weight
  file, as the latent-cache manifest records a VAE). A config that already records a sha256 (a stored run config,
  a resumed run) must match the folder's weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import torch

from dora_shapegen.errors import ConfigError

T = TypeVar("T")

# Keys of a model config that describe its files or diffusers' bookkeeping, not the architecture.
_META_PREFIX = "_"


def weight_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight file in a ``save_pretrained`` folder (safetensors; ``*.bin`` only when no
    safetensors exist), keyed by file name."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    hashes = {}
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(2**22), b""):
                digest.update(block)
        hashes[path.name] = digest.hexdigest()
    return hashes


def _plain(value: Any) -> Any:
    """YAML and JSON spell the same config differently (tuples/lists, 1e-5 vs 0.00001): compare plain values."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def pretrained_model_config(folder: str | Path, model_cls: type) -> dict[str, Any]:
    """The complete constructor arguments of the model saved in ``folder``: its ``config.json`` over the class
    defaults (a folder saved before a key existed gets that key's default, as ``from_pretrained`` would)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"init_from {folder}: not a save_pretrained folder (no config.json)")
    stored = json.loads(path.read_text())
    class_name = stored.get("_class_name")
    if class_name is not None and class_name != model_cls.__name__:
        raise ConfigError(f"init_from {folder}: holds a {class_name}, not a {model_cls.__name__}")
    if not weight_hashes(folder):
        raise FileNotFoundError(f"init_from {folder}: no weight file (*.safetensors) beside config.json")
    parameters = inspect.signature(model_cls.__init__).parameters
    defaults = {
        name: p.default
        for name, p in parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }
    known = {
        key: value for key, value in stored.items() if not key.startswith(_META_PREFIX) and key in parameters
    }
    return defaults | known


def resolve_init_from(
    config: T, model_cls: type, free_keys: frozenset[str] | set[str], init_from: str | None = None
) -> T:
    """A copy of run ``config`` whose ``model`` section is the pretrained folder's config (+ the free keys the run
    sets) and whose ``init_from`` / ``init_from_sha256`` record the source. ``init_from`` (a CLI flag) wins over
    the config's key. Without any init folder the config is returned unchanged."""
    folder = init_from or getattr(config, "init_from", None)
    if not folder:
        if getattr(config, "init_from_sha256", None):
            raise ConfigError(
                "init_from_sha256 is set but init_from is not: give the folder the weights came from"
            )
        return config
    pretrained = pretrained_model_config(folder, model_cls)
    requested = dict(config.model or {})
    merged = dict(pretrained)
    for key, value in requested.items():
        if key not in pretrained:
            raise ConfigError(f"model.{key}: not a {model_cls.__name__} config key (init_from {folder})")
        if key in free_keys:
            merged[key] = value  # allowed to change when fine-tuning
        elif not _same(value, pretrained[key]):
            raise ConfigError(
                f"model.{key}={value!r} contradicts init_from {folder} ({key}={pretrained[key]!r}); the model "
                f"config comes from that folder: remove model.{key} from the run config or set it to "
                f"{pretrained[key]!r} (only {sorted(free_keys)} may change when fine-tuning)"
            )
    hashes = weight_hashes(folder)
    recorded = getattr(config, "init_from_sha256", None)
    if recorded and recorded != hashes:
        raise ConfigError(
            f"init_from_sha256 in the run config is {recorded} but the weights in {folder} hash to "
            f"{hashes}: the folder changed since this run started (or clear init_from_sha256)"
        )
    return dataclasses.replace(config, model=merged, init_from=str(folder), init_from_sha256=hashes)


def load_init_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the folder's weights into ``model`` (built from :func:`resolve_init_from`'s config), strictly: a
    missing, unexpected or reshaped tensor is an error naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"init_from {folder}: no *.safetensors weights (pickled weights are not read)"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:  # one file, or the shards of a sharded save_pretrained
        state.update(load_file(str(path)))
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    reshaped = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or reshaped:
        raise ConfigError(
            f"init_from {folder}: weights do not fit the model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}, shape {reshaped[:5]}"
        )
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()}, strict=True)


def check_resume_provenance(checkpoint: Path, config: Any) -> None:
    """A resumed run must start from the weights its checkpoint started from (a LoRA checkpoint holds only the
    adapter, so its base weights come from init_from again)."""
    import yaml

    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return
    stored = yaml.safe_load(path.read_text()) or {}
    before, now = stored.get("init_from_sha256"), getattr(config, "init_from_sha256", None)
    if before != now:
        raise ConfigError(
            f"--resume {checkpoint}: that run started from weights {before} "
            f"(init_from {stored.get('init_from')}), this one from {now}; resume with the same init_from"
        )


def check_vae_identity(manifest: dict[str, Any], vae_dir: str | Path, where: str) -> None:
    """Latents cached from one VAE decode correctly only through those exact weights (a VAE fine-tuned from it is
    another VAE): refuse ``vae_dir`` unless its weight hashes equal the manifest's."""
    recorded = (manifest.get("vae") or {}).get("weights_sha256")
    if not recorded:
        return
    actual = weight_hashes(vae_dir)
    if actual != recorded:
        raise ConfigError(
            f"{where}: the cached latents come from a VAE with weights {recorded}, but {vae_dir} has "
            f"{actual}; use the VAE the cache was made with (or re-cache with this one)"
        )

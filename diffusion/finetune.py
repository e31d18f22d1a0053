"""Fine-tuning the ShapeDiT: start from a trained DiT (``init_from``) and, optionally, train LoRA adapters only.

Built on diffusers' peft integration rather than our own LoRA layers: ``ShapeDiT`` is a ``PeftAdapterMixin``, so
``add_adapter`` injects peft ``LoraConfig`` layers for training, and the pipeline's
``ShapeDiTLoraLoaderMixin`` (``diffusion/lora_loader.py``: diffusers' transformer-only LoRA loader) reads the saved file back through
``transformer.load_lora_adapter`` with ``set_adapters`` scales and ``fuse_lora`` / ``unfuse_lora``.

The saved adapter is diffusers' pipeline LoRA format: ``pytorch_lora_weights.safetensors`` with keys
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and the peft config (rank, alpha, targets) in the
safetensors header. ``peft`` is the optional extra ``pip install -e ".[lora]"``.

A LoRA run's accelerate checkpoints hold only the adapter (plus optimizer/scheduler/RNG): the frozen base weights
come from ``init_from`` again on resume, checked by their sha256 (see ``core/provenance.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dora_shapegen.errors import ConfigError

logger = logging.getLogger("dora.train_dit")

ADAPTER_NAME = "default"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
# ShapeDiT module-name suffixes behind the shorthands of ``lora.target_modules``.
TARGET_PRESETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out"],  # self- and cross-attention projections
    "mlp": ["mlp.0", "mlp.3"],  # the two Linear layers of each block's MLP (Linear, GELU, Dropout, Linear)
}
# ShapeDiT config keys a fine-tuning run may change; every other key must match the init_from folder.
DIT_FREE_KEYS = frozenset({"dropout"})


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = train the whole DiT; > 0 = LoRA adapters of this rank, base frozen
    alpha: float | None = None  # LoRA output scale is alpha / rank; None = rank (scale 1)
    target_modules: list[str] = field(
        default_factory=lambda: ["attention"]
    )  # presets attention / mlp, or names
    dropout: float = 0.0  # dropout on the adapter's input


def target_module_names(targets: list[str]) -> list[str]:
    """``lora.target_modules`` with the presets expanded (peft matches each name as a module-name suffix)."""
    if not targets:
        raise ConfigError("lora.target_modules is empty: name at least one module (presets: attention, mlp)")
    names: list[str] = []
    for target in targets:
        names += TARGET_PRESETS.get(target, [target])
    return list(dict.fromkeys(names))


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'LoRA needs the `peft` package: pip install -e ".[lora]" (or pip install peft)'
        ) from error


def check_lora_config(config: Any) -> None:
    """Clear errors for a LoRA run that cannot work: no base weights, EMA on, bad rank."""
    lora: LoraConfig = config.lora
    if lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {lora.rank}")
    if lora.rank == 0:
        return
    if not config.init_from:
        raise ConfigError(
            "lora.rank > 0 needs init_from (a trained DiT folder): adapters on a random DiT learn "
            "nothing a full run would not"
        )
    if config.training.use_ema:
        raise ConfigError(
            "training.use_ema must be false with lora.rank > 0 (the adapter itself is exported; "
            "an EMA of a few hundred adapter steps would lag behind it)"
        )
    _require_peft()


def add_lora(model: Any, lora: LoraConfig, seed: int) -> int:
    """Freeze ``model`` and inject LoRA layers (peft, through diffusers' ``add_adapter``); returns the number of
    trainable parameters. lora_B starts at zero, so the adapted model starts as the base model."""
    from peft import LoraConfig as PeftLoraConfig

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # lora_A's random init: the same on every rank and every run
        model.add_adapter(
            PeftLoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha or lora.rank,
                lora_dropout=lora.dropout,
                target_modules=target_module_names(lora.target_modules),
                init_lora_weights="gaussian",
            ),
            adapter_name=ADAPTER_NAME,
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError(f"lora.target_modules {lora.target_modules} matched no module of the DiT")
    return trainable


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft's saved layout (``<module>.lora_A.weight``, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()
    }


def save_adapter(model: Any, directory: str | Path) -> Path:
    """Write the adapter in diffusers' pipeline LoRA format (``DoraTextTo3DPipeline.load_lora_weights`` reads it)."""
    from dora_shapegen.diffusion.lora_loader import ShapeDiTLoraLoaderMixin

    ShapeDiTLoraLoaderMixin.save_lora_weights(
        str(directory),
        transformer_lora_layers=adapter_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config[ADAPTER_NAME].to_dict(),
        weight_name=ADAPTER_FILE,
    )
    return Path(directory) / ADAPTER_FILE


def load_adapter_state(model: Any, directory: str | Path) -> None:
    """Put a saved adapter's tensors back into the adapter layers of ``model`` (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no LoRA adapter ({ADAPTER_FILE}); not a LoRA checkpoint?")
    prefix = "transformer."  # the pipeline component the adapter belongs to
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ConfigError(
            f"{path}: adapter does not fit the model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )


def register_lora_checkpointing(accelerator: Any, model: Any) -> None:
    """Make ``save_state`` / ``load_state`` store the adapter only (diffusers' LoRA example scripts do the same):
    the hooks take the model out of accelerate's lists, so the frozen base is never written to a checkpoint."""

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        weights.clear()  # every rank: nothing of the model goes through accelerate's own writer
        if accelerator.is_main_process:
            save_adapter(model, output_dir)

    def load_hook(models: list[Any], input_dir: str) -> None:
        models.clear()
        load_adapter_state(model, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def init_latent_stats(init_from: str | None, manifest: dict[str, Any], shards: str) -> dict[str, Any]:
    """The manifest to train with when fine-tuning a DiT: its latents must be normalised with the statistics the
    base DiT was trained with (the pipeline holding the base un-normalises with those), and they must come from
    the same VAE weights. Returns ``manifest`` with the base's ``stats`` (unchanged without init_from)."""
    if not init_from:
        return manifest
    path = Path(init_from) / "latent_stats.json"
    if not path.is_file():
        logger.warning(
            "init_from %s has no latent_stats.json: normalising with this cache's statistics", init_from
        )
        return manifest
    base = json.loads(path.read_text())
    base_vae, cache_vae = base.get("vae_sha256"), (manifest.get("vae") or {}).get("weights_sha256")
    if base_vae and cache_vae and base_vae != cache_vae:
        raise ConfigError(
            f"{shards}: latents cached from VAE weights {cache_vae}, but the DiT in {init_from} was "
            f"trained on latents of VAE {base_vae}; cache with that VAE"
        )
    channels = len(base["stats"]["mean"])
    if channels != len(manifest["stats"]["mean"]):
        raise ConfigError(
            f"{shards}: {len(manifest['stats']['mean'])}-channel latents, but the DiT in {init_from} "
            f"was trained on {channels} channels"
        )
    return manifest | {"stats": base["stats"]}


def check_text_encoder(config: Any) -> None:
    """A DiT fine-tuned with another text encoder than it was trained with would read foreign embeddings."""
    if not config.init_from or getattr(config, "condition", "text") == "image":  # an image DiT reads no text
        return
    path = Path(config.init_from) / "run_config.yaml"
    if not path.is_file():
        return
    import yaml

    recorded = (yaml.safe_load(path.read_text()) or {}).get("text_encoder")
    if recorded and recorded != config.text_encoder:
        raise ConfigError(
            f"text_encoder={config.text_encoder!r} contradicts init_from {config.init_from} (trained "
            f"with text_encoder={recorded!r}); set text_encoder: {recorded}"
        )


def prepare_finetune(config: Any, manifest: dict[str, Any], shards: str) -> tuple[Any, dict[str, Any]]:
    """The run config with the init_from model config + provenance (checked against the folder), and the
    manifest to train with (the base DiT's latent statistics). Unchanged for a run from scratch."""
    from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
    from dora_shapegen.provenance import resolve_init_from

    config = resolve_init_from(config, ShapeDiT, DIT_FREE_KEYS)
    check_lora_config(config)
    check_text_encoder(config)
    return config, init_latent_stats(config.init_from, manifest, shards)


def build_dit(config: Any) -> Any:
    """The DiT to train: fresh, or the init_from weights, with LoRA layers when ``lora.rank > 0``."""
    from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
    from dora_shapegen.provenance import load_init_weights

    model = ShapeDiT(**config.model)
    if config.init_from:
        load_init_weights(model, config.init_from)
    if config.lora.rank > 0:
        trainable = add_lora(model, config.lora, config.training.seed)
        logger.info(
            "LoRA rank %d on %s: %d trainable parameters, base frozen",
            config.lora.rank,
            target_module_names(config.lora.target_modules),
            trainable,
        )
    return model

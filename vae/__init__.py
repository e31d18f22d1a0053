"""vae: the Dora shape VAE (vecset latents, dual cross-attention), its training, benchmark and latent caching."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DoraVAE": "dora_shapegen.vae.modeling_dora_vae",
    "DecodedLatents": "dora_shapegen.vae.modeling_dora_vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_shapegen.vae' has no attribute {name!r}")

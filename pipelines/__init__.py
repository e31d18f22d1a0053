"""pipelines: the diffusers text-to-3D pipeline (assemble, generate, mesh post-processing and previews).

The generation benchmark is the subpackage ``bench``; the apps on top (the `dora` CLI, the quickstart, the demo)
are ``apps``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DoraTextTo3DPipeline": "dora_shapegen.pipelines.pipeline_text_to_3d",
    "DoraTextTo3DPipelineOutput": "dora_shapegen.pipelines.pipeline_text_to_3d",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_shapegen.pipelines' has no attribute {name!r}")

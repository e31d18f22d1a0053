"""pipelines: the diffusers text-to-3D and image-to-3D pipelines (assemble, generate, mesh post-processing and
previews; ``load_pipeline`` opens a saved folder with the class that wrote it).

The generation benchmark is the subpackage ``bench``; the apps on top (the `dora` CLI, the quickstart, the demo)
are ``apps``.
"""

from __future__ import annotations

import importlib
from typing import Any

from dora_shapegen.diffusion.foreign_warnings import quiet_foreign_warnings

# Before any module of this package imports diffusers (see diffusion/foreign_warnings.py).
quiet_foreign_warnings()

_EXPORTS = {
    "DoraTextTo3DPipeline": "dora_shapegen.pipelines.pipeline_text_to_3d",
    "DoraTextTo3DPipelineOutput": "dora_shapegen.pipelines.decoding",
    "DoraImageTo3DPipeline": "dora_shapegen.pipelines.pipeline_image_to_3d",
    "load_pipeline": "dora_shapegen.pipelines.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_shapegen.pipelines' has no attribute {name!r}")

"""data: meshes -> watertight -> point samples + occupancy/TSDF supervision; procedural dataset; latent shards.

Names are imported lazily (as diffusers does) so ``import data`` is cheap and a tool that needs one piece does
not pay for the geometry stack of the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MeshProcessor": "dora_shapegen.data.processor",
    "PointCloud": "dora_shapegen.data.sampling",
    "Supervision": "dora_shapegen.data.supervision",
    "PreparedDataset": "dora_shapegen.data.prepare",
    "ProceduralDataset": "dora_shapegen.data.procedural",
    "extract_mesh": "dora_shapegen.data.marching",
    "LatentShardWriter": "dora_shapegen.data.latent_shards",
    "LatentShardDataset": "dora_shapegen.data.latent_shards",
    "LatentStats": "dora_shapegen.data.latent_shards",
    "CorruptShardError": "dora_shapegen.data.latent_shards",
    "latent_shard_pipeline": "dora_shapegen.data.latent_shards",
    "load_manifest": "dora_shapegen.data.latent_shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dora_shapegen.data' has no attribute {name!r}")

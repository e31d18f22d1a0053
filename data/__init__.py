"""data: meshes -> watertight -> point samples + occupancy/TSDF supervision; procedural dataset; latent shards.

Names are imported lazily (as diffusers does) so ``import data`` is cheap and a tool that needs one piece does
not pay for the geometry stack of the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MeshProcessor": "data.processor",
    "PointCloud": "data.sampling",
    "Supervision": "data.supervision",
    "PreparedDataset": "data.prepare",
    "ProceduralDataset": "data.procedural",
    "extract_mesh": "data.marching",
    "LatentShardWriter": "data.latent_shards",
    "LatentShardDataset": "data.latent_shards",
    "LatentStats": "data.latent_shards",
    "CorruptShardError": "data.latent_shards",
    "latent_shard_pipeline": "data.latent_shards",
    "load_manifest": "data.latent_shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")

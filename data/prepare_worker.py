"""The per-shape work of `dora prepare`, in a module free of torch.

Worker processes (spawned) import only this module and the geometry stack, not torch, so a pool starts in a
fraction of a second instead of paying torch's import once per worker.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dora_shapegen.config import from_dict
from dora_shapegen.data.supervision import SALIENT_NOISE_SCALES, UNIFORM_NOISE_SCALES
from dora_shapegen.errors import DiskFullError, is_disk_full
from dora_shapegen.seeding import derive_seed


@dataclass
class PrepareConfig:
    epsilon: float = 2 / 256
    margin: float = 0.95
    sharp_angle_deg: float = 30.0
    min_sharp_edges: int = 8
    tsdf_truncation: float = 0.015
    bounds: float = 1.05
    max_faces: int | None = 2_000_000
    n_uniform: int = 32768
    n_salient: int = 32768
    n_volume: int = 16384
    n_near: int = 16384
    n_sharp: int = 8192
    # Gaussian sigmas of the near-surface and sharp-near query groups (Dora's values by default); a model that
    # cannot resolve the surface that finely learns faster from a wider band (configs/quickstart/prepare.yaml).
    near_noise_scales: list[float] = field(default_factory=lambda: list(UNIFORM_NOISE_SCALES))
    sharp_noise_scales: list[float] = field(default_factory=lambda: list(SALIENT_NOISE_SCALES))
    seed: int = 0
    workers: int = 1
    start_method: str = "spawn"
    # "npz": uncompressed arrays (the default: zlib decompression was about half of a VAE DataLoader worker's time at
    # Dora's point counts, see tests/benchmarks/bench_vae_loading.py); "npz_compressed": the older, smaller files.
    # Both load the same way; `dora convert-prepared` rewrites a folder from one to the other.
    storage: str = "npz"


STORAGE_FORMATS = ("npz", "npz_compressed")


def check_storage(storage: str) -> str:
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"storage must be one of {STORAGE_FORMATS}, got {storage!r}")
    return storage


def shape_seed(seed: int, shape_id: str) -> int:
    """Per-shape seed from the run seed and the shape id: independent of order, workers and sharding."""
    return derive_seed(seed, "prepare-shape", shape_id)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], storage: str = "npz") -> None:
    """Write to a temporary name then ``os.replace``: a killed run never leaves a half-written sample. A failed
    write removes its temporary file; a full disk raises :class:`DiskFullError` naming ``path``."""
    save = np.savez_compressed if check_storage(storage) == "npz_compressed" else np.savez
    # Host and pid in the name: a Ray retry on another node never shares a temporary file with the first try.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            save(handle, **arrays)
    except Exception as error:
        full = is_disk_full(error, path)  # judged before the partial file is removed and frees its space
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path, f"{type(error).__name__}: {error}") from error
        raise
    os.replace(tmp, path)


_PROCESSOR: Any = None
_CONFIG: PrepareConfig | None = None


def init_worker(config_values: dict[str, Any]) -> None:
    global _PROCESSOR, _CONFIG
    from dora_shapegen.data.processor import MeshProcessor

    _CONFIG = from_dict(PrepareConfig, config_values)
    check_storage(_CONFIG.storage)
    _PROCESSOR = MeshProcessor(
        epsilon=_CONFIG.epsilon,
        sharp_angle_deg=_CONFIG.sharp_angle_deg,
        tsdf_truncation=_CONFIG.tsdf_truncation,
        margin=_CONFIG.margin,
        seed=_CONFIG.seed,
        min_sharp_edges=_CONFIG.min_sharp_edges,
        max_faces=_CONFIG.max_faces,
        bounds=_CONFIG.bounds,
        near_noise_scales=_CONFIG.near_noise_scales,
        sharp_noise_scales=_CONFIG.sharp_noise_scales,
    )


def process_item(job: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """Prepare one shape into ``out_path``; never raises: a failure comes back with its reason."""
    item, out_path = job
    start = time.perf_counter()
    config = _CONFIG
    assert config is not None and _PROCESSOR is not None, "worker not initialised"
    try:
        prepared = _PROCESSOR.process(
            item["path"],
            n_uniform=config.n_uniform,
            n_salient=config.n_salient,
            n_volume=config.n_volume,
            n_near=config.n_near,
            n_sharp=config.n_sharp,
            seed=shape_seed(config.seed, item["shape_id"]),
            meta={
                "shape_id": item["shape_id"],
                "caption": item["caption"],
                "captions": item.get("captions") or [],
                "category": item["category"],
            },
        )
        write_npz_atomic(Path(out_path), prepared, config.storage)
    except DiskFullError as error:  # not the shape's fault: the run stops (every next shape would fail alike)
        return {"status": "disk_full", "shape_id": item["shape_id"], "path": out_path, "reason": str(error)}
    except Exception as error:  # one bad shape must never stop the batch
        reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        return {"status": "failed", "shape_id": item["shape_id"], "path": item["path"], "reason": reason}
    return {"status": "done", "shape_id": item["shape_id"], "seconds": time.perf_counter() - start}

"""``MeshProcessor``: the user-facing facade over loading, remeshing, sampling and supervision.

from dora_shapegen.data import MeshProcessor
processor = MeshProcessor(epsilon=2/256)
mesh = processor.load_mesh("chair.obj")
point_cloud = processor.sample_points(mesh, n_uniform=4096, n_salient=512)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from dora_shapegen.data.mesh_io import MeshError, MeshSource, load_mesh
from dora_shapegen.data.sampling import PointCloud, sample_point_cloud
from dora_shapegen.data.supervision import (
    SALIENT_NOISE_SCALES,
    UNIFORM_NOISE_SCALES,
    Supervision,
    sample_supervision,
)
from dora_shapegen.data.watertight import make_watertight
from dora_shapegen.seeding import derive_seed


def _positive_scales(values: Sequence[float], name: str) -> tuple[float, ...]:
    scales = tuple(float(v) for v in values)
    if not scales or any(not np.isfinite(v) or v <= 0 for v in scales):
        raise ValueError(f"{name} must be a non-empty list of positive noise sigmas, got {list(values)}")
    return scales


class MeshProcessor:
    """Mesh -> normalised mesh -> watertight surface -> point samples + occupancy/TSDF supervision."""

    def __init__(
        self,
        epsilon: float = 2 / 256,
        sharp_angle_deg: float = 30.0,
        tsdf_truncation: float = 0.015,
        margin: float = 0.95,
        seed: int = 0,
        min_sharp_edges: int = 8,
        max_faces: int | None = 2_000_000,
        bounds: float = 1.05,
        near_noise_scales: Sequence[float] = UNIFORM_NOISE_SCALES,
        sharp_noise_scales: Sequence[float] = SALIENT_NOISE_SCALES,
    ) -> None:
        self.epsilon = float(epsilon)
        self.sharp_angle_deg = float(sharp_angle_deg)
        self.tsdf_truncation = float(tsdf_truncation)
        self.margin = float(margin)
        self.seed = int(seed)
        self.min_sharp_edges = int(min_sharp_edges)
        self.max_faces = max_faces
        self.bounds = float(bounds)
        self.near_noise_scales = _positive_scales(near_noise_scales, "near_noise_scales")
        self.sharp_noise_scales = _positive_scales(sharp_noise_scales, "sharp_noise_scales")

    def load_mesh(self, source: MeshSource) -> trimesh.Trimesh:
        """Load, merge, clean, normalise into [-1, 1]^3 (``margin``); decimate above ``max_faces``."""
        mesh = load_mesh(source, margin=self.margin)
        if self.max_faces is not None and len(mesh.faces) > self.max_faces:
            mesh = decimate(mesh, self.max_faces)
        return mesh

    def make_watertight(self, mesh: trimesh.Trimesh) -> trimesh.Trimesh:
        return make_watertight(mesh, epsilon=self.epsilon, seed=self.seed)

    def sample_points(
        self,
        mesh: trimesh.Trimesh,
        n_uniform: int = 4096,
        n_salient: int = 512,
        seed: int | None = None,
        sharp_source: trimesh.Trimesh | None = None,
    ) -> PointCloud:
        return sample_point_cloud(
            mesh,
            n_uniform=n_uniform,
            n_salient=n_salient,
            sharp_angle_deg=self.sharp_angle_deg,
            min_sharp_edges=self.min_sharp_edges,
            seed=self.seed if seed is None else seed,
            epsilon=self.epsilon,
            sharp_source=sharp_source,
        )

    def sample_supervision(
        self,
        mesh: trimesh.Trimesh,
        point_cloud: PointCloud | None = None,
        n_volume: int = 16384,
        n_near: int = 16384,
        n_sharp: int = 8192,
        seed: int | None = None,
    ) -> Supervision:
        """Labels against ``mesh`` (the watertight surface, normally); query points around ``point_cloud``
        (sampled from ``mesh`` when not given)."""
        seed = self.seed if seed is None else seed
        if point_cloud is None:
            point_cloud = self.sample_points(mesh, n_uniform=8192, n_salient=2048, seed=seed)
        return sample_supervision(
            mesh,
            point_cloud,
            n_volume=n_volume,
            n_near=n_near,
            n_sharp=n_sharp,
            truncation=self.tsdf_truncation,
            bounds=self.bounds,
            seed=derive_seed(seed, "supervision"),
            near_noise_scales=self.near_noise_scales,
            sharp_noise_scales=self.sharp_noise_scales,
        )

    def process(
        self,
        source: MeshSource,
        n_uniform: int = 32768,
        n_salient: int = 32768,
        n_volume: int = 16384,
        n_near: int = 16384,
        n_sharp: int = 8192,
        seed: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """One shape, end to end: the prepared-sample dict (the npz keys of ``PREPARED/samples/<id>.npz``).

        Sharp edges are found on the clean input (marching cubes rounds them) and their samples projected onto
        the watertight surface, so both point streams and the labels describe the same surface.
        """
        seed = self.seed if seed is None else seed
        mesh = self.load_mesh(source)
        watertight = self.make_watertight(mesh)
        point_cloud = self.sample_points(watertight, n_uniform, n_salient, seed=seed, sharp_source=mesh)
        supervision = self.sample_supervision(watertight, point_cloud, n_volume, n_near, n_sharp, seed=seed)
        record = {
            "source": str(source) if isinstance(source, (str, Path)) else mesh.metadata.get("source"),
            "epsilon": self.epsilon,
            "tsdf_truncation": self.tsdf_truncation,
            "sharp_angle_deg": self.sharp_angle_deg,
            "near_noise_scales": list(self.near_noise_scales),
            "sharp_noise_scales": list(self.sharp_noise_scales),
            "normalization": mesh.metadata["normalization"],
            "seed": int(seed),
            "num_input_faces": int(len(mesh.faces)),
            "decimated_from_faces": int(mesh.metadata.get("decimated_from_faces", 0)),  # 0: not decimated
            "num_watertight_faces": int(len(watertight.faces)),
            **point_cloud.stats,
            **(meta or {}),
        }
        return {
            **point_cloud.to_dict(),
            **supervision.to_dict(),
            "meta": np.array(json.dumps(record)),
        }

    def extract_mesh(
        self,
        field: Any,
        resolution: int = 256,
        threshold: float = 0.5,
        method: str = "hierarchical",
        bounds: float | None = None,
        remove_floaters: bool = False,
        **kwargs: Any,
    ) -> trimesh.Trimesh | list[trimesh.Trimesh]:
        """Marching cubes of an implicit field (e.g. ``vae.decode(latents)``); a list when it holds a batch."""
        from dora_shapegen.data.marching import (
            extract_mesh,  # lazy: the marching module is only needed when decoding
        )

        bounds = self.bounds if bounds is None else bounds
        batch_size = int(getattr(field, "batch_size", 1) or 1)

        def run(one_field: Any) -> trimesh.Trimesh:
            return extract_mesh(
                one_field,
                resolution=resolution,
                threshold=threshold,
                method=method,
                bounds=bounds,
                remove_floaters=remove_floaters,
                **kwargs,
            )

        if batch_size == 1:
            return run(lambda query_points: _first_item(field(query_points)))
        # A field that can hand out one item (vae.DecodedLatents.field) is queried per item: B evaluations
        # of one shape each, instead of B evaluations of the whole batch.
        if callable(getattr(field, "field", None)):
            return [run(field.field(index)) for index in range(batch_size)]
        return [run(_ItemField(field, index)) for index in range(batch_size)]


def _first_item(values: Any) -> Any:
    # (B=1, M) -> (M,); a field that already returns (M,) passes through.
    return values[0] if getattr(values, "ndim", 1) == 2 else values


class _ItemField:
    """Item ``index`` of a batched field: (M, 3) -> (M,) (the batched call returns (B, M))."""

    def __init__(self, field: Any, index: int) -> None:
        self.field, self.index = field, index

    def __call__(self, query_points: Any) -> Any:
        return self.field(query_points)[self.index]  # (M,)


def decimate(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    """Quadric decimation to at most ``max_faces`` faces (fast_simplification), keeping the metadata."""
    import fast_simplification

    target_reduction = 1.0 - max_faces / len(mesh.faces)
    vertices, faces = fast_simplification.simplify(
        np.asarray(mesh.vertices, np.float32),
        np.asarray(mesh.faces, np.int32),
        target_reduction=target_reduction,
    )
    if len(faces) == 0:
        raise MeshError(mesh.metadata.get("source", "<mesh>"), "decimation of a huge mesh left no faces")
    result = trimesh.Trimesh(vertices, faces, process=False)
    result.metadata.update(mesh.metadata)
    result.metadata["decimated_from_faces"] = int(len(mesh.faces))
    return result

"""Load any mesh trimesh reads, merge scenes, clean it and normalise it into [-1, 1]^3.

Every failure is a :class:`MeshError` naming the file and the cause, so a batch job can log it and go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import trimesh

MeshSource = str | Path | trimesh.Trimesh | trimesh.Scene
# The file types a folder scan picks up as meshes (`dora prepare FOLDER`, `dora bench --meshes FOLDER`); the loader
# reads anything trimesh reads. What the pipeline writes is pipelines.mesh_post.EXPORT_FORMATS.
MESH_INPUT_SUFFIXES = frozenset({".obj", ".ply", ".stl", ".off", ".glb", ".gltf"})


class MeshError(ValueError):
    """A mesh that cannot be used: ``source`` names the file (or object), ``reason`` says what is wrong."""

    def __init__(self, source: Any, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def _describe(source: MeshSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    name = getattr(source, "metadata", {}).get("file_name") if hasattr(source, "metadata") else None
    return f"<{type(source).__name__}{' ' + name if name else ''}>"


def _read(path: Path) -> trimesh.Trimesh | trimesh.Scene | trimesh.PointCloud:
    if not path.exists():
        raise MeshError(path, "file not found")
    if path.is_dir():
        raise MeshError(path, "is a directory, not a mesh file")
    if path.stat().st_size == 0:
        raise MeshError(path, "empty file (0 bytes)")
    try:
        # process=False: we merge/clean ourselves, with checks that give clear errors.
        loaded = trimesh.load(str(path), process=False)
    except Exception as error:  # trimesh raises many types (ValueError, KeyError, IndexError, ...)
        raise MeshError(path, f"could not parse the file ({type(error).__name__}: {error})") from error
    return loaded


def _to_single_mesh(loaded: Any, where: str) -> trimesh.Trimesh:
    """Merge a scene (with its node transforms) into one Trimesh; reject things without faces."""
    if isinstance(loaded, trimesh.Scene):
        meshes = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
        if not meshes:
            kinds = sorted({type(g).__name__ for g in loaded.geometry.values()})
            if any(k in ("PointCloud",) for k in kinds):
                raise MeshError(where, "point cloud without faces (a mesh with triangles is needed)")
            raise MeshError(where, f"scene holds no triangle mesh (geometry: {kinds or 'none'})")
        loaded = trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
    if isinstance(loaded, trimesh.PointCloud):
        raise MeshError(where, "point cloud without faces (a mesh with triangles is needed)")
    if isinstance(loaded, list):  # some loaders return a list of geometries
        return _to_single_mesh(trimesh.Scene(loaded), where)
    if not isinstance(loaded, trimesh.Trimesh):
        raise MeshError(where, f"not a triangle mesh (got {type(loaded).__name__})")
    return loaded


def clean_mesh(mesh: trimesh.Trimesh, where: str = "<mesh>") -> trimesh.Trimesh:
    """Reject NaN/inf and face-less meshes; drop degenerate and duplicate faces and unused vertices."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(vertices) == 0:
        raise MeshError(where, "no vertices")
    if len(faces) == 0:
        raise MeshError(where, f"zero faces ({len(vertices)} vertices; a point cloud is not a mesh)")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(where, "face indices out of range")
    finite = np.isfinite(vertices).all(axis=1)
    if not finite.all():
        raise MeshError(where, f"{int((~finite).sum())} vertices have NaN/inf coordinates")
    # Judge merging and degeneracy in the mesh's own scale: trimesh merges vertices on an absolute 1e-8 grid,
    # which collapses a valid box of size 1e-30 into one point and overflows int64 for a box of size 1e30 (both
    # then read as "all faces degenerate"). So clean a copy centred and scaled to unit extent, then map back.
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    center = (low + high) / 2.0
    with np.errstate(over="ignore"):
        extent = float(np.max(high - low))
    if not np.isfinite(extent):
        raise MeshError(where, "coordinate range overflows float64")
    # All vertices coinciding leave nothing to rescale: every face is degenerate and is reported below.
    unit = extent if extent > 0 else 1.0
    mesh = trimesh.Trimesh((vertices - center) / unit, faces, process=False)
    # Merge by position only: per-face vertices (STL, split normals/UVs) would hide the edges the sharp-edge
    # detector needs.
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    faces = mesh.faces
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    # Relative to the unit extent: 1e-14 is a sliver far below any real triangle's share of the bounding box.
    keep = ~repeated & (mesh.area_faces > 1e-14)
    if not keep.any():
        raise MeshError(where, f"all {len(faces)} faces are degenerate (zero area)")
    mesh.update_faces(keep)
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    mesh.vertices = np.asarray(mesh.vertices) * unit + center  # back to the source's units
    return mesh


def normalize_mesh(mesh: trimesh.Trimesh, margin: float = 0.95, where: str = "<mesh>") -> trimesh.Trimesh:
    """Centre on the bounding-box centre, scale the largest half-extent to ``margin``.

    The transform is kept in ``mesh.metadata["normalization"] = {"center": [3], "scale": s}``;
    ``original = normalised / scale + center``.
    """
    low, high = mesh.bounds
    center = (low + high) / 2.0
    half_extent = float(np.max(high - low)) / 2.0
    if not np.isfinite(half_extent) or half_extent <= 0:
        raise MeshError(where, "mesh has zero extent (all vertices coincide)")
    scale = margin / half_extent
    mesh.vertices = (mesh.vertices - center) * scale
    mesh.metadata["normalization"] = {"center": [float(c) for c in center], "scale": float(scale)}
    return mesh


def denormalize_vertices(vertices: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Map normalised coordinates back to the source mesh's frame."""
    return np.asarray(vertices) / normalization["scale"] + np.asarray(normalization["center"])


def load_mesh(source: MeshSource, margin: float = 0.95, normalize: bool = True) -> trimesh.Trimesh:
    """Load a path (obj, ply, stl, off, glb/gltf, ...) or take a Trimesh/Scene; return one clean mesh.

    Raises :class:`MeshError` naming the file and the cause for empty, unparseable, face-less, NaN/inf or
    all-degenerate input.
    """
    where = _describe(source)
    if isinstance(source, (str, Path)):
        loaded = _read(Path(source))
    else:
        loaded = source.copy()
    mesh = _to_single_mesh(loaded, where)
    mesh = clean_mesh(mesh, where)
    mesh.metadata["source"] = where
    if normalize:
        mesh = normalize_mesh(mesh, margin=margin, where=where)
    return mesh

"""Mesh post-processing for generated shapes: floaters, face reduction, export; previews re-exported.

The renderer lives in ``data.render`` so lower stages (the VAE's validation and benchmark) can draw too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from dora_shapegen.data.render import (  # noqa: F401  (re-exported: the pipeline's public preview API)
    _as_trimesh,
    render_grid_png,
    render_mesh_image,
    render_mesh_png,
)

EXPORT_FORMATS = {".glb": "glb", ".obj": "obj", ".ply": "ply", ".stl": "stl"}


# ------------------------------------------------------------------------------------------ post-processing
def remove_floaters(
    mesh: trimesh.Trimesh, min_fraction: float = 0.05, measure: str = "area"
) -> trimesh.Trimesh:
    """Drop connected components smaller than ``min_fraction`` of the largest one; keep all others.

    ``measure`` is "area" (default: a coarse big part with few faces is not a floater) or "faces".
    Components are edge-connected after merging duplicate vertices. Returns a new mesh.
    """
    if measure not in ("area", "faces"):
        raise ValueError(f"measure must be 'area' or 'faces', got {measure!r}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    result = _as_trimesh(mesh).copy()
    if len(result.faces) == 0:
        return result
    result.merge_vertices()
    labels = trimesh.graph.connected_component_labels(
        result.face_adjacency, node_count=len(result.faces)
    )  # (F,)
    weights = result.area_faces if measure == "area" else np.ones(len(result.faces))
    sizes = np.bincount(labels, weights=weights)  # (num_components,)
    keep_faces = sizes[labels] >= min_fraction * sizes.max()
    if keep_faces.all():
        return result
    result.update_faces(keep_faces)
    result.remove_unreferenced_vertices()
    return result


def simplify(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast_simplification) to about ``target_faces``; a copy if already at or below."""
    if target_faces < 1:
        raise ValueError(f"target_faces must be >= 1, got {target_faces}")
    mesh = _as_trimesh(mesh)
    if len(mesh.faces) <= target_faces:
        return mesh.copy()
    import fast_simplification  # imported here: only simplification needs the compiled extension

    vertices, faces = fast_simplification.simplify(
        np.ascontiguousarray(mesh.vertices, dtype=np.float64),
        np.ascontiguousarray(mesh.faces, dtype=np.int64),
        target_count=int(target_faces),
    )
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=True)


def export_mesh(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write ``mesh`` in the format named by the extension (.glb, .obj, .ply, .stl); returns the path."""
    path = Path(path)
    file_type = EXPORT_FORMATS.get(path.suffix.lower())
    if file_type is None:
        raise ValueError(
            f"cannot export {path}: unsupported extension {path.suffix!r}; "
            f"use one of {', '.join(EXPORT_FORMATS)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _as_trimesh(mesh).export(path, file_type=file_type)
    return path


# ------------------------------------------------------------------------------------------ rasteriser

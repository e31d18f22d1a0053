"""The end of a call of both pipelines: DiT-space latents -> VAE space -> meshes in the requested output type.

Each shape's mesh is extracted coarse-to-fine from its decoded VAE field (``data.marching``), then reduced to at
most ``max_faces`` faces; the result is a :class:`DoraTextTo3DPipelineOutput` (or a tuple). ``DoraTextTo3DPipeline``
and ``DoraImageTo3DPipeline`` call :func:`finish` at the end of ``__call__`` (and :func:`decode_meshes` through
their ``decode_latents``), as they run ``pipelines/denoising.py`` for the loop before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from dora_shapegen.data.marching import extract_mesh


@dataclass
class DoraTextTo3DPipelineOutput(BaseOutput):
    """Output of :class:`DoraTextTo3DPipeline`.

    meshes: one entry per generated shape (prompt-major: all shapes of prompt 0, then prompt 1, ...):
        ``trimesh.Trimesh`` for ``output_type="trimesh"``, ``(vertices (V,3) float32, faces (F,3) int64)`` numpy
        tuples for ``"np"``, None for ``"latent"``.
    latents: the generated latents in VAE space (un-normalised with the cache statistics, ready for
        ``pipe.vae.decode``), (B*num_shapes, N, C); a torch tensor, or a numpy array for ``"np"``.
    """

    meshes: list[Any] | None
    latents: torch.Tensor | np.ndarray


def reduce_faces(mesh: Any, max_faces: int) -> Any:
    """``mesh`` with at most ``max_faces`` faces (quadric decimation); ``metadata["extracted_faces"]`` keeps the
    count before reduction."""
    from dora_shapegen.pipelines.mesh_post import simplify

    extracted = len(mesh.faces)
    if extracted > max_faces:
        metadata = dict(mesh.metadata)
        mesh = simplify(mesh, max_faces)
        mesh.metadata.update(metadata)
    mesh.metadata["extracted_faces"] = extracted
    return mesh


def decode_meshes(
    vae: Any,
    latents: torch.Tensor,
    mesh_resolution: int = 256,
    mesh_threshold: float = 0.5,
    remove_floaters: bool = True,
) -> list[Any]:
    """VAE-space latents (B, N, C) -> one trimesh per item from ``vae``'s field (an empty one where the field never
    crosses ``mesh_threshold``); the pipelines call it under ``torch.no_grad``."""
    vae_parameter = next(vae.parameters())
    vae_dtype, vae_device = vae_parameter.dtype, vae_parameter.device
    meshes = []
    for index in range(latents.shape[0]):
        # One item at a time: the field is queried in chunks, so peak memory stays that of one shape.
        decoded = vae.decode(latents[index : index + 1].to(device=vae_device, dtype=vae_dtype))

        def field(query_points: torch.Tensor, decoded=decoded) -> torch.Tensor:
            return decoded(query_points.to(vae_dtype))[0].float()  # (M, 3) -> (M,)

        meshes.append(extract_mesh(
            field, resolution=int(mesh_resolution), threshold=float(mesh_threshold), method="hierarchical",
            remove_floaters=remove_floaters, device=vae_device,
        ))  # fmt: skip
    return meshes


def finish(
    pipe: Any,
    latents: torch.Tensor,
    output_type: str,
    mesh_resolution: int,
    mesh_threshold: float,
    remove_floaters: bool,
    return_dict: bool,
    max_faces: int | None = None,
) -> DoraTextTo3DPipelineOutput | tuple:
    """DiT-space latents (B, N, C) -> VAE space -> meshes in the requested output type (the last step of a call),
    each reduced to at most ``max_faces`` faces (None: as extracted)."""
    vae_latents = pipe.unnormalize_latents(latents.float())  # (B*S, N, C)
    meshes = None
    if output_type != "latent":
        meshes = pipe.decode_latents(
            vae_latents,
            mesh_resolution=mesh_resolution,
            mesh_threshold=mesh_threshold,
            remove_floaters=remove_floaters,
        )
        if max_faces is not None:
            meshes = [reduce_faces(mesh, max_faces) for mesh in meshes]
    if output_type == "np":
        meshes = [
            (np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64))
            for mesh in meshes
        ]
        vae_latents = vae_latents.cpu().numpy()

    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (meshes, vae_latents)
    return DoraTextTo3DPipelineOutput(meshes=meshes, latents=vae_latents)

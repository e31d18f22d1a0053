"""Dora-bench latent-space quality: smoothness under latent noise, and linear interpolation between shapes.

Both matter for the diffusion model downstream: it samples latents that are never exactly an encoder output, so
a small step in latent space should be a small step in shape (smoothness), and the space between two shapes should
hold valid shapes (interpolation). Distances are in the [-1, 1] normalisation, as every Dora-bench metric.

Smoothness: z' = z + s * std(z) * noise, noise ~ N(0, I), for each scale ``s`` (so the scales are comparable
across models whose latents have different spreads); std(z) is taken over all tokens and channels of the shape.
The decoded change is reported against the *unperturbed* decode (not the ground truth), so it measures the
decoder's sensitivity alone: ``iou`` = volume IoU of the two occupancies (> 0.5) on uniform volume points
(1 = unchanged) and ``chamfer_l1`` between the two extracted meshes (0 = unchanged).

Interpolation: z(t) = (1 - t) z_a + t z_b at equally spaced t, endpoints included, token i of one shape paired with
token i of the other. The pairing is arbitrary for a set, but the encoder emits tokens in interleaved FPS order,
so equal indices cover roughly corresponding regions; this is the interpolation a user of the latents gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import trimesh

from dora_shapegen.metrics import chamfer_distance, volume_iou
from dora_shapegen.vae.bench.metrics import sample_surface

Extractor = Callable[[Any], trimesh.Trimesh]  # DecodedLatents (one shape) -> mesh


def _chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, num_points: int, seed: int) -> float:
    """Chamfer-L1 between two meshes; NaN when either is empty (nothing to compare)."""
    if len(a.faces) == 0 or len(b.faces) == 0:
        return math.nan
    return chamfer_distance(sample_surface(a, num_points, seed)[0], sample_surface(b, num_points, seed)[0])[
        "chamfer_l1"
    ]


def is_single_watertight(mesh: trimesh.Trimesh) -> bool:
    """One connected piece whose every edge is shared by exactly two faces."""
    if len(mesh.faces) == 0 or not mesh.is_watertight:
        return False
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    return int(labels.max()) == 0


@torch.no_grad()
def smoothness(
    model: Any,
    latents: torch.Tensor,
    volume_points: np.ndarray,
    extract: Extractor,
    noise_scales: list[float],
    num_samples: int,
    surface_points: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Decoded change per noise scale for one shape's latents (1, N, C): {f"{s:g}": {iou, iou_change,
    chamfer_l1, empty_fraction}} averaged over ``num_samples`` draws, plus "clean" stats (latent_std)."""
    decoded = model.decode(latents)
    clean_occupancy = decoded(volume_points)[0].float().cpu().numpy() > 0.5  # (M,)
    clean_mesh = extract(decoded)
    scale = float(latents.float().std())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result: dict[str, dict[str, float]] = {
        "clean": {"latent_std": scale, "empty": float(len(clean_mesh.faces) == 0)}
    }
    for noise_scale in noise_scales:
        ious, chamfers, empty = [], [], 0
        for _ in range(num_samples):
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            perturbed = model.decode(latents + noise_scale * scale * noise)  # (1, N, C) -> field
            occupancy = perturbed(volume_points)[0].float().cpu().numpy() > 0.5  # (M,)
            ious.append(volume_iou(occupancy, clean_occupancy))
            mesh = extract(perturbed)
            empty += len(mesh.faces) == 0
            chamfers.append(_chamfer(mesh, clean_mesh, surface_points, seed))
        finite = [c for c in chamfers if math.isfinite(c)]
        result[f"{noise_scale:g}"] = {
            "iou": float(np.mean(ious)),
            "iou_change": float(1.0 - np.mean(ious)),
            "chamfer_l1": float(np.mean(finite)) if finite else math.nan,
            "empty_fraction": empty / max(num_samples, 1),
        }
    return result


@torch.no_grad()
def interpolation(
    model: Any,
    latents_a: torch.Tensor,
    latents_b: torch.Tensor,
    extract: Extractor,
    num_steps: int,
    surface_points: int,
    seed: int,
) -> dict[str, Any]:
    """Decode ``num_steps`` points of the segment between two shapes' latents (1, N, C) and score the path.

    Returns ``single_watertight_fraction`` (interior interpolants that are one watertight piece),
    ``monotonic_fraction`` (steps where the Chamfer distance to A does not fall and to B does not rise, with a
    tolerance of 1% of the A-B distance), ``max_second_difference`` (largest |d(t-1) - 2 d(t) + d(t+1)| of either
    distance curve, divided by the A-B distance: 0 for distances changing at a constant rate, a jump in shape
    shows as a spike), ``max_linearity_deviation`` (max |d_A / (d_A + d_B) - t|), and the curves themselves.
    Curve metrics are NaN when an interpolant (or an endpoint) decodes to an empty mesh.
    """
    if num_steps < 3:
        raise ValueError(
            f"interpolation needs at least 3 steps (endpoints + one interpolant), got {num_steps}"
        )
    if latents_a.shape != latents_b.shape:
        raise ValueError(
            f"interpolating latents of different shapes {tuple(latents_a.shape)} / {tuple(latents_b.shape)}"
        )
    ts = np.linspace(0.0, 1.0, num_steps)
    meshes = [extract(model.decode((1.0 - t) * latents_a + t * latents_b)) for t in ts]  # (1, N, C) each
    single = [is_single_watertight(mesh) for mesh in meshes]
    to_a = np.array([_chamfer(mesh, meshes[0], surface_points, seed) for mesh in meshes])
    to_b = np.array([_chamfer(mesh, meshes[-1], surface_points, seed) for mesh in meshes])
    to_a[0], to_b[-1] = 0.0, 0.0  # exactly the endpoint (also when it is empty)
    gap = to_b[0]
    result: dict[str, Any] = {
        "t": ts.tolist(),
        "single_watertight": single,
        "single_watertight_fraction": float(np.mean(single[1:-1])),
        "endpoint_single_watertight": float(np.mean([single[0], single[-1]])),
        "distance_to_a": to_a.tolist(),
        "distance_to_b": to_b.tolist(),
        "endpoint_distance": float(gap),
    }
    if not (np.isfinite(to_a).all() and np.isfinite(to_b).all()) or gap <= 0:
        return result | dict.fromkeys(
            ("monotonic_fraction", "max_second_difference", "max_linearity_deviation"), math.nan
        )
    tolerance = 0.01 * gap
    monotonic = (np.diff(to_a) >= -tolerance) & (np.diff(to_b) <= tolerance)
    second = max(np.abs(np.diff(to_a, 2)).max(), np.abs(np.diff(to_b, 2)).max()) / gap
    total = to_a + to_b
    position = np.divide(to_a, total, out=np.full_like(to_a, 0.5), where=total > 0)
    return result | {
        "monotonic_fraction": float(monotonic.mean()),
        "max_second_difference": float(second),
        "max_linearity_deviation": float(np.abs(position - ts).max()),
    }


def mean_dicts(rows: list[dict[str, Any]], keys: list[str] | None = None) -> dict[str, float]:
    """NaN-aware mean of the numeric entries shared by ``rows`` (``num`` = number of rows)."""
    keys = keys or sorted(
        {k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    out: dict[str, float] = {"num": len(rows)}
    for key in keys:
        values = np.array([row[key] for row in rows if isinstance(row.get(key), (int, float))], dtype=float)
        finite = values[np.isfinite(values)]
        out[key] = float(finite.mean()) if len(finite) else math.nan
    return out

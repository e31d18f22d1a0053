"""Deterministic farthest point sampling that returns indices in FPS order.

The order matters: the VAE's query tokens are taken in FPS order, so any prefix of them covers the shape
coarsely. ``fpsample.fps_sampling`` (exact FPS, C++) serves CPU tensors; ``fpsample``'s bucket/kd variants are
faster but, in fpsample 1.0, return neither the FPS order nor the exact FPS set, which would break prefixes.
Tensors on an accelerator use a batched torch loop that never syncs with the host.
"""

from __future__ import annotations

import numpy as np
import torch


def _fps_torch(points: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Batched exact FPS starting at index 0. points (B, N, 3) -> indices (B, K)."""
    batch, count, _ = points.shape
    indices = torch.zeros(batch, num_samples, dtype=torch.long, device=points.device)
    distances = torch.full((batch, count), float("inf"), device=points.device, dtype=points.dtype)
    farthest = torch.zeros(batch, dtype=torch.long, device=points.device)
    rows = torch.arange(batch, device=points.device)
    for step in range(num_samples):
        indices[:, step] = farthest
        chosen = points[rows, farthest]  # (B, 3)
        distances = torch.minimum(distances, ((points - chosen[:, None]) ** 2).sum(-1))  # (B, N)
        farthest = distances.argmax(dim=-1)  # (B,)
    return indices


def farthest_point_indices(points: torch.Tensor, num_samples: int, backend: str = "auto") -> torch.Tensor:
    """Indices (B, K) of ``num_samples`` farthest points of each cloud in ``points`` (B, N, 3), in FPS order.

    Deterministic: every cloud starts at its point 0. ``backend`` is "auto" (fpsample on CPU, torch elsewhere),
    "fpsample" or "torch".
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(
            f"farthest_point_indices expects points of shape (B, N, 3), got {tuple(points.shape)}"
        )
    batch, count, _ = points.shape
    if num_samples > count:
        raise ValueError(f"cannot pick {num_samples} farthest points from a cloud of {count} points")
    if num_samples <= 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=points.device)
    if backend == "auto":
        backend = "fpsample" if points.device.type == "cpu" else "torch"
    if backend == "torch":
        return _fps_torch(points.detach(), num_samples)
    if backend != "fpsample":
        raise ValueError(f"unknown FPS backend {backend!r} (expected 'auto', 'fpsample' or 'torch')")
    import fpsample  # imported here: accelerator-only runs never need it

    clouds = points.detach().to("cpu", torch.float32).numpy()
    # fpsample works on one cloud at a time, so the batch is a loop.
    picked = [
        fpsample.fps_sampling(np.ascontiguousarray(cloud), num_samples, start_idx=0).astype(np.int64)
        for cloud in clouds
    ]
    return torch.from_numpy(np.stack(picked)).to(points.device)  # (B, K)

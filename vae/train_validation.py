"""Validation of a VAE during training: volume IoU and Chamfer of extracted meshes on the held-out shapes, PNGs.

Kept apart from ``vae/train.py`` so the training loop stays readable. Plots use a small matplotlib helper of our own
because ``vae`` must not import ``pipelines`` (data flows one way: data -> vae -> diffusion -> pipelines).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dora_shapegen.metrics import chamfer_distance, volume_iou


def _item_inputs(item: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return item["uniform"][None].to(device), item["salient"][None].to(device)  # (1, Nu, 6), (1, Ns, 6)


@torch.no_grad()
def validate(
    model: Any,
    items: list[dict[str, Any]],
    token_counts: list[int],
    mesh_token_counts: list[int],
    mesh_resolution: int,
    mesh_shapes: int,
    chamfer_points: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[int, list[Any]]]:
    """Held-out metrics: ``iou@K`` (volume IoU on the supervision's volume points) and ``chamfer@K`` per token count.

    Returns (metrics, meshes by token count for the first ``mesh_shapes`` items, for the reconstruction PNG).
    """
    from dora_shapegen.data.marching import extract_mesh  # the coarse-to-fine extractor of data/

    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    meshes: dict[int, list[Any]] = {}
    for num_tokens in sorted(set(token_counts) | set(mesh_token_counts)):
        ious, chamfers = [], []
        for index, item in enumerate(items):
            uniform, salient = _item_inputs(item, device)
            latents = model.encode(
                {"uniform": uniform, "salient": salient}, num_tokens=num_tokens
            )  # (1, K, C)
            if num_tokens in token_counts:
                volume = item["sup_group"] == 0
                query = item["sup_points"][volume].to(device)  # (M, 3)
                occupancy = (
                    model.decode_at_points(latents, query, output="occupancy")[0].float().cpu()
                )  # (M,)
                ious.append(volume_iou(occupancy > 0.5, item["sup_occupancy"][volume] > 0.5))
            if num_tokens in mesh_token_counts and index < mesh_shapes:
                # decode() runs the latent transformer once; extraction then only queries the field.
                field = model.decode(latents).field(0)  # (M, 3) -> (M,) occupancy-like
                mesh = extract_mesh(field, resolution=mesh_resolution, threshold=0.5)
                meshes.setdefault(num_tokens, []).append(mesh)
                chamfers.append(chamfer(mesh, item["uniform"][:, :3].numpy(), chamfer_points))
        if ious:
            metrics[f"iou@{num_tokens}"] = float(np.mean(ious))
        if chamfers:
            finite = [c for c in chamfers if math.isfinite(c)]
            metrics[f"chamfer@{num_tokens}"] = float(np.mean(finite)) if finite else float("nan")
            metrics[f"empty_meshes@{num_tokens}"] = float(len(chamfers) - len(finite))
    model.train(was_training)
    return metrics, meshes


def chamfer(mesh: Any, surface_points: np.ndarray, num_points: int) -> float:
    """Chamfer-L1 (``dora_shapegen.metrics``) between ``num_points`` surface samples of the extracted mesh and the
    ground truth's stored surface points; NaN for an empty mesh."""
    import trimesh

    if mesh is None or len(getattr(mesh, "faces", [])) == 0:
        return float("nan")  # nothing extracted: reported as an empty mesh, not as a distance
    samples, _ = trimesh.sample.sample_surface(mesh, num_points, seed=0)
    return chamfer_distance(samples, surface_points)["chamfer_l1"]


def _scatter(axis: Any, points: np.ndarray, title: str) -> None:
    axis.scatter(points[:, 0], points[:, 2], points[:, 1], s=0.5, c=points[:, 1], cmap="viridis")
    axis.set_title(title, fontsize=7)
    axis.set_xlim(-1, 1), axis.set_ylim(-1, 1), axis.set_zlim(-1, 1)
    axis.set_axis_off()


def save_reconstruction_png(
    items: list[dict[str, Any]], meshes: dict[int, list[Any]], path: str | Path, points: int = 2000
) -> None:
    """Rows: held-out shapes; columns: ground-truth surface points, then mesh surface samples per token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import trimesh

    token_counts = sorted(meshes)
    rows = max((len(m) for m in meshes.values()), default=0)
    if rows == 0:
        return
    figure = plt.figure(figsize=(2.2 * (1 + len(token_counts)), 2.2 * rows))
    for row in range(rows):
        gt = items[row]["uniform"][:points, :3].numpy()
        _scatter(
            figure.add_subplot(
                rows, 1 + len(token_counts), row * (1 + len(token_counts)) + 1, projection="3d"
            ),
            gt,
            "ground truth",
        )
        for column, num_tokens in enumerate(token_counts):
            axis = figure.add_subplot(
                rows, 1 + len(token_counts), row * (1 + len(token_counts)) + column + 2, projection="3d"
            )
            mesh = meshes[num_tokens][row]
            if mesh is None or len(mesh.faces) == 0:
                axis.set_title(f"{num_tokens} tokens: empty", fontsize=7)
                axis.set_axis_off()
                continue
            samples, _ = trimesh.sample.sample_surface(mesh, points, seed=0)
            _scatter(axis, np.asarray(samples), f"{num_tokens} tokens")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def save_curves_png(history: dict[str, list[list[float]]], path: str | Path) -> None:
    """Training loss (left, log scale) and held-out IoU per token count (right) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, iou_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    if history.get("loss"):
        steps, values = zip(*history["loss"])
        loss_axis.plot(steps, values, lw=0.8)
        loss_axis.set_yscale("log")
    loss_axis.set_title("training loss"), loss_axis.set_xlabel("step")
    for key in sorted(k for k in history if k.startswith("iou@")):
        steps, values = zip(*history[key])
        iou_axis.plot(steps, values, marker="o", ms=3, label=key)
    iou_axis.set_title("held-out volume IoU"), iou_axis.set_xlabel("step"), iou_axis.set_ylim(0, 1)
    if any(k.startswith("iou@") for k in history):
        iou_axis.legend(fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)

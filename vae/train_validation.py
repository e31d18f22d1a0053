"""Validation of a VAE during training: held-out split, volume IoU, Chamfer of extracted meshes, PNGs.

Kept apart from ``vae/train.py`` so the training loop stays readable. Plots use a small matplotlib helper of our own
because ``vae`` must not import ``pipelines`` (data flows one way: data -> vae -> diffusion -> pipelines).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def is_held_out(shape_id: str, fraction: float) -> bool:
    """A fixed split by shape-id hash: the same shape is held out in every run, on every rank and machine."""
    digest = hashlib.sha1(shape_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_indices(shape_ids: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices); never leaves either side empty when there are >= 2 shapes."""
    held = [i for i, sid in enumerate(shape_ids) if is_held_out(sid, fraction)]
    train = [i for i, sid in enumerate(shape_ids) if not is_held_out(sid, fraction)]
    if fraction > 0 and not held and len(train) >= 2:
        held = [train.pop()]  # tiny sets (tests) may hash nothing into the split
    if not train and len(held) >= 2:
        train = [held.pop(0)]
    return train, held


def _item_inputs(item: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return item["uniform"][None].to(device), item["salient"][None].to(device)  # (1, Nu, 6), (1, Ns, 6)


def volume_iou(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of two boolean occupancy vectors; 1.0 when both are empty."""
    union = (predicted | target).sum().item()
    return 1.0 if union == 0 else (predicted & target).sum().item() / union


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
    """Symmetric Chamfer distance (point_cloud_utils) between mesh surface samples and ground-truth surface points."""
    import point_cloud_utils as pcu
    import trimesh

    if mesh is None or len(getattr(mesh, "faces", [])) == 0:
        return float("nan")  # nothing extracted: reported as an empty mesh, not as a distance
    samples, _ = trimesh.sample.sample_surface(mesh, num_points, seed=0)
    return float(
        pcu.chamfer_distance(np.asarray(samples, dtype=np.float32), surface_points.astype(np.float32))
    )


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

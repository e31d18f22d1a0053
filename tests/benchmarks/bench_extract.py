"""Benchmark: hierarchical (coarse-to-fine) vs dense mesh extraction at 256^3 on one shape's field.

Targets (issue 3): >= 10x fewer field queries, >= 5x faster, volume IoU >= 0.99 between the two meshes.

    python tests/benchmarks/bench_extract.py                       # stand-in field (see below), 256^3
    python tests/benchmarks/bench_extract.py --vae runs/vae/final  # a DoraVAE save_pretrained folder

Field: with ``--vae DIR`` the decoder of that model on one shape's latents (``--num-tokens``). Without it, a
stand-in: a small Fourier-feature MLP fitted for a few hundred steps to the occupancy (winding number) of a real mesh
(``--mesh``, default fandisk from ../shared/meshes). It has a decoder's traits that matter here -- a smooth learned
field with imperfect, slightly noisy level sets, evaluated by batched torch matmuls -- at a far lower cost per query
than the real decoder (a cross-attention into thousands of tokens). A cheap field makes the fixed costs (marching
cubes, grid bookkeeping) weigh more, so the stand-in's speed-up is a lower bound for the real decoder's.

Prints a table and a JSON object of the figures and ratios (``--json PATH`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm import tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[2]

from dora_shapegen.data import MeshProcessor  # noqa: E402
from dora_shapegen.data.marching import evaluate_grid, mesh_from_grid  # noqa: E402
from dora_shapegen.metrics import chamfer_distance, volume_iou  # noqa: E402
from dora_shapegen.vae.bench.metrics import mesh_occupancy, mesh_volume_iou, sample_surface  # noqa: E402

DEFAULT_MESH = PROJECT_ROOT.parent / "shared" / "meshes" / "fandisk.off"


class StandInOccupancyField(ModelMixin, ConfigMixin):
    """Fourier features -> MLP -> occupancy logit; a benchmark stand-in for a decoded latent, never saved."""

    @register_to_config
    def __init__(self, num_frequencies: int = 6, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies), persistent=False)
        layers: list[nn.Module] = [nn.Linear(3 + 6 * num_frequencies, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def logits(self, points: torch.Tensor) -> torch.Tensor:
        angles = points[..., None] * self.frequencies  # (M, 3, F)
        features = torch.cat(
            [points, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1
        )  # (M, 3+6F)
        return self.mlp(features).squeeze(-1)  # (M,)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(points))  # (M,) occupancy in [0, 1]


def fit_stand_in(mesh_path: Path, steps: int, seed: int) -> tuple[StandInOccupancyField, dict]:
    """Fit the stand-in to a real mesh's occupancy: half near-surface points, half uniform in the box."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mesh = MeshProcessor(seed=seed).load_mesh(mesh_path)
    surface, _ = sample_surface(mesh, 100_000, seed)
    points = np.concatenate(
        [surface + rng.normal(scale=0.02, size=surface.shape), rng.uniform(-1.05, 1.05, (100_000, 3))]
    )
    labels = mesh_occupancy(mesh, points).astype(np.float32)
    points_t, labels_t = torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels)
    model = StandInOccupancyField()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in tqdm(range(steps), desc="fit stand-in field", leave=False):
        batch = torch.randint(0, len(points_t), (8192,))
        loss = nn.functional.binary_cross_entropy_with_logits(model.logits(points_t[batch]), labels_t[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    test = rng.uniform(-1.05, 1.05, (100_000, 3))
    with torch.no_grad():
        predicted = model(torch.from_numpy(test.astype(np.float32))).numpy() > 0.5
    info = {
        "mesh": str(mesh_path),
        "fit_steps": steps,
        "fit_volume_iou": volume_iou(predicted, mesh_occupancy(mesh, test)),
    }
    return model, info


def vae_field(vae_dir: str, mesh_path: Path, num_tokens: int, seed: int):
    from dora_shapegen.vae import (
        DoraVAE,  # the benchmark may run before/without a trained model; import only when asked
    )

    model = DoraVAE.from_pretrained(vae_dir).eval()
    config = model.config
    processor = MeshProcessor(epsilon=float(config.epsilon), seed=seed)
    point_cloud = processor.sample_points(
        processor.load_mesh(mesh_path), n_uniform=int(config.n_uniform), n_salient=int(config.n_salient)
    )
    with torch.no_grad():
        decoded = model.decode(model.encode(point_cloud, num_tokens=num_tokens))  # callable (M, 3) -> (1, M)
    return decoded, {"vae": vae_dir, "mesh": str(mesh_path), "num_tokens": num_tokens}


def run_method(field, method: str, args: argparse.Namespace):
    start = time.perf_counter()
    grid = evaluate_grid(
        field, args.resolution, 0.5, method, args.bounds, args.coarse_resolution, args.chunk_size, args.device
    )
    mesh = mesh_from_grid(grid, 0.5)  # evaluate_grid + mesh_from_grid is exactly extract_mesh
    seconds = time.perf_counter() - start
    row = {
        "method": method,
        "queries": grid.num_queries,
        "queries_per_level": grid.queries_per_level,
        "field_seconds": grid.seconds,
        "total_seconds": seconds,
        "faces": len(mesh.faces),
        "watertight": bool(mesh.is_watertight),
    }
    return grid, mesh, row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vae", default=None, help="DoraVAE save_pretrained folder (default: stand-in field)"
    )
    parser.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    parser.add_argument("--num-tokens", type=int, default=2048)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--coarse-resolution", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=262144)
    parser.add_argument("--bounds", type=float, default=1.05)
    parser.add_argument("--fit-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.mesh.exists():
        print(f"mesh not found: {args.mesh} (pass --mesh)", file=sys.stderr)
        return 2

    if args.vae:
        field, field_info = vae_field(args.vae, args.mesh, args.num_tokens, args.seed)
    else:
        field, field_info = fit_stand_in(args.mesh, args.fit_steps, args.seed)

    hierarchical_grid, hierarchical, row_h = run_method(field, "hierarchical", args)
    dense_grid, dense, row_d = run_method(field, "dense", args)
    mesh_iou = mesh_volume_iou(hierarchical, dense, num_points=200_000, seed=args.seed, bounds=args.bounds)
    grid_iou = volume_iou(hierarchical_grid.values > 0.5, dense_grid.values > 0.5)
    pred_points, _ = sample_surface(hierarchical, 100_000, args.seed)
    gt_points, _ = sample_surface(dense, 100_000, args.seed)
    chamfer = chamfer_distance(pred_points, gt_points) if len(pred_points) and len(gt_points) else {}

    result = {
        "resolution": args.resolution,
        "coarse_resolution": args.coarse_resolution,
        "field": field_info,
        "threads": args.threads,
        "microseconds_per_query_dense": 1e6 * row_d["field_seconds"] / row_d["queries"],
        "hierarchical": row_h,
        "dense": row_d,
        "query_ratio": row_d["queries"] / row_h["queries"],
        "speedup": row_d["total_seconds"] / row_h["total_seconds"],
        "field_speedup": row_d["field_seconds"] / row_h["field_seconds"],
        "mesh_volume_iou": mesh_iou,
        "grid_sign_iou": grid_iou,
        "chamfer_l1": chamfer.get("chamfer_l1", float("nan")),
        "chamfer_l2": chamfer.get("chamfer_l2", float("nan")),
    }
    result["targets_met"] = {
        "query_ratio>=10": result["query_ratio"] >= 10,
        "speedup>=5": result["speedup"] >= 5,
        "volume_iou>=0.99": mesh_iou >= 0.99,
    }

    print(
        f"\nmesh extraction at {args.resolution}^3 ({'VAE ' + args.vae if args.vae else 'stand-in MLP field'})"
    )
    print(f"{'method':<13}{'queries':>12}{'field s':>10}{'total s':>10}{'faces':>10}{'watertight':>12}")
    for row in (row_h, row_d):
        print(
            f"{row['method']:<13}{row['queries']:>12,}{row['field_seconds']:>10.2f}{row['total_seconds']:>10.2f}"
            f"{row['faces']:>10,}{row['watertight']!s:>12}"
        )
    print(
        f"query ratio {result['query_ratio']:.1f}x | speed-up {result['speedup']:.1f}x | mesh IoU {mesh_iou:.4f} | "
        f"grid-sign IoU {grid_iou:.5f} | Chamfer-L1 {result['chamfer_l1']:.2e}"
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

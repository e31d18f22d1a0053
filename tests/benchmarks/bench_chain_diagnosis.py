"""Where does a generated shape break? Score the same held-out shapes at every link of the chain, one extraction.

    python tests/benchmarks/bench_chain_diagnosis.py --pipeline outputs/quickstart/pipeline [--out DIR]

Rows (each held-out shape of the quickstart layout, ``PIPE/../prepared`` and ``PIPE/../latents``):

1. ground truth: the watertight remesh at the VAE's epsilon, extracted from its signed distance on the same grid;
2. decode(mean): the cached posterior mean of the shape, decoded;
3. decode(mean + s * std * noise) for each ``--scales`` s, std = the cache's per-channel spread (what the DiT is
   trained to produce in units of 1): how much error the decoder tolerates;
4. DiT samples: the pipeline prompted with each held-out shape's own caption (``--samples`` seeds each).

Columns: components, one-piece rate, floater share (of the raw extraction: no floater removal), volume IoU of the
field against the shape's supervision (rows 2-3), surface roughness (``vae/bench/surface.py``) and its ratio to the
ground truth's, inside/outside crossings per grid line along x / y / z for the ground truth and the clean code
(dense grid; 2 for a convex solid; more = the field rings), and the latent distance in std units: for perturbed codes to their clean code, for the DiT samples and the
clean held-out codes to the nearest *training* code (token-set Chamfer, per channel RMS, so a perturbation of s
reads ~s). The DiT's distance set against the perturbation curve says whether the DiT's error or the decoder's
tolerance is the weaker link. Extra rows at ``--fine-resolution`` tell extraction terracing (roughness that falls
with a finer grid) from a rough field (roughness that stays).
"""

from __future__ import annotations

import os

from dora_shapegen.runtime import omp_wait_policy_environment  # light: no torch

os.environ.update(omp_wait_policy_environment())

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_category_accuracy import set_chamfer  # noqa: E402

from dora_shapegen.data.latent_shards import LatentStats, load_manifest  # noqa: E402
from dora_shapegen.data.marching import evaluate_grid, mesh_from_grid  # noqa: E402
from dora_shapegen.data.prepare import load_prepared  # noqa: E402
from dora_shapegen.data.processor import MeshProcessor  # noqa: E402
from dora_shapegen.diffusion.train_utils import load_latent_table  # noqa: E402
from dora_shapegen.pipelines.bench.metrics import mesh_structure  # noqa: E402
from dora_shapegen.pipelines.bench.run import _sample_seed, load_pipeline  # noqa: E402
from dora_shapegen.seeding import split_indices  # noqa: E402
from dora_shapegen.vae.bench.surface import (  # noqa: E402
    default_roughness_radius,
    grid_line_crossings,
    ground_truth_surface,
    surface_roughness,
)
from dora_shapegen.vae.modeling_dora_vae import DoraVAE  # noqa: E402


def latent_distance(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(Q,) distance in std units from each normalised token set (Q, N, C) to the nearest of (R, M, C)."""
    channels = queries.shape[-1]
    return (set_chamfer(queries, references).min(1).values / (2 * channels)).sqrt()


def field_grid(vae: Any, latents: torch.Tensor, resolution: int, method: str):
    """Grid values of one VAE-space code (1, N, C) over [-1.05, 1.05]^3."""
    decoded = vae.decode(latents)
    return evaluate_grid(lambda points: decoded(points)[0].float(), resolution, 0.5, method, 1.05, 32, 262144)


def score_mesh(mesh: Any, radius: float) -> dict[str, Any]:
    structure = mesh_structure(mesh)
    structure["roughness_deg"] = surface_roughness(mesh, radius) if not structure["empty"] else float("nan")
    return structure


def summarize(rows: list[dict[str, Any]], gt_roughness: float) -> dict[str, Any]:
    def mean(key: str) -> float:
        values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
        return float(np.mean(values)) if values else float("nan")

    made = [r for r in rows if not r["empty"]]
    summary = {
        "n": len(rows),
        "empty": len(rows) - len(made),
        "components": float(np.mean([r["components"] for r in made])) if made else float("nan"),
        "one_piece": float(np.mean([r["single_component"] for r in rows])),
        "floater_share": mean("floater_share"),
        "iou": mean("iou"),
        "roughness_deg": mean("roughness_deg"),
        "latent_distance": mean("latent_distance"),
    }
    summary["roughness_ratio"] = summary["roughness_deg"] / gt_roughness if gt_roughness > 0 else float("nan")
    for axis in "xyz":
        summary[f"crossings_{axis}"] = mean(f"crossings_{axis}")
    return summary


def markdown(table: dict[str, dict[str, Any]], header: str) -> str:
    def fmt(value: Any, digits: int = 2, pct: bool = False) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "–"
        return f"{100 * value:.0f}%" if pct else f"{value:.{digits}f}"

    lines = [
        header,
        "",
        "| link | n | empty | components | one piece | floater share | IoU (field) | roughness deg (× gt) "
        "| crossings x / y / z | latent distance (std) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in table.items():
        crossings = " / ".join(fmt(s.get(f"crossings_{a}")) for a in "xyz")
        lines.append(
            f"| {name} | {s['n']} | {s['empty']} | {fmt(s['components'], 1)} | {fmt(s['one_piece'], pct=True)} "
            f"| {fmt(s['floater_share'], pct=True)} | {fmt(s['iou'])} | {fmt(s['roughness_deg'], 1)} "
            f"({fmt(s['roughness_ratio'])}) | {crossings} | {fmt(s['latent_distance'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=None, help="a saved pipeline (quickstart layout)")
    parser.add_argument(
        "--vae", type=Path, default=None, help="without a pipeline: the VAE folder (no DiT rows)"
    )
    parser.add_argument("--prepared", type=Path, default=None, help="default: PIPE/../prepared")
    parser.add_argument("--shards", type=Path, default=None, help="default: PIPE/../latents")
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--max-shapes", type=int, default=0, help="0 = every held-out shape")
    parser.add_argument("--tokens", type=int, default=None, help="default: the pipeline's default")
    parser.add_argument("--resolution", type=int, default=64, help="one dense grid for every row")
    parser.add_argument("--fine-resolution", type=int, default=128, help="0 = no terracing rows")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--samples", type=int, default=2, help="DiT samples per held-out caption")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json / .md / sheet.png")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    if args.pipeline is None and (args.vae is None or args.shards is None or args.prepared is None):
        parser.error("give --pipeline, or --vae, --shards and --prepared (then no DiT rows)")
    root = args.pipeline.parent if args.pipeline else None
    prepared = args.prepared or root / "prepared"
    shards = args.shards or root / "latents"
    if args.pipeline is not None:
        pipe = load_pipeline(args.pipeline, "cpu")
        vae = pipe.vae.eval()
        default_tokens = pipe.default_num_tokens
    else:
        pipe, args.samples, default_tokens = None, 0, 256
        vae = DoraVAE.from_pretrained(args.vae).eval()
    num_tokens = int(args.tokens or default_tokens)
    stats = LatentStats.from_manifest(load_manifest(shards))
    table = load_latent_table(shards, num_tokens, stats)
    train_ids, held_ids = split_indices(table.shape_ids, args.held_out_fraction)
    if args.max_shapes:
        held_ids = held_ids[: args.max_shapes]
    train_latents = table.latents[train_ids, 0].float()  # (S, N, C) normalised
    held_latents = table.latents[held_ids, 0].float()  # (H, N, C) normalised
    processor = MeshProcessor(epsilon=float(vae.config.epsilon))
    radius = default_roughness_radius(args.resolution)
    fine_radius = default_roughness_radius(args.fine_resolution) if args.fine_resolution else 0.0
    rows: dict[str, list[dict[str, Any]]] = {}
    sheet: dict[str, list[Any]] = {}
    generator = torch.Generator().manual_seed(args.seed)
    clean_distance = latent_distance(held_latents, train_latents)  # (H,)
    spread = torch.from_numpy(stats.std).float()  # (C,) the DiT's unit, in VAE space
    warnings.filterwarnings("ignore", message="extract_mesh: no surface")

    def add(name: str, row: dict[str, Any], mesh: Any) -> None:
        rows.setdefault(name, []).append(row)
        sheet.setdefault(name, []).append(mesh)

    for position, index in enumerate(tqdm(held_ids, desc="held-out shapes")):
        shape_id = table.shape_ids[index]
        sample = load_prepared(prepared / "samples" / f"{shape_id}.npz")
        source = sample["meta"].get("source")
        gt_mesh = processor.make_watertight(processor.load_mesh(source))
        volume = sample["sup_group"] == 0
        volume_points = torch.from_numpy(sample["sup_points"][volume])  # (M, 3)
        volume_occupancy = sample["sup_occupancy"][volume] > 0.5  # (M,)
        gt_surface, gt_values = ground_truth_surface(gt_mesh, args.resolution, method="dense")
        row = score_mesh(gt_surface, radius) | {
            f"crossings_{a}": v for a, v in grid_line_crossings(gt_values).items()
        }
        add("ground truth", row, gt_surface)
        if args.fine_resolution:
            fine_gt, _ = ground_truth_surface(gt_mesh, args.fine_resolution)
            add(f"ground truth @{args.fine_resolution}", score_mesh(fine_gt, fine_radius), fine_gt)
        clean = stats.denormalize(held_latents[position : position + 1])  # (1, N, C) VAE space
        codes = [("decode(mean)", clean, float(clean_distance[position]))]
        for scale in args.scales:
            noise = torch.randn(clean.shape, generator=generator)  # (1, N, C)
            codes.append((f"decode(mean + {scale:g}·std·noise)", clean + scale * spread * noise, None))
        for name, code, distance in codes:
            # Dense only where the crossings are read (the clean code); the same grid values either way near the
            # surface, so the meshes of every row match.
            method = "dense" if name == "decode(mean)" else "hierarchical"
            with torch.no_grad():
                grid = field_grid(vae, code, args.resolution, method)
                occupancy = vae.decode(code)(volume_points)[0].float().numpy() > 0.5  # (M,)
            mesh = mesh_from_grid(grid, 0.5)
            if distance is None:  # perturbed: how far from its own clean code, in the same units
                distance = float(
                    latent_distance(stats.normalize(code).float(), held_latents[position : position + 1])[0]
                )
            union = np.logical_or(occupancy, volume_occupancy).sum()
            row = score_mesh(mesh, radius) | {
                "iou": float(np.logical_and(occupancy, volume_occupancy).sum() / max(union, 1)),
                "latent_distance": distance,
            }
            if method == "dense":
                row |= {f"crossings_{a}": v for a, v in grid_line_crossings(grid.values).items()}
            add(name, row, mesh)
            if name == "decode(mean)" and args.fine_resolution:
                with torch.no_grad():
                    fine = mesh_from_grid(field_grid(vae, code, args.fine_resolution, "hierarchical"), 0.5)
                add(f"decode(mean) @{args.fine_resolution}", score_mesh(fine, fine_radius), fine)
        caption = table.captions[index][0]
        for sample_index in range(args.samples):
            seed = _sample_seed(args.seed, caption, sample_index)
            latents = pipe(
                caption,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                num_tokens=num_tokens,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            ).latents  # (1, N, C) VAE space
            with torch.no_grad():
                grid = field_grid(vae, latents.float(), args.resolution, "hierarchical")
            mesh = mesh_from_grid(grid, 0.5)
            row = score_mesh(mesh, radius) | {
                "latent_distance": float(latent_distance(stats.normalize(latents).float(), train_latents)[0]),
                "prompt": caption,
            }
            add("DiT samples", row, mesh)

    gt_roughness = summarize(rows["ground truth"], 0.0)["roughness_deg"]
    fine_gt_roughness = (
        summarize(rows[f"ground truth @{args.fine_resolution}"], 0.0)["roughness_deg"]
        if args.fine_resolution
        else 0.0
    )
    summary = {
        name: summarize(group, fine_gt_roughness if f"@{args.fine_resolution}" in name else gt_roughness)
        for name, group in rows.items()
    }
    header = (
        f"Chain diagnosis of `{args.pipeline or args.vae}`: {len(held_ids)} held-out shapes, {num_tokens} tokens, dense "
        f"{args.resolution}^3 at iso 0.5 (rows marked @{args.fine_resolution}: hierarchical {args.fine_resolution}^3), "
        f"raw extraction; DiT: {args.samples} samples per held-out caption, {args.steps} steps, guidance "
        f"{args.guidance:g}; roughness radius 2 cells. {time.monotonic() - started:.0f} s."
    )
    text = markdown(summary, header)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows},
                indent=1,
            )
        )
        from dora_shapegen.data.render import render_grid_png

        names = [n for n in sheet if "@" not in n]
        shown = min(4, len(held_ids))
        meshes, titles = [], []
        for shape in range(shown):
            for name in names:
                per_shape = len(sheet[name]) // len(held_ids)
                meshes.append(sheet[name][shape * per_shape])
                titles.append(f"{table.shape_ids[held_ids[shape]]}: {name}")
        render_grid_png(meshes, args.out / "sheet.png", titles=titles, columns=len(names), size=192)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: category accuracy of a trained text-conditioned ShapeDiT on the built-in procedural categories.

For every category of the training cache, a few plain prompts ("a chair", "a chair with armrests", ...; from
``data.procedural.captions_for_category``, not the training captions) are sampled with fixed seeds at several
guidance scales. A generated shape is counted right when its **nearest training shape** belongs to the prompted
category. Target (issue 6): >= 80% at guidance 4 with >= 12 categories (chance = 1 / #categories), and guidance
must matter (1.0 vs 4.0).

    python tests/benchmarks/bench_category_accuracy.py --dit runs/dit_small/final --vae runs/vae_small/final \
        --shards runs/latents_builtin [--prepared runs/prepared_builtin] [--json runs/dit_small/category.json]

Distance. Primary: a **Chamfer distance between latent token sets**, in the normalised latent space the DiT is
trained in (per-channel mean/std of the cache manifest). Why latents: (1) the VAE encodes a shape as a set of
tokens, each summarising the geometry around one FPS point, so shapes with close token sets decode to close
surfaces; (2) the set is unordered -- the DiT is permutation-equivariant and has no positional embedding, so its
i-th token need not correspond to the cache's i-th -- which rules out a per-token L2 and calls for a
permutation-invariant set distance: Chamfer = mean_i min_j |g_i - t_j|^2 + mean_j min_i |g_i - t_j|^2; (3) it needs
no decoding or meshing, so every sample of every guidance scale is scored. The script checks that the metric itself
separates the categories: its leave-one-out nearest-neighbour accuracy on the training latents is printed (a
metric that cannot classify real shapes could not judge generated ones). Training latents are the first
``num_tokens`` cached tokens (the FPS prefix the DiT trained on at that length).

Cross-check (with ``--vae`` and ``--prepared``): for ``--mesh-per-category`` samples per category, decode ->
marching cubes -> surface points, and the Chamfer-L2 distance to the surface points of every prepared training shape
(``uniform_points`` of PREPARED/samples/<shape_id>.npz); nearest shape's category again.

Prints a table and a JSON object (``--json PATH`` also writes it).
"""

from __future__ import annotations

import os

from dora_shapegen.runtime import omp_wait_policy_environment  # light: no torch

os.environ.update(omp_wait_policy_environment())

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from dora_shapegen.data.latent_shards import LatentStats, load_manifest  # noqa: E402
from dora_shapegen.data.procedural import CATEGORIES, captions_for_category  # noqa: E402
from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT  # noqa: E402
from dora_shapegen.diffusion.sampling import sample_latents  # noqa: E402
from dora_shapegen.diffusion.text_encoder import TextEncoder  # noqa: E402
from dora_shapegen.diffusion.train_utils import load_latent_table  # noqa: E402
from dora_shapegen.seeding import derive_seed  # noqa: E402


def set_chamfer(queries: torch.Tensor, references: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Symmetric squared-L2 Chamfer between token sets: queries (Q, N, C) x references (R, M, C) -> (Q, R)."""
    out = torch.empty(len(queries), len(references))
    for start in range(0, len(references), chunk):
        refs = references[start : start + chunk]  # (r,M,C)
        for index, query in enumerate(queries):
            squared = torch.cdist(query[None].expand(len(refs), -1, -1), refs).square()  # (r,N,M)
            out[index, start : start + len(refs)] = squared.min(2).values.mean(1) + squared.min(
                1
            ).values.mean(1)
    return out


def leave_one_out_accuracy(latents: torch.Tensor, categories: list[str], max_shapes: int = 200) -> float:
    """Nearest-neighbour category accuracy of the training latents among themselves (the metric's own ceiling)."""
    count = min(len(latents), max_shapes)
    picks = torch.linspace(0, len(latents) - 1, count).long().tolist()
    distances = set_chamfer(latents[picks], latents)  # (count,S)
    distances[torch.arange(count), torch.tensor(picks)] = float("inf")  # not itself
    nearest = distances.argmin(1).tolist()
    return float(np.mean([categories[n] == categories[p] for p, n in zip(picks, nearest)]))


def load_dit(dit_dir: Path) -> tuple[ShapeDiT, TextEncoder, object, dict]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = ShapeDiT.from_pretrained(dit_dir).eval()
    run_config = (
        yaml.safe_load((dit_dir / "run_config.yaml").read_text())
        if (dit_dir / "run_config.yaml").is_file()
        else {}
    )
    encoder = TextEncoder.from_name(
        run_config.get("text_encoder", "builtin:all-MiniLM-L6-v2"),
        max_length=run_config.get("training", {}).get("text_max_length", 77),
    )
    scheduler_dir = dit_dir / "scheduler"
    scheduler = (
        FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir)
        if scheduler_dir.is_dir()
        else FlowMatchEulerDiscreteScheduler()
    )
    return model, encoder, scheduler, run_config


def mesh_points(vae, latents: torch.Tensor, resolution: int, num_points: int) -> list[np.ndarray | None]:
    from dora_shapegen.data.marching import extract_mesh
    from dora_shapegen.vae.bench.metrics import sample_surface

    clouds = []
    for index in range(len(latents)):
        try:
            # one shape per decode: a DecodedLatents field queries every shape of its batch at each call
            decoded = vae.decode(latents[index : index + 1].to(vae.device, vae.dtype))
            mesh = extract_mesh(decoded.field(0), resolution=resolution)
            points, _ = sample_surface(mesh, num_points, seed=index)
            clouds.append(points if len(points) else None)
        except Exception as error:  # an empty / degenerate field counts as a miss, not a crash
            print(f"mesh extraction failed for sample {index}: {error}", file=sys.stderr)
            clouds.append(None)
    return clouds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dit", required=True, type=Path, help="train-dit export folder (OUT/final)")
    parser.add_argument("--vae", type=Path, default=None, help="DoraVAE folder (mesh cross-check)")
    parser.add_argument("--shards", required=True, type=Path, help="the latent cache the DiT was trained on")
    parser.add_argument("--prepared", type=Path, default=None, help="prepared data folder (mesh cross-check)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0, 7.0])
    parser.add_argument("--prompts-per-category", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2, help="samples per prompt (seeds 0..S-1)")
    parser.add_argument("--num-tokens", type=int, default=None, help="default: the run's sampling.num_tokens")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--mesh-per-category", type=int, default=1, help="0 disables the mesh cross-check")
    parser.add_argument("--mesh-resolution", type=int, default=64)
    parser.add_argument("--mesh-points", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()

    model, encoder, scheduler, run_config = load_dit(args.dit)
    manifest = load_manifest(args.shards)
    stats = LatentStats.from_manifest(manifest)
    num_tokens = (
        args.num_tokens
        or run_config.get("sampling", {}).get("num_tokens")
        or min(int(manifest.get("num_tokens") or 256), 256)
    )
    table = load_latent_table(args.shards, num_tokens, stats)
    train_latents = table.latents[:, 0].float()  # (S,N,C) normalised, first view
    train_categories = [str(category) for category in table.categories]
    categories = [c for c in CATEGORIES if c in set(train_categories)]
    if len(categories) < 2:
        raise SystemExit(f"{args.shards}: needs shapes of >= 2 procedural categories, found {categories}")
    ceiling = leave_one_out_accuracy(train_latents, train_categories)

    items = [
        (category, prompt, seed)
        for category in categories
        for prompt in captions_for_category(category)[: args.prompts_per_category]
        for seed in range(args.seeds)
    ]
    uncond = encoder.encode([""])
    results: dict[str, dict] = {}
    generated: dict[float, torch.Tensor] = {}
    for guidance in args.guidance:
        batches = []
        for start in tqdm(range(0, len(items), args.batch_size), desc=f"guidance {guidance:g}"):
            chunk = items[start : start + args.batch_size]
            text = encoder.encode([prompt for _, prompt, _ in chunk])
            # One generator per batch, seeded by the batch's first item: identical noise at every guidance scale.
            generator = torch.Generator().manual_seed(
                derive_seed(0, "category-accuracy-noise", start, chunk[0][2])
            )
            batches.append(
                sample_latents(
                    model, scheduler, text, uncond, num_tokens, args.steps, guidance, generator=generator
                ).float()
            )  # (b,N,C)
        latents = torch.cat(batches)  # (G,N,C) normalised
        generated[guidance] = latents
        distances = set_chamfer(latents, train_latents)  # (G,S)
        nearest = [train_categories[i] for i in distances.argmin(1).tolist()]
        correct = [category == found for (category, _, _), found in zip(items, nearest)]
        per_category = {
            c: float(np.mean([ok for (cat, _, _), ok in zip(items, correct) if cat == c])) for c in categories
        }
        results[f"{guidance:g}"] = {
            "latent_accuracy": float(np.mean(correct)),
            "per_category": per_category,
            "mean_nearest_distance": float(distances.min(1).values.mean()),
            "latent_std": float(latents.std()),
        }

    if args.vae is not None and args.prepared is not None and args.mesh_per_category > 0:
        from dora_shapegen.data.prepare import load_prepared
        from dora_shapegen.vae.modeling_dora_vae import DoraVAE

        vae = DoraVAE.from_pretrained(args.vae).eval()
        rng = np.random.default_rng(0)
        references, reference_categories = [], []
        for shape_id, category in zip(table.shape_ids, train_categories):
            path = args.prepared / "samples" / f"{shape_id}.npz"
            if path.is_file():
                points = load_prepared(path)["uniform_points"]
                references.append(torch.from_numpy(points[rng.choice(len(points), args.mesh_points)]).float())
                reference_categories.append(category)
        if not references:
            print(
                f"no prepared samples of the cached shapes under {args.prepared}/samples; mesh check skipped"
            )
        else:
            reference_sets = torch.stack(references)  # (S',P,3)
            # seed-0 samples of the first prompts of each category
            chosen = [
                i
                for c in categories
                for i in [j for j, (cat, _, seed) in enumerate(items) if cat == c and seed == 0][
                    : args.mesh_per_category
                ]
            ]
            for guidance in args.guidance:
                latents = stats.denormalize(generated[guidance][chosen])  # (m,N,C) VAE space
                clouds = mesh_points(vae, latents, args.mesh_resolution, args.mesh_points)
                hits, found = [], []
                for index, cloud in zip(chosen, clouds):
                    if cloud is None:  # empty mesh: a miss
                        hits.append(False)
                        continue
                    distance = set_chamfer(torch.from_numpy(cloud).float()[None], reference_sets)[0]  # (S',)
                    found.append(reference_categories[int(distance.argmin())])
                    hits.append(found[-1] == items[index][0])
                results[f"{guidance:g}"] |= {
                    "mesh_accuracy": float(np.mean(hits)),
                    "mesh_samples": len(hits),
                    "mesh_empty": sum(cloud is None for cloud in clouds),
                    # a weak VAE decodes everything to similar blobs: then one category absorbs all samples
                    "mesh_nearest_categories": {c: found.count(c) for c in sorted(set(found))},
                }

    report = {
        "num_categories": len(categories),
        "chance": 1.0 / len(categories),
        "samples_per_guidance": len(items),
        "prompts_per_category": args.prompts_per_category,
        "seeds": args.seeds,
        "num_tokens": num_tokens,
        "steps": args.steps,
        "train_shapes": len(table),
        "metric_ceiling_leave_one_out": ceiling,
        "guidance": results,
        "seconds": time.monotonic() - started,
    }
    scales = list(results)
    if "1" in results and "4" in results:
        report["guidance_gain_4_vs_1"] = results["4"]["latent_accuracy"] - results["1"]["latent_accuracy"]
    print(
        f"\ncategory accuracy (nearest training shape by latent-set Chamfer); {len(categories)} categories, "
        f"chance {1 / len(categories):.1%}, metric ceiling (leave-one-out on training latents) {ceiling:.1%}"
    )
    print(f"{'category':<10}" + "".join(f"{'g=' + s:>9}" for s in scales))
    for category in categories:
        print(f"{category:<10}" + "".join(f"{results[s]['per_category'][category]:>9.0%}" for s in scales))
    print(f"{'overall':<10}" + "".join(f"{results[s]['latent_accuracy']:>9.1%}" for s in scales))
    if all("mesh_accuracy" in results[s] for s in scales):
        print(
            f"{'mesh CD':<10}"
            + "".join(f"{results[s]['mesh_accuracy']:>9.1%}" for s in scales)
            + f"   ({results[scales[0]]['mesh_samples']} decoded samples per scale)"
        )
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`dora bench`: Dora-bench. Reconstruction quality by shape complexity, latent-space quality, token scaling.

    dora bench --vae runs/vae_small/final --meshes ../shared/meshes --out runs/bench_small

For every shape and model: normalise into [-1, 1]^3, remesh watertight at the model's epsilon (the ground truth,
computed once per distinct epsilon), sample the point cloud the model expects (its n_uniform / n_salient, sharp
edges found on the clean input), encode at each token count, extract a mesh (hierarchical marching cubes), and
compare it with the ground truth (``vae/bench/metrics.py``). Shapes are graded L1-L4 by the sharp edges of the input
(thresholds in ``configs/bench/default.yaml``). Latent quality is in ``vae/bench/latent.py``, the tables, plots and
contact sheet in ``vae/bench/report.py``, the ground truth in ``vae/bench/data.py`` (torch-free, so
``--num-workers`` processes start fast). Model inference stays in this process, on ``--device``.
"""

from __future__ import annotations

import argparse
import collections
import math
import multiprocessing
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import trimesh
from tqdm import tqdm

from dora_shapegen import cli_types
from dora_shapegen.config import load_config
from dora_shapegen.metrics import volume_iou
from dora_shapegen.vae.bench.data import (
    BenchConfig,
    cloud_key,
    collect_shapes,
    epsilon_key,
    prepare_ground_truth,
)
from dora_shapegen.vae.bench.latent import interpolation, smoothness
from dora_shapegen.vae.bench.metrics import mesh_metrics
from dora_shapegen.vae.bench.rendered import (
    SharpEdgeViews,
    render_sharp_edge_views,
    rendered_sharp_normal_error,
)
from dora_shapegen.vae.bench.surface import (
    default_roughness_radius,
    ground_truth_surface,
    surface_roughness,
)

DEFAULT_CONFIG = "bench/default.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--vae", nargs="+", required=True, metavar="DIR", help="save_pretrained VAE folder(s)"
    )
    parser.add_argument("--names", nargs="+", help="display names of the models (default: folder names)")
    parser.add_argument(
        "--meshes",
        required=True,
        help="folder of meshes, index .jsonl/.csv, prepared folder (samples/*.npz), or builtin[:N]",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument(
        "--tokens", nargs="+", type=cli_types.positive_int, help="token counts (default: from the config)"
    )
    parser.add_argument(
        "--resolution", type=cli_types.resolution, help="marching-cubes resolution (default: from the config)"
    )
    parser.add_argument("--limit", type=cli_types.positive_int, help="only the first N shapes")
    parser.add_argument(
        "--seed", type=cli_types.seed, help="sampling / noise seed (default: from the config)"
    )
    parser.add_argument(
        "--num-workers", type=cli_types.positive_int, default=1, help="processes preparing the ground truth"
    )
    parser.add_argument(
        "--device", default="auto", help="torch device for the models (auto: cuda if available)"
    )
    parser.add_argument(
        "--latent-quality",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure latent smoothness and interpolation (default: from the config)",
    )
    return parser


def load_models(dirs: list[str], names: list[str] | None, device: torch.device) -> list[dict[str, Any]]:
    """Each VAE folder as {name, path, model, epsilon, n_uniform, n_salient, ...}; names made unique."""
    from dora_shapegen.vae import DoraVAE

    if names is not None and len(names) != len(dirs):
        raise ValueError(f"--names gives {len(names)} names for {len(dirs)} --vae folders")
    models, seen = [], collections.Counter()
    for index, folder in enumerate(dirs):
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise ValueError(f"--vae {folder}: not a save_pretrained folder (no config.json)")
        model = DoraVAE.from_pretrained(str(path)).to(device).eval()
        name = (
            names[index]
            if names
            else (path.name if path.name not in ("final", "best") else f"{path.parent.name}/{path.name}")
        )
        seen[name] += 1
        name = name if seen[name] == 1 else f"{name}#{seen[name]}"
        config = model.config
        models.append(
            {
                "name": name,
                "path": str(path),
                "model": model,
                "epsilon": float(config.epsilon),
                "n_uniform": int(config.n_uniform),
                "n_salient": int(config.n_salient),
                "use_salient": bool(config.use_salient),
                "output_type": config.output_type,
                "sample_posterior": bool(config.get("sample_posterior", False)),
                "num_parameters": int(sum(p.numel() for p in model.parameters())),
            }
        )
    return models


def choose_point_counts(spec: dict[str, Any], config: BenchConfig) -> tuple[int, int]:
    """Points sampled for a model: its training counts (or the config's), grown when the largest token count
    needs more FPS queries per stream than that (e.g. 4096 tokens from a model trained with 2048 points)."""
    n_uniform = int(config.n_uniform or spec["n_uniform"])
    n_salient = int(config.n_salient or spec["n_salient"])
    if config.grow_points_for_tokens:
        need_uniform, need_salient = spec["model"].token_split(max(config.tokens))
        n_uniform, n_salient = max(n_uniform, need_uniform), max(n_salient, need_salient)
    return n_uniform, n_salient


def iterate_ground_truth(jobs: list[tuple[dict[str, Any], dict[str, Any]]], workers: int):
    """Yield ``prepare_ground_truth`` results in input order; with workers, a bounded window runs ahead in a
    process pool (so ground truth never piles up in memory while the models are busy)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield prepare_ground_truth(job)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        remaining = iter(jobs)
        for job in remaining:
            pending.append(pool.apply_async(prepare_ground_truth, (job,)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().get()
            next_job = next(remaining, None)
            if next_job is not None:
                pending.append(pool.apply_async(prepare_ground_truth, (next_job,)))
            yield result


def make_extractor(config: BenchConfig, resolution: int):
    """DecodedLatents of one shape -> mesh (hierarchical marching cubes); an empty result is data, not a warning."""
    from dora_shapegen.data.marching import extract_mesh

    def extract(decoded: Any) -> trimesh.Trimesh:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="extract_mesh: no surface")
            return extract_mesh(
                decoded.field(0),
                resolution=resolution,
                threshold=config.threshold,
                method="hierarchical",
                bounds=config.bounds,
                coarse_resolution=min(config.coarse_resolution, resolution),
            )

    return extract


@torch.no_grad()
def reconstruct(
    spec: dict[str, Any],
    cloud: Any,
    num_tokens: int,
    gt_mesh: trimesh.Trimesh,
    gt: dict[str, Any],
    config: BenchConfig,
    extract: Any,
    seed: int,
    gt_views: SharpEdgeViews | None = None,
) -> tuple[dict[str, Any], torch.Tensor, trimesh.Trimesh]:
    """Encode at ``num_tokens``, extract, and score against the ground truth; returns (metrics, latents, mesh).
    ``gt_views``: the ground truth's rendered sharp-edge views (None: no rendered Sharp Normal Error)."""
    model = spec["model"]
    start = time.perf_counter()
    # The model's own posterior setting (mean for ours, a sample for converted Dora weights, as the official
    # test config); a seeded generator keeps a sampled run reproducible.
    latents = model.encode(
        cloud, num_tokens=num_tokens, generator=torch.Generator().manual_seed(seed)
    )  # (1, K, C)
    decoded = model.decode(latents)
    occupancy = decoded(gt["volume_points"])[0].float().cpu().numpy() > config.threshold  # (M,)
    seconds_encode = time.perf_counter() - start
    mesh = extract(decoded)
    seconds_extract = time.perf_counter() - start - seconds_encode
    metrics = mesh_metrics(
        mesh,
        gt_mesh,
        num_points=config.metrics.surface_points,
        seed=seed,
        fscore_thresholds=config.metrics.fscore_thresholds,
        num_volume_points=config.metrics.volume_points,
        bounds=config.bounds,
        sharp_angle_deg=config.levels.sharp_angle_deg,
        sharp_radius=config.metrics.sharp_radius,
        gt_sharp_points=gt["sharp_points"],
    )
    for key in ("num_sharp_edges", "sharp_edge_length", "complexity_level"):
        metrics.pop(key)  # graded on the clean input instead (the remesh rounds creases into many facets)
    metrics["mesh_volume_iou"] = metrics.pop("volume_iou")  # winding numbers of the extracted mesh
    metrics["volume_iou"] = volume_iou(occupancy, gt["volume_occupancy"])  # the decoded field itself
    if gt_views is not None:
        metrics |= rendered_sharp_normal_error(mesh, reference=gt_views)
    elif config.metrics.rendered_sne:  # no sharp edge to look at, as the geometric variant's NaN
        metrics |= {"rendered_sharp_normal_error_deg": math.nan, "rendered_sharp_pixels": 0}
    metrics |= {
        "num_faces": int(len(mesh.faces)),
        "num_queries": int(mesh.metadata.get("num_queries", 0)),
        "seconds_encode_decode": seconds_encode,
        "seconds_extract": seconds_extract,
        "seconds_metrics": time.perf_counter() - start - seconds_encode - seconds_extract,
    }
    return metrics, latents, mesh


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"


def rendered_reference(
    config: BenchConfig, gt_meshes: dict[str, trimesh.Trimesh], gt: dict[str, dict[str, Any]]
) -> dict[str, SharpEdgeViews]:
    """The ground truth's normal maps and edge masks per epsilon, rendered once for every model and token count;
    none when the rendered metric is off or the shape has no sharp edges (its value is then NaN, as the
    geometric sharp-edge error's)."""
    m = config.metrics
    if not m.rendered_sne:
        return {}
    return {
        key: render_sharp_edge_views(
            mesh,
            gt[key]["sharp_points"],
            views=m.render_views,
            resolution=m.render_resolution,
            sharp_radius=m.sharp_radius,
            dilation_px=m.render_dilation_px,
        )
        for key, mesh in gt_meshes.items()
        if len(gt[key]["sharp_points"])
    }


def evaluate_shape(
    result: dict[str, Any],
    models: list[dict[str, Any]],
    config: BenchConfig,
    latent_tokens: list[int],
    run_smoothness: bool,
    keep: bool,
) -> tuple[dict, dict, dict]:
    """Metrics of every (model, token count) for one prepared shape; a failing pair is recorded, not raised.

    Returns (entry for results.json, latents[(name, K)] at the latent token counts, meshes[(name, K)] when keep).
    """
    item = result["item"]
    entry = {key: item[key] for key in ("shape_id", "source", "category")}
    entry |= {
        key: result[key] for key in ("level", "num_sharp_edges", "sharp_edge_length", "num_input_faces")
    }
    entry |= {"status": "ok", "seconds_ground_truth": result["seconds"], "results": {}, "latent": {}}
    extract = make_extractor(config, config.resolution)
    latent_extract = make_extractor(config, config.latent.resolution)
    gt_meshes = {
        key: trimesh.Trimesh(g["vertices"], g["faces"], process=False) for key, g in result["gt"].items()
    }
    gt_views = rendered_reference(config, gt_meshes, result["gt"])
    radius = default_roughness_radius(config.resolution, config.bounds)
    gt_roughness = {}
    if config.metrics.roughness:  # the ground truth through the same extraction as every reconstruction
        for key, mesh in gt_meshes.items():
            surface, _ = ground_truth_surface(
                mesh, config.resolution, config.bounds, config.coarse_resolution
            )
            gt_roughness[key] = surface_roughness(surface, radius, seed=result["seed"])
    latents_kept, meshes = {}, {"gt": gt_meshes}
    for spec in models:
        key = epsilon_key(spec["epsilon"])
        gt, gt_mesh = result["gt"][key], gt_meshes[key]
        cloud = result["clouds"][
            cloud_key(spec["epsilon"], spec["sampled_n_uniform"], spec["sampled_n_salient"])
        ]
        per_tokens, per_latent = {}, {}
        for num_tokens in config.tokens:
            try:
                metrics, latents, mesh = reconstruct(
                    spec, cloud, num_tokens, gt_mesh, gt, config, extract, result["seed"], gt_views.get(key)
                )
            except Exception as error:  # e.g. more tokens than points: record and go on
                per_tokens[str(num_tokens)] = {"error": _reason(error)}
                continue
            if config.metrics.roughness:
                metrics["roughness_deg"] = surface_roughness(mesh, radius, seed=result["seed"])
                metrics["gt_roughness_deg"] = gt_roughness[key]
            per_tokens[str(num_tokens)] = metrics
            if keep:
                meshes[(spec["name"], num_tokens)] = mesh
            if num_tokens in latent_tokens:
                latents_kept[(spec["name"], num_tokens)] = latents.cpu()
                if run_smoothness:
                    lat = config.latent
                    try:
                        per_latent[str(num_tokens)] = smoothness(
                            spec["model"],
                            latents,
                            gt["volume_points"][: lat.volume_points],
                            latent_extract,
                            lat.noise_scales,
                            lat.noise_samples,
                            lat.surface_points,
                            result["seed"],
                        )
                    except Exception as error:
                        per_latent[str(num_tokens)] = {"error": _reason(error)}
        entry["results"][spec["name"]] = per_tokens
        if per_latent:
            entry["latent"][spec["name"]] = per_latent
    return entry, latents_kept, meshes


def run_interpolations(
    models: list[dict[str, Any]], kept: list[tuple[str, dict]], config: BenchConfig, latent_tokens: list[int]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Interpolate shapes (0, 1), (2, 3), ... of ``kept`` for every model and latent token count."""
    extract = make_extractor(config, config.latent.resolution)
    pairs = [(kept[i], kept[i + 1]) for i in range(0, len(kept) - 1, 2)][: config.latent.interpolation_pairs]
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    jobs = [(spec, k, a, b) for spec in models for k in latent_tokens for a, b in pairs]
    for spec, num_tokens, (id_a, lat_a), (id_b, lat_b) in tqdm(
        jobs, desc="interpolation", unit="pair", disable=not jobs
    ):
        key = (spec["name"], num_tokens)
        row: dict[str, Any] = {"shape_a": id_a, "shape_b": id_b}
        if key not in lat_a or key not in lat_b:
            continue
        try:
            device = spec["model"].device
            row |= interpolation(
                spec["model"],
                lat_a[key].to(device),
                lat_b[key].to(device),
                extract,
                config.latent.interpolation_steps,
                config.latent.surface_points,
                config.seed,
            )
        except Exception as error:
            row["error"] = _reason(error)
        out.setdefault(spec["name"], {}).setdefault(str(num_tokens), []).append(row)
    return out


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    overrides: dict[str, Any] = {}
    if args.tokens:
        overrides["tokens"] = args.tokens
    if args.resolution:
        overrides["resolution"] = args.resolution
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.latent_quality is not None:
        overrides["latent.enabled"] = args.latent_quality
    config = load_config(BenchConfig, args.config, overrides)
    if not config.tokens or any(k < 1 for k in config.tokens):
        raise ValueError(f"token counts must be positive integers, got {config.tokens}")
    config.tokens = sorted(set(int(k) for k in config.tokens))
    return config


def main(argv: list[str] | None = None) -> int:
    from dora_shapegen.vae.bench.report import write_outputs

    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        items = collect_shapes(args.meshes, config.seed)
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else ("cpu" if args.device == "auto" else args.device)
        )
        models = load_models(args.vae, args.names, device)
    except (ValueError, OSError) as error:
        print(f"dora bench: {error}", file=sys.stderr)
        return 2
    if args.limit is not None:
        items = items[: max(args.limit, 0)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in models:
        model["sampled_n_uniform"], model["sampled_n_salient"] = choose_point_counts(model, config)
    lat = config.latent
    latent_tokens = (
        [k for k in (lat.token_counts or config.tokens) if k in config.tokens] if lat.enabled else []
    )
    spec = {
        "config": asdict(config),
        "epsilons": sorted({m["epsilon"] for m in models}),
        "clouds": sorted({(m["epsilon"], m["sampled_n_uniform"], m["sampled_n_salient"]) for m in models}),
    }
    jobs = [(item, spec) for item in items]
    start = time.perf_counter()
    shapes, kept_latents, sheet = [], [], []
    num_ok = 0
    progress = tqdm(iterate_ground_truth(jobs, args.num_workers), total=len(jobs), desc="bench", unit="shape")
    for result in progress:
        item = result["item"]
        progress.set_postfix_str(item["shape_id"][:24])
        if result["status"] != "ok":
            shapes.append(
                {key: item[key] for key in ("shape_id", "source", "category")}
                | {"status": "failed", "reason": result["reason"]}
            )
            tqdm.write(f"dora bench: {item['shape_id']} failed: {result['reason']}")
            continue
        keep = len(sheet) < config.report.contact_sheet_shapes
        try:
            entry, latents, meshes = evaluate_shape(
                result,
                models,
                config,
                latent_tokens,
                run_smoothness=bool(latent_tokens) and num_ok < lat.max_shapes,
                keep=keep,
            )
        except Exception as error:  # one bad shape never stops the run
            shapes.append(
                {key: item[key] for key in ("shape_id", "source", "category")}
                | {"status": "failed", "reason": _reason(error)}
            )
            tqdm.write(f"dora bench: {item['shape_id']} failed: {_reason(error)}")
            continue
        num_ok += 1
        shapes.append(entry)
        if latent_tokens and len(kept_latents) < 2 * lat.interpolation_pairs:
            kept_latents.append((entry["shape_id"], latents))
        if keep:
            sheet.append((entry, meshes))
    interpolations = run_interpolations(models, kept_latents, config, latent_tokens) if latent_tokens else {}
    model_info = [{k: v for k, v in m.items() if k != "model"} for m in models]
    write_outputs(
        out,
        config,
        vars(args),
        model_info,
        shapes,
        interpolations,
        sheet,
        seconds=time.perf_counter() - start,
    )
    failed = sum(shape["status"] != "ok" for shape in shapes)
    print(
        f"dora bench: {len(shapes) - failed} shapes measured, {failed} failed, "
        f"{len(models)} model(s) x {len(config.tokens)} token counts; results in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

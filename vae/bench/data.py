"""Dora-bench inputs: the run config, the list of shapes, and each shape's ground truth.

Kept free of torch on purpose: ``--num-workers`` spawns processes that import only this module and the geometry
stack (as ``data/prepare_worker.py`` does), so a pool starts in well under a second.

Ground truth of a shape, for a model trained at ``epsilon``: the input is loaded and normalised into [-1, 1]^3
(``MeshProcessor.load_mesh``, margin 0.95), then remeshed watertight at that epsilon, exactly as training data was
prepared. Every model sees the surface it was trained to reproduce; ground truths are computed once per distinct
epsilon in a run. The complexity level and the sharp-edge samples come from the clean input, because the remesh
rounds the creases and its own dihedral-angle count would grade a smooth sphere by its marching-cubes facets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dora_shapegen import seeding
from dora_shapegen.config import from_dict
from dora_shapegen.data.prepare_worker import shape_seed

# ----------------------------------------------------------------------------------------------- config


@dataclass
class LevelConfig:
    by: str = "count"  # "count" of sharp edges or their total "length" (in [-1, 1] units)
    thresholds: list[float] = field(default_factory=lambda: [10.0, 200.0, 1000.0])  # L1 < t1 <= L2 < t2 ...
    sharp_angle_deg: float = 30.0  # dihedral angle above which an input edge is sharp


@dataclass
class MetricConfig:
    surface_points: int = 100_000  # area-uniform samples per surface (Chamfer, F-score, normals)
    volume_points: int = 100_000  # uniform points in [-bounds, bounds]^3 (volume IoU)
    fscore_thresholds: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02])
    sharp_points: int = 10_000  # samples along the gt sharp edges
    sharp_radius: float = 0.02  # "near a sharp edge" = within this distance of those samples
    # Rendered Sharp Normal Error (vae/bench/rendered.py has the protocol): normal maps of gt and reconstruction
    # from fixed views, compared on the gt's sharp-edge pixels dilated by render_dilation_px.
    rendered_sne: bool = True
    render_resolution: int = 512  # px per side of each view (0.0071 units per pixel at 512)
    render_views: list[list[float]] = field(
        default_factory=lambda: [
            [elev, azim] for elev in (35.26, -35.26) for azim in (45.0, 135.0, 225.0, 315.0)
        ]
    )  # (elev, azim) deg
    render_dilation_px: int | None = None  # None: ceil(sharp_radius / pixel size), the geometric band's width
    # Surface roughness (vae/bench/surface.py): stripes as a number, for the reconstruction and for the ground
    # truth extracted on the same grid (its signed distance), so a ratio near 1 means no stripes of our own.
    roughness: bool = True


@dataclass
class LatentConfig:
    enabled: bool = True
    token_counts: list[int] | None = None  # None = every bench token count
    noise_scales: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])  # x the latent std
    noise_samples: int = 2  # perturbations per scale and shape
    max_shapes: int = 8  # shapes used for smoothness (the first ones that prepared fine)
    resolution: int = 64  # marching-cubes grid of perturbed / interpolated decodes
    surface_points: int = 20_000  # samples per surface for their Chamfer distances
    volume_points: int = 20_000  # of the gt volume points, for the IoU of perturbed decodes
    interpolation_pairs: int = 4  # pairs (shape 0, 1), (2, 3), ...
    interpolation_steps: int = 7  # points on the segment, endpoints included


@dataclass
class ReportConfig:
    contact_sheet_shapes: int = 4
    contact_sheet_size: int = 192  # pixels per tile


@dataclass
class BenchConfig:
    tokens: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    resolution: int = 256  # final marching-cubes grid (cells per axis)
    coarse_resolution: int = 32  # first level of the hierarchical extraction
    threshold: float = 0.5  # occupancy iso-level
    bounds: float = 1.05
    margin: float = 0.95
    seed: int = 0
    n_uniform: int | None = None  # surface points fed to each model (None = the model's own n_uniform)
    n_salient: int | None = None  # salient points (None = the model's own n_salient)
    grow_points_for_tokens: bool = True  # sample more points when a token count needs more than that
    levels: LevelConfig = field(default_factory=LevelConfig)
    metrics: MetricConfig = field(default_factory=MetricConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


# ----------------------------------------------------------------------------------------------- shapes
def collect_shapes(spec: str, seed: int = 0) -> list[dict[str, Any]]:
    """Shape items (``shape_id``, ``source``, ``kind``, ``caption``, ``category``) from a --meshes argument.

    ``builtin`` / ``builtin:N`` (N procedural shapes, default one per category, generated from ``seed``), a
    folder of meshes, a prepared folder (``samples/*.npz``: their ``meta.source`` meshes are benchmarked), or an
    index file (.jsonl / .csv rows with ``path``).
    """
    if spec == "builtin" or spec.startswith("builtin:"):
        from dora_shapegen.data.procedural import CATEGORIES

        count = int(spec.split(":", 1)[1]) if ":" in spec else len(CATEGORIES)
        items = []
        for index in range(count):
            category = CATEGORIES[index % len(CATEGORIES)]
            items.append(
                {
                    "shape_id": f"{category}-{index:04d}",
                    "source": f"builtin:{seed}:{index}",
                    "kind": "builtin",
                    "category": category,
                    "caption": "",
                    "index": index,
                    "builtin_seed": seed,
                }
            )
        return items
    path = Path(spec)
    if path.is_dir():
        folder = path / "samples" if (path / "samples").is_dir() else path
        npz = sorted(folder.glob("*.npz"))
        if npz:
            return [_prepared_item(file) for file in npz]
        from dora_shapegen.data.prepare import scan_folder

        items = scan_folder(path)
    elif path.is_file():
        from dora_shapegen.data.prepare import read_index

        items = read_index(path)
    else:
        raise ValueError(f"--meshes {spec}: no such folder or index file (or use builtin[:N])")
    if not items:
        raise ValueError(f"--meshes {spec}: no mesh files found")
    return [
        {
            "shape_id": i["shape_id"],
            "source": i["path"],
            "kind": "file",
            "category": i.get("category", ""),
            "caption": i.get("caption", ""),
        }
        for i in items
    ]


def _prepared_item(file: Path) -> dict[str, Any]:
    """A prepared sample stands for its source mesh; an unreadable one becomes a failing item (reason kept)."""
    item = {"shape_id": file.stem, "source": "", "kind": "file", "category": "", "caption": ""}
    try:
        with np.load(file, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
        item.update(
            shape_id=str(meta.get("shape_id") or file.stem),
            source=str(meta.get("source") or ""),
            category=str(meta.get("category") or ""),
            caption=str(meta.get("caption") or ""),
        )
        if not item["source"]:
            item["error"] = f"{file}: prepared sample records no source mesh"
    except Exception as error:  # corrupt npz, missing meta ...
        item["error"] = f"{file}: unreadable prepared sample ({type(error).__name__}: {error})"
    return item


# ----------------------------------------------------------------------------------------------- ground truth
def epsilon_key(epsilon: float) -> str:
    return f"{float(epsilon):.9g}"


def cloud_key(epsilon: float, n_uniform: int, n_salient: int) -> str:
    return f"{epsilon_key(epsilon)}/{int(n_uniform)}/{int(n_salient)}"


def _load_input(item: dict[str, Any], processor: Any) -> Any:
    if item["kind"] == "builtin":
        from dora_shapegen.data.procedural import generate_shape

        return processor.load_mesh(generate_shape(item["category"], item["builtin_seed"], item["index"]).mesh)
    return processor.load_mesh(item["source"])


def shape_level(mesh: Any, levels: LevelConfig) -> tuple[int, int, float]:
    """(level 1..4, sharp-edge count, sharp-edge length) of a clean, normalised input mesh."""
    from dora_shapegen.vae.bench.metrics import complexity_level, count_sharp_edges, sharp_edge_length

    if levels.by not in ("count", "length"):
        raise ValueError(f"levels.by must be 'count' or 'length', got {levels.by!r}")
    num_sharp = count_sharp_edges(mesh, levels.sharp_angle_deg)
    length = sharp_edge_length(mesh, levels.sharp_angle_deg)
    level = complexity_level(num_sharp if levels.by == "count" else length, levels.thresholds)
    return level, int(num_sharp), float(length)


def prepare_ground_truth(job: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """One shape's ground truth for every epsilon and point-cloud spec in ``job``; never raises.

    ``job = (item, spec)`` with spec keys ``config`` (BenchConfig as a dict), ``epsilons`` and ``clouds`` (lists
    of (epsilon, n_uniform, n_salient)). Returns ``status`` "ok" with ``level``, ``num_sharp_edges``,
    ``sharp_edge_length``, ``gt[epsilon_key]`` (watertight ``vertices``/``faces``, ``sharp_points`` projected
    onto it, ``volume_points`` and their winding-number ``volume_occupancy``) and ``clouds[cloud_key]``
    (PointCloud); or ``status`` "failed" with the ``reason``.
    """
    item, spec = job
    start = time.perf_counter()
    out: dict[str, Any] = {"item": item}
    try:
        if item.get("error"):
            raise ValueError(item["error"])
        out.update(_ground_truth(item, spec))
    except Exception as error:  # one bad shape must never stop the run
        reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        return {**out, "status": "failed", "reason": reason, "seconds": time.perf_counter() - start}
    return {**out, "status": "ok", "seconds": time.perf_counter() - start}


def _ground_truth(item: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from dora_shapegen.data.processor import MeshProcessor
    from dora_shapegen.data.sampling import project_to_surface, sample_sharp_edges, sharp_edges
    from dora_shapegen.vae.bench.metrics import mesh_occupancy

    config = from_dict(BenchConfig, spec["config"])
    angle = config.levels.sharp_angle_deg
    seed = shape_seed(config.seed, item["shape_id"])
    processors = {
        epsilon_key(e): MeshProcessor(
            epsilon=e, sharp_angle_deg=angle, margin=config.margin, seed=seed, bounds=config.bounds
        )
        for e in spec["epsilons"]
    }
    mesh = _load_input(item, next(iter(processors.values())))  # normalisation does not depend on epsilon
    level, num_sharp, length = shape_level(mesh, config.levels)
    rng = seeding.rng(seed, "bench-volume-points")
    volume_points = rng.uniform(-config.bounds, config.bounds, (config.metrics.volume_points, 3)).astype(
        np.float32
    )
    edges, edge_normals = sharp_edges(mesh, angle)
    gt, watertight = {}, {}
    for key, processor in processors.items():
        wt = processor.make_watertight(mesh)
        if len(wt.faces) == 0:
            raise ValueError(f"{item['source']}: watertight remesh at epsilon {key} is empty")
        sharp_points = np.zeros((0, 3), np.float32)
        if len(edges) and config.metrics.sharp_points > 0:
            points, normals = sample_sharp_edges(
                np.asarray(mesh.vertices),
                edges,
                edge_normals,
                config.metrics.sharp_points,
                seeding.rng(seed, "bench-sharp-points"),
            )
            sharp_points, _ = project_to_surface(wt, points, normals)  # onto the eps-offset surface
        watertight[key] = wt
        gt[key] = {
            "vertices": np.asarray(wt.vertices, np.float32),
            "faces": np.asarray(wt.faces, np.int32),
            "sharp_points": sharp_points,
            "volume_points": volume_points,
            "volume_occupancy": mesh_occupancy(wt, volume_points),
        }
    clouds = {}
    for epsilon, n_uniform, n_salient in spec["clouds"]:
        key = epsilon_key(epsilon)
        # Same recipe as `dora prepare`: samples of the watertight surface, sharp edges found on the clean input.
        clouds[cloud_key(epsilon, n_uniform, n_salient)] = processors[key].sample_points(
            watertight[key], int(n_uniform), int(n_salient), seed=seed, sharp_source=mesh
        )
    return {
        "level": level,
        "num_sharp_edges": int(num_sharp),
        "sharp_edge_length": float(length),
        "num_input_faces": int(len(mesh.faces)),
        "seed": seed,
        "gt": gt,
        "clouds": clouds,
    }

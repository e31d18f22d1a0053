"""`dora render-views PREPARED`: shaded renders of every prepared shape, the training data of image conditioning.

A step beside `dora prepare` (it reads what prepare wrote, so prepared folders need no redoing): each shape's
source mesh (recorded in its sample's ``meta.source``) is drawn by the project's rasteriser (``data/render.py``,
flat Lambert shading on white) from ``num_views`` random viewpoints, seeded per shape id, and each render is
recentred with the crop convention user images get at inference (``data/condition_image.py``), so training and
inference images look alike.

Output: ``PREPARED/renders/<shape_id>.npz`` with ``images`` (V, S, S, 3) uint8, ``cameras`` (V, 2) float32
(elevation, azimuth in degrees) and ``meta`` (JSON: size, border ratio, renderer, seed), written atomically; a
rerun skips shapes already rendered. A shape that cannot be rendered (source missing or unreadable, empty mesh)
gets its reason in ``PREPARED/render_failures.jsonl`` and the run goes on. `dora cache-latents` stores the renders
beside the latents in the shards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dora_shapegen import cli_types
from dora_shapegen.config import load_config, save_yaml, to_dict
from dora_shapegen.data.prepare_worker import write_npz_atomic
from dora_shapegen.seeding import rng

RENDERS_DIR = "renders"
FAILURES_FILE = "render_failures.jsonl"
RENDERER = "data.render.render_mesh_image (orthographic, flat Lambert, white background)"
DEFAULT_CONFIG = "render/default.yaml"


class RenderError(ValueError):
    """A shape that cannot be rendered; the message names the shape and the reason."""


@dataclass
class RenderConfig:
    num_views: int = 4  # random viewpoints per shape
    size: int = 128  # stored render size in px (square); the image encoder resizes to its own input size
    supersample: int = 2  # rasterised at size * render_scale * supersample, averaged down (anti-aliasing)
    render_scale: int = (
        2  # the raw render is this much larger than the stored crop, so recentring never upsamples
    )
    border_ratio: float = 0.15  # crop convention of data/condition_image.py (Hunyuan3D-2.1's value)
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])  # degrees, uniform
    seed: int = 0
    workers: int = 1


def check_config(config: RenderConfig) -> None:
    """A ValueError naming the first bad setting."""
    for name in ("num_views", "size", "supersample", "render_scale", "workers"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.size < 32:
        raise ValueError(f"size must be at least 32 px, got {config.size}")
    low, high = config.elevation_range
    if not -90.0 <= low <= high <= 90.0:
        raise ValueError(
            f"elevation_range must be [low, high] within [-90, 90], got {config.elevation_range}"
        )
    if not 0.0 <= config.border_ratio < 1.0:
        raise ValueError(f"border_ratio must be in [0, 1), got {config.border_ratio}")


def view_cameras(config: RenderConfig, shape_id: str) -> np.ndarray:
    """(V, 2) (elevation, azimuth) in degrees: uniform azimuth, elevation uniform in ``elevation_range``; a
    function of (seed, shape id) only, so reruns and any worker count give the same views."""
    draw = rng(config.seed, "render-views", shape_id)  # the project's seed scheme (dora_shapegen.seeding)
    low, high = config.elevation_range
    elevation = draw.uniform(low, high, config.num_views)  # (V,)
    azimuth = draw.uniform(0.0, 360.0, config.num_views)  # (V,)
    return np.stack([elevation, azimuth], axis=1).astype(np.float32)  # (V, 2)


def render_views(mesh: Any, cameras: np.ndarray, config: RenderConfig, shape_id: str = "mesh") -> np.ndarray:
    """(V, S, S, 3) uint8: ``mesh`` seen from each (elevation, azimuth), recentred as inference images are."""
    from dora_shapegen.data.condition_image import foreground_mask, recenter
    from dora_shapegen.data.render import render_mesh_image

    if len(getattr(mesh, "faces", [])) == 0:
        raise RenderError(f"shape {shape_id}: the mesh has no faces to render")
    images = []
    for elevation, azimuth in cameras:
        raw = render_mesh_image(
            mesh, float(elevation), float(azimuth), config.size * config.render_scale, config.supersample
        )  # (R, R, 3)
        rgba = np.concatenate([raw, np.full(raw.shape[:2] + (1,), 255, np.uint8)], axis=-1)  # (R, R, 4)
        mask = foreground_mask(rgba, has_alpha=False)
        if mask is None:
            raise RenderError(f"shape {shape_id}: the view ({elevation:.1f}, {azimuth:.1f}) shows nothing")
        images.append(recenter(rgba, mask, config.size, config.border_ratio))
    return np.stack(images)  # (V, S, S, 3)


def render_shape(item: tuple[str, str, str, dict[str, Any]]) -> dict[str, Any]:
    """Render one prepared shape into its npz; never raises: a failure comes back with its reason."""
    shape_id, source, target, values = item
    config = RenderConfig(**values)
    start = time.perf_counter()
    try:
        import trimesh

        if not source:
            raise RenderError(f"shape {shape_id}: its prepared sample records no source mesh (meta.source)")
        if not Path(source).is_file():
            raise RenderError(f"shape {shape_id}: source mesh {source} not found")
        try:
            mesh = trimesh.load(source, force="mesh", process=False)
        except Exception as error:
            raise RenderError(
                f"shape {shape_id}: cannot read source mesh {source} ({type(error).__name__}: {error})"
            ) from error
        cameras = view_cameras(config, shape_id)
        images = render_views(mesh, cameras, config, shape_id)
        meta = {
            "shape_id": shape_id,
            "source": source,
            "size": config.size,
            "border_ratio": config.border_ratio,
            "renderer": RENDERER,
            "seed": config.seed,
            "elevation_range": list(config.elevation_range),
        }
        write_npz_atomic(
            Path(target),
            {"images": images, "cameras": cameras, "meta": np.array(json.dumps(meta))},
            "npz_compressed",  # white backgrounds compress ~10x
        )
    except Exception as error:  # one bad shape must never stop the batch
        reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        return {"status": "failed", "shape_id": shape_id, "path": source, "reason": reason}
    return {"status": "done", "shape_id": shape_id, "seconds": time.perf_counter() - start}


def load_renders(path: str | Path) -> dict[str, Any]:
    """One shape's renders: ``images`` (V, S, S, 3) uint8, ``cameras`` (V, 2), ``meta``; a RenderError naming the
    file when it is damaged."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
            cameras = archive["cameras"]
            meta = json.loads(str(archive["meta"]))
    except Exception as error:
        raise RenderError(
            f"{path}: corrupt or unreadable renders ({type(error).__name__}: {error})"
        ) from error
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(cameras) != len(images):
        raise RenderError(
            f"{path}: renders must be (V, S, S, 3) uint8 with one camera each, got {images.shape}"
        )
    return {"images": images, "cameras": cameras, "meta": meta}


def renders_folder(prepared: str | Path) -> Path:
    """``PREPARED/renders`` (for a folder given as ``PREPARED`` or ``PREPARED/samples``)."""
    prepared = Path(prepared)
    root = prepared.parent if prepared.name == "samples" else prepared
    return root / RENDERS_DIR


def _items(prepared: Path, limit: int | None) -> list[tuple[str, str]]:
    """(shape id, source mesh path) of every prepared sample, read from the npz metadata only."""
    samples = prepared / "samples" if (prepared / "samples").is_dir() else prepared
    files = sorted(samples.glob("*.npz"))
    if not files:
        raise ValueError(f"{prepared}: no prepared samples (*.npz); run `dora prepare` first")
    items = []
    for path in files[:limit]:
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
        except Exception:  # the render itself reports it: an empty source is a clear per-shape failure
            meta = {}
        items.append((str(meta.get("shape_id") or path.stem), str(meta.get("source") or "")))
    return items


def _run(jobs: list[tuple[str, str, str, dict[str, Any]]], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(render_shape, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(render_shape, jobs, chunksize=4)


def render_dataset(
    prepared: str | Path, config: RenderConfig, limit: int | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Render every prepared shape not rendered yet; returns the summary (also written to renders/summary.json)."""
    check_config(config)
    prepared = Path(prepared)
    out = renders_folder(prepared)
    out.mkdir(parents=True, exist_ok=True)
    items = _items(prepared, limit)
    values = asdict(config)
    jobs = [
        (shape_id, source, str(out / f"{shape_id}.npz"), values)
        for shape_id, source in items
        if overwrite or not (out / f"{shape_id}.npz").exists()
    ]
    save_yaml(to_dict(config), out / "config.yaml")
    start, done, failed = time.perf_counter(), 0, 0
    with open(prepared / FAILURES_FILE, "a") as failures:
        for result in _run(jobs, config.workers):
            if result["status"] == "done":
                done += 1
            else:
                failed += 1
                failures.write(json.dumps({k: result[k] for k in ("shape_id", "path", "reason")}) + "\n")
                failures.flush()
    summary = {
        "total": len(items),
        "done": done,
        "skipped": len(items) - len(jobs),
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 3),
        "num_views": config.num_views,
        "size": config.size,
        "failures": str(prepared / FAILURES_FILE),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora render-views", description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", help="a `dora prepare` output folder (PREPARED)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML (RenderConfig); flags override it")
    parser.add_argument(
        "--views", type=cli_types.positive_int, dest="num_views", help="random views per shape (4)"
    )
    # Condition images under 32 px are refused by data/condition_image.py; beyond 2048 px a render is all cost.
    parser.add_argument(
        "--size", type=cli_types.int_in(32, 2048), help="render size in px, in [32, 2048] (128)"
    )
    parser.add_argument("--seed", type=cli_types.seed, help="view seed (0)")
    parser.add_argument("--workers", type=cli_types.positive_int, help="worker processes (1)")
    parser.add_argument(
        "--limit", type=cli_types.positive_int, default=None, help="only the first N shapes (sorted by id)"
    )
    parser.add_argument("--overwrite", action="store_true", help="redo shapes already rendered")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in ("num_views", "size", "seed", "workers")
        if getattr(args, key) is not None
    }
    try:
        config = load_config(RenderConfig, args.config, overrides)
        summary = render_dataset(args.prepared, config, args.limit, args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"dora render-views: {error}", file=sys.stderr)
        return 2
    print(
        f"dora render-views: {summary['done']} rendered, {summary['skipped']} skipped, {summary['failed']} failed "
        f"in {summary['seconds']:.1f}s ({summary['num_views']} views of {summary['size']} px); "
        f"failures in {summary['failures']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

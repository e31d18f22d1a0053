"""Benchmark: prepare one real ~50k-face mesh (armadillo) at epsilon 2/256, 32k+32k points, 40k supervision.

    .venv/bin/python tests/benchmarks/bench_prepare.py [--mesh PATH] [--naive-subset 20000]

Each measured run is a fresh subprocess pinned to ONE core with one thread (OMP/MKL/BLAS); times are CPU seconds
of that process (``time.process_time``), i.e. seconds per shape per core even on a machine shared with other jobs
(wall time is also shown for ours), and its peak RSS is its own. Reported:

* ours: ``MeshProcessor.process`` (narrow-band UDF + flood fill + marching cubes, sampling, winding-number
  labels) -- measured in full.
* naive: what a direct implementation does -- the UDF at every point of the dense grid with
  ``trimesh.proximity.closest_point``, dense marching cubes, ``trimesh.sample`` sampling and ``trimesh.contains``
  (ray parity) labels. The dense UDF would take hours, so it is timed on a random subset of grid points and
  extrapolated linearly to the whole grid (said so in the output); the other stages are measured in full.
* dense-pcu: a stronger baseline -- the same fast libraries as ours (pcu distance and winding-number labels) but
  the UDF on the whole dense grid (no band, no crop): timed on a subset and extrapolated likewise.

Targets: ours <= 5 s per shape per core and >= 10x faster than naive. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MESH = PROJECT_ROOT.parent / "shared" / "meshes" / "armadillo.off"
EPSILON = 2 / 256
COUNTS = dict(n_uniform=32768, n_salient=32768, n_volume=16384, n_near=16384, n_sharp=8192)


def _single_core() -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[name] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_ours(mesh_path: str) -> dict:
    from dora_shapegen.data.processor import MeshProcessor

    processor = MeshProcessor(epsilon=EPSILON)
    stages = {}
    start = time.process_time()
    mesh = processor.load_mesh(mesh_path)
    stages["load"] = time.process_time() - start
    tick = time.process_time()
    watertight = processor.make_watertight(mesh)
    stages["watertight"] = time.process_time() - tick
    tick = time.process_time()
    point_cloud = processor.sample_points(
        watertight, COUNTS["n_uniform"], COUNTS["n_salient"], seed=0, sharp_source=mesh
    )
    stages["sampling"] = time.process_time() - tick
    tick = time.process_time()
    supervision = processor.sample_supervision(
        watertight, point_cloud, COUNTS["n_volume"], COUNTS["n_near"], COUNTS["n_sharp"], seed=0
    )
    stages["supervision"] = time.process_time() - tick
    total = time.process_time() - start
    # A full process() too (what `dora prepare` runs), to check the staged timing is representative.
    tick, wall = time.process_time(), time.perf_counter()
    processor.process(mesh_path, seed=0, **COUNTS)
    process_seconds, process_wall = time.process_time() - tick, time.perf_counter() - wall
    return {
        "seconds": total,
        "process_seconds": process_seconds,
        "process_wall_seconds": process_wall,
        "stages": stages,
        "peak_mib": _peak_mib(),
        "watertight": bool(watertight.is_watertight),
        "watertight_faces": len(watertight.faces),
        "num_supervision": len(supervision.points),
        "num_sharp_edges": point_cloud.stats["num_sharp_edges"],
    }


def _dense_grid(mesh, spacing: float):
    import numpy as np

    low, high = mesh.bounds[0] - 3 * spacing, mesh.bounds[1] + 3 * spacing
    axes = [np.arange(lo, hi + spacing, spacing) for lo, hi in zip(low, high)]
    return axes, int(np.prod([len(a) for a in axes]))


def run_naive(mesh_path: str, subset: int, distance: str) -> dict:
    import numpy as np
    import trimesh
    from skimage import measure

    from dora_shapegen.data.mesh_io import load_mesh

    stages, notes = {}, []
    start = time.process_time()
    mesh = load_mesh(mesh_path)
    stages["load"] = time.process_time() - start
    axes, grid_size = _dense_grid(mesh, EPSILON)
    rng = np.random.default_rng(0)
    if distance == "pcu":
        subset = max(subset, 20000)  # pcu is fast: a bigger subset times it more precisely
    subset_index = rng.integers(0, [len(a) for a in axes], size=(subset, 3))
    queries = np.stack([axes[d][subset_index[:, d]] for d in range(3)], axis=1)

    def dense_distance(points: np.ndarray) -> None:
        if distance == "trimesh":
            for chunk in np.array_split(
                points, max(1, len(points) // 50)
            ):  # trimesh's candidate lists are big
                trimesh.proximity.closest_point(mesh, chunk)
        else:
            import point_cloud_utils as pcu

            pcu.closest_points_on_mesh(
                np.ascontiguousarray(points),
                np.ascontiguousarray(mesh.vertices),
                np.ascontiguousarray(mesh.faces, np.int32),
            )

    # Two timings (a tenth of the subset, then all of it) separate the one-off cost (tree building) from the
    # per-point cost, so only the latter is extrapolated to the whole grid.
    tick = time.process_time()
    dense_distance(queries[: subset // 10])
    small = time.process_time() - tick
    tick = time.process_time()
    dense_distance(queries)
    full = time.process_time() - tick
    per_point = max(full - small, 1e-12) / (subset - subset // 10)
    stages["dense_udf (extrapolated)"] = max(full - per_point * subset, 0.0) + per_point * grid_size
    notes.append(f"dense UDF timed on {subset} of {grid_size} grid points, extrapolated linearly")
    # Dense marching cubes of a UDF-like field of the grid's size: the distance to a sphere stands in for the
    # field we did not compute (a simpler surface than the real one: this stage is, if anything, underestimated).
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    field = np.abs(np.linalg.norm(grid, axis=-1) - 0.6).astype(np.float32)
    del grid
    tick = time.process_time()
    measure.marching_cubes(field, EPSILON, spacing=(EPSILON,) * 3)
    stages["dense_marching_cubes"] = time.process_time() - tick
    del field
    # Sampling and labels on the input mesh (the naive path has no watertight mesh of its own yet).
    tick = time.process_time()
    surface, _ = trimesh.sample.sample_surface(mesh, COUNTS["n_uniform"] + COUNTS["n_salient"], seed=0)
    stages["sampling"] = time.process_time() - tick
    num_queries = COUNTS["n_volume"] + COUNTS["n_near"] + COUNTS["n_sharp"]
    queries = np.concatenate(
        [rng.uniform(-1.05, 1.05, size=(COUNTS["n_volume"], 3)), surface[: num_queries - COUNTS["n_volume"]]]
    )
    queries[COUNTS["n_volume"] :] += rng.normal(scale=0.005, size=(num_queries - COUNTS["n_volume"], 3))
    if distance == "trimesh":
        timed = queries[rng.choice(num_queries, size=1000, replace=False)]  # all groups, in proportion
        tick = time.process_time()
        for chunk in np.array_split(timed, 20):  # distances for the TSDF, also extrapolated
            trimesh.proximity.closest_point(mesh, chunk)
        distance_seconds = (time.process_time() - tick) * num_queries / len(timed)
        tick = time.process_time()
        for chunk in np.array_split(queries, 40):
            mesh.contains(chunk)
        stages["labels (contains + distance, distance extrapolated)"] = (
            time.process_time() - tick + distance_seconds
        )
        notes.append(f"TSDF distances timed on 1000 of {num_queries} queries, extrapolated")
    else:
        from dora_shapegen.data.supervision import label_points

        tick = time.process_time()
        label_points(mesh, queries)
        stages["labels (winding number + distance)"] = time.process_time() - tick
    return {"seconds": sum(stages.values()), "stages": stages, "peak_mib": _peak_mib(), "notes": notes}


def _child(args: argparse.Namespace) -> None:
    _single_core()
    if args.child == "ours":
        result = run_ours(args.mesh)
    else:
        result = run_naive(args.mesh, args.naive_subset, "trimesh" if args.child == "naive" else "pcu")
    print("RESULT " + json.dumps(result))


def _spawn(kind: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--mesh", args.mesh]
    command += ["--naive-subset", str(args.naive_subset)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark run {kind!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    output = done.stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default=str(DEFAULT_MESH))
    parser.add_argument("--naive-subset", type=int, default=1000, help="grid points timed for the dense UDF")
    parser.add_argument("--child", choices=["ours", "naive", "dense-pcu"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if not Path(args.mesh).exists():
        print(f"mesh not found: {args.mesh}", file=sys.stderr)
        return 1
    results = {kind: _spawn(kind, args) for kind in ("ours", "naive", "dense-pcu")}
    ours = results["ours"]["seconds"]
    print(
        f"\nprepare benchmark: {Path(args.mesh).name}, epsilon 2/256, 32k+32k points, 40k supervision, 1 core\n"
    )
    print(f"{'method':<12} {'s/shape/core':>13} {'peak MiB':>9} {'vs ours':>8}  stages (s)")
    for kind, result in results.items():
        stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result["stages"].items())
        ratio = result["seconds"] / ours
        print(f"{kind:<12} {result['seconds']:>13.2f} {result['peak_mib']:>9.0f} {ratio:>7.1f}x  {stages}")
    for kind in ("naive", "dense-pcu"):
        for note in results[kind].get("notes", []):
            print(f"note ({kind}): {note}")
    summary = {
        "mesh": Path(args.mesh).name,
        "ours_seconds_per_shape_per_core": round(ours, 3),
        "ours_process_seconds": round(results["ours"]["process_seconds"], 3),
        "ours_process_wall_seconds": round(results["ours"]["process_wall_seconds"], 3),
        "ours_peak_mib": round(results["ours"]["peak_mib"], 1),
        "ours_watertight": results["ours"]["watertight"],
        "speedup_vs_naive": round(results["naive"]["seconds"] / ours, 2),
        "speedup_vs_dense_pcu": round(results["dense-pcu"]["seconds"] / ours, 2),
        "naive_seconds_extrapolated": round(results["naive"]["seconds"], 1),
        "dense_pcu_seconds_extrapolated": round(results["dense-pcu"]["seconds"], 1),
        "target_met": ours <= 5.0 and results["naive"]["seconds"] / ours >= 10.0,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

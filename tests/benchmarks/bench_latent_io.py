"""Latent cache I/O benchmark: `dora cache-latents` throughput with 1 and 2 processes, and loading throughput of
WebDataset latent shards vs one file per sample.

    python tests/benchmarks/bench_latent_io.py [--shapes 48] [--load-samples 4000] [--skip-cache]

Caching: a small real DoraVAE (width 128, 4 heads, 2 encoder layers, 32 latent channels, 2048 + 512 input points,
256 tokens) encodes synthetic prepared samples (random points on spheres, the documented npz keys); 1 process
(1 thread) vs 2 processes (torchrun, gloo, 1 thread each). Throughput is the encode loop's (from the manifest's
``last_run``: shapes / slowest rank's seconds), so the fixed start-up (imports, model load) is excluded.

Loading: 512 x 64 fp16 latents, one process, one thread, normalised float32 tensors out. Compared with one
``.npy`` per sample (latents only) and one ``.npz`` per sample (latents + caption + metadata, what a shard sample
holds), each read warm (page cache) and cold (each file evicted with posix_fadvise(DONTNEED) first).
Prints a table and a JSON line of figures and ratios. Targets: 2 processes >= 1.8x; shards >= 5x the
per-sample files and >= 2,000 samples/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]

from dora_shapegen.data.latent_shards import (  # noqa: E402
    LatentShardWriter,
    LatentStats,
    LatentSums,
    build_manifest,
    latent_shard_pipeline,
    load_manifest,
    to_storage,
    write_manifest,
)

VAE_CONFIG = dict(
    width=128,
    heads=4,
    num_encoder_layers=2,
    num_decoder_layers=1,
    latent_channels=32,
    output_type="occupancy",
    n_uniform=2048,
    n_salient=512,
)
NUM_TOKENS = 256


def write_prepared(root: Path, count: int) -> None:
    samples = root / "samples"
    samples.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        points = rng.normal(size=(2560, 3)).astype(np.float32)
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        meta = {
            "shape_id": f"shape_{index:04d}",
            "caption": f"a sphere {index}",
            "category": "sphere",
            "source": "synthetic",
            "epsilon": 2 / 256,
        }
        np.savez(
            samples / f"shape_{index:04d}.npz",
            uniform_points=points[:2048],
            uniform_normals=points[:2048],
            salient_points=points[2048:],
            salient_normals=points[2048:],
            sup_points=points[:64],
            sup_occupancy=np.zeros(64, np.float32),
            sup_tsdf=np.zeros(64, np.float32),
            sup_group=np.zeros(64, np.int8),
            meta=np.array(json.dumps(meta)),
        )


def cache_throughput(work: Path, shapes: int) -> dict[str, float]:
    from dora_shapegen.vae import DoraVAE

    torch.manual_seed(0)
    DoraVAE(**VAE_CONFIG).save_pretrained(work / "vae")
    write_prepared(work / "prepared", shapes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "--vae",
        str(work / "vae"),
        "--data",
        str(work / "prepared"),
        "--num-tokens",
        str(NUM_TOKENS),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--max-samples",
        "16",
    ]
    results = {}
    for processes in (1, 2):
        out = work / f"latents_{processes}"
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(processes),
            ]
            if processes > 1
            else [sys.executable]
        )
        subprocess.run(
            [*launcher, "-m", "dora_shapegen.vae.cache_latents", *args, "--out", str(out)],
            cwd=PROJECT_ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        run = load_manifest(out)["last_run"]
        assert run["shapes_encoded"] == shapes and run["world_size"] == processes
        results[processes] = run["shapes_per_second"]
    return results


def evict(paths: list[Path]) -> None:
    """Drop our own files from the page cache (only these files; nothing system-wide)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(descriptor)


def loading_throughput(work: Path, count: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(count, 1, 512, 64)).astype(np.float16)  # (S, V, N, C)
    records: list = []
    shard_dir, npy_dir, npz_dir = work / "shards", work / "npy", work / "npz"
    npy_dir.mkdir(parents=True)
    npz_dir.mkdir(parents=True)
    with LatentShardWriter(shard_dir, max_samples=1000, on_shard_closed=records.append) as writer:
        for index in range(count):
            shape_id, caption = f"shape_{index:05d}", f"a random shape number {index}"
            metadata = {"shape_id": shape_id, "captions": [caption], "dtype": "fp16", "num_tokens": 512}
            writer.write(shape_id, to_storage(latents[index], "fp16"), [caption], "synthetic", metadata)
            np.save(npy_dir / f"{shape_id}.npy", latents[index, 0])
            np.savez(
                npz_dir / f"{shape_id}.npz",
                latents=latents[index, 0],
                caption=np.array(caption),
                meta=np.array(json.dumps(metadata)),
            )
    sums = LatentSums()
    for record in records:
        sums = sums.merge(record.sums)
    write_manifest(shard_dir, build_manifest(records, sums, num_tokens=512, dtype="fp16"))
    stats = LatentStats.from_manifest(shard_dir)

    def read_shards() -> int:
        return sum(1 for _ in latent_shard_pipeline(shard_dir, shuffle_buffer=0, shardshuffle=False))

    def read_npy() -> int:
        for path in sorted(npy_dir.glob("*.npy")):
            stats.normalize(torch.from_numpy(np.load(path).astype(np.float32)))  # (N, C)
        return count

    def read_npz() -> int:
        for path in sorted(npz_dir.glob("*.npz")):
            with np.load(path) as archive:
                stats.normalize(torch.from_numpy(archive["latents"].astype(np.float32)))  # (N, C)
                str(archive["caption"]), json.loads(str(archive["meta"]))
        return count

    results = {}
    for name, reader, folder in (
        ("shards", read_shards, shard_dir),
        ("npy_per_sample", read_npy, npy_dir),
        ("npz_per_sample", read_npz, npz_dir),
    ):
        files = sorted(folder.glob("*.tar" if name == "shards" else "*.np*"))
        reader()  # warm up: page cache, imports, header caches
        start = time.perf_counter()
        assert reader() == count
        warm = count / (time.perf_counter() - start)
        evict(files)
        start = time.perf_counter()
        assert reader() == count
        cold = count / (time.perf_counter() - start)
        results[name] = {"warm": round(warm, 1), "cold": round(cold, 1)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=int, default=96, help="shapes to cache per run")
    parser.add_argument("--load-samples", type=int, default=4000, help="samples for the loading benchmark")
    parser.add_argument("--skip-cache", action="store_true", help="only the loading benchmark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        loading = loading_throughput(work / "load", args.load_samples)
        cache = {} if args.skip_cache else cache_throughput(work / "cache", args.shapes)
    rows = [
        ("cache-latents, 1 process (shapes/s)", cache.get(1)),
        ("cache-latents, 2 processes (shapes/s)", cache.get(2)),
    ]
    for name, figures in loading.items():
        for temperature in ("warm", "cold"):
            rows.append((f"load {name}, {temperature} (samples/s, 1 core)", figures[temperature]))
    ratios = {
        "cache_2proc_over_1proc": round(cache[2] / cache[1], 3) if cache else None,
        **{
            f"shards_over_{name}_{t}": round(loading["shards"][t] / loading[name][t], 2)
            for name in ("npy_per_sample", "npz_per_sample")
            for t in ("warm", "cold")
        },
    }
    width = max(len(name) for name, _ in rows)
    print(f"{'measurement':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value if value is not None else 'skipped'}")
    for name, value in ratios.items():
        print(f"{name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "cache_shapes_per_second": cache,
                "loading_samples_per_second": loading,
                "ratios": ratios,
                "vae_config": VAE_CONFIG,
                "num_tokens": NUM_TOKENS,
                "cpu_count": os.cpu_count(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

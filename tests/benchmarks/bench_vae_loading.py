"""VAE training data at Dora's sizes: samples/s one DataLoader worker delivers, against what a GPU consumes.

    python tests/benchmarks/bench_vae_loading.py [--prepared DIR] [--out runs/bench_vae_loading]

Data: prepared at ``configs/prepare/default.yaml`` (32,768 + 32,768 surface points, 40,960 supervision points;
``--prepared`` takes an existing folder, else ``--builtin`` procedural shapes are prepared once), stored in each
format (``npz_compressed``, the old default, and ``npz``, uncompressed), and read through the training path
(``PreparedDataset`` -> ``SeededItems`` -> ``collate``) at ``configs/vae/dora_v1_1.yaml``'s ``data`` counts.
Files are read from the page cache (the same few shapes cycle): this measures CPU cost per sample, not disk.

GPU side, not measured (no GPU here): FLOPs of one dora_v1_1 training step per sample, counted by
``torch.utils.flop_counter`` on the meta device (model FLOPs, gradient checkpointing's recompute excluded), turned
into samples/s at ``--mfu`` of ``--peak-tflops`` (default 35% of the H100's 989 bf16 dense TFLOP/s). The GPU eats
samples fastest at the schedule's shortest sequences (256 tokens, the first 20k steps): that is the rate loading must
beat ``--margin`` (3x) with ``--workers-per-gpu`` (8) workers, assuming workers scale linearly (one core each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import H100_BF16_DENSE_TFLOPS, vae_step_flops  # noqa: E402

from dora_shapegen.config import load_yaml  # noqa: E402
from dora_shapegen.vae.train_data import model_point_counts  # noqa: E402

FORMATS = ("npz_compressed", "npz")


def prepare_formats(args: argparse.Namespace) -> dict[str, Path]:
    """One folder per storage format holding the same arrays."""
    from dora_shapegen.data.prepare import main as prepare
    from dora_shapegen.data.prepare_convert import convert_folder

    out = Path(args.out)
    source = Path(args.prepared) if args.prepared else out / "source"
    if not args.prepared and not (source / "samples").is_dir():
        argv = ["--builtin", str(args.builtin), "--out", str(source), "--workers", str(args.prepare_workers)]
        if prepare(argv) != 0:
            raise SystemExit("preparing the benchmark data failed")
    folders = {}
    for storage in FORMATS:
        folder = out / storage / "samples"
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source / "samples", folder)
        convert_folder(folder, storage)  # a no-op for files already in this format
        folders[storage] = folder.parent
    return folders


def loading_rates(root: Path, data: dict[str, Any], batch_size: int, seconds: float) -> dict[str, float]:
    """Samples/s of one worker, two ways:

    - ``worker_cpu``: samples per CPU-second of exactly what a DataLoader worker does per batch -- fetch the items,
      collate, and pickle the batch for the training process (which moves its tensors into shared memory). CPU
      time, not wall time, so other jobs on a shared machine do not count against it: the rate of a worker that
      has its core to itself, which is the premise of "8 workers per GPU".
    - ``dataloader_wall``: a real DataLoader with one worker, wall clock (a check on the first; it drops when the
      machine is busy).
    """
    from multiprocessing.reduction import ForkingPickler

    from dora_shapegen.data.prepare import PreparedDataset
    from dora_shapegen.vae.train_data import EpochPermutationSampler, SeededItems, collate

    dataset = PreparedDataset(
        root, n_uniform=data["n_uniform"], n_salient=data["n_salient"], n_supervision=data["n_supervision"]
    )
    items = SeededItems(dataset, list(range(len(dataset))))

    def worker_batch(first: int) -> None:
        batch = collate([items[(index % len(dataset), index)] for index in range(first, first + batch_size)])
        ForkingPickler.dumps(
            batch
        )  # what the worker's result queue does with it (tensors into shared memory)

    worker_batch(0)  # warm the page cache and imports
    wall, cpu, count = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - wall < seconds:
        worker_batch(count)
        count += batch_size
    worker_cpu = count / (time.process_time() - cpu)

    sampler = EpochPermutationSampler(len(dataset), seed=0)
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=1,
        collate_fn=collate,
        persistent_workers=True,
        prefetch_factor=4,
    )
    batches, count, started = iter(loader), 0, None
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            continue
        if started is None:  # the first batch pays the worker's start-up
            started = time.perf_counter()
            continue
        count += batch["uniform"].shape[0]
        if time.perf_counter() - started >= seconds:
            break
    return {"worker_cpu": worker_cpu, "dataloader_wall": count / (time.perf_counter() - started)}


def gpu_consumption(config: dict[str, Any], mfu: float, peak_tflops: float) -> dict[str, Any]:
    """Samples/s one GPU consumes per token count of the schedule, at the given MFU."""
    model, data = config["model"], config["data"]
    token_counts = sorted({int(t) for phase in config["schedule"]["phases"] for t in phase["tokens"]})
    rows = {}
    for tokens in token_counts:
        flops = vae_step_flops(model, tokens, data["n_uniform"], data["n_salient"], data["n_supervision"])
        rows[tokens] = {"tflop_per_sample": flops / 1e12, "samples_per_s": mfu * peak_tflops * 1e12 / flops}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", help="an existing `dora prepare` folder at Dora's point counts")
    parser.add_argument(
        "--builtin", type=int, default=8, help="procedural shapes to prepare when --prepared is not given"
    )
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_vae_loading")
    parser.add_argument("--config", default="vae/dora_v1_1.yaml")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per format and method")
    parser.add_argument("--mfu", type=float, default=0.35)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="bf16 dense peak")
    parser.add_argument("--workers-per-gpu", type=int, default=8)
    parser.add_argument(
        "--margin", type=float, default=3.0, help="loading must exceed this multiple of consumption"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker = one core; collate must not borrow more

    config = load_yaml(args.config)
    data = config["data"]
    uniform, salient = model_point_counts(config["model"])  # what data: leaves to the model
    data["n_uniform"], data["n_salient"] = data.get("n_uniform") or uniform, data.get("n_salient") or salient
    folders = prepare_formats(args)
    gpu = gpu_consumption(config, args.mfu, args.peak_tflops)
    fastest = max(row["samples_per_s"] for row in gpu.values())
    needed = args.margin * fastest
    print(
        f"\nGPU consumption of {args.config} (FLOPs counted on the meta device; {args.mfu:.0%} MFU of "
        f"{args.peak_tflops:.0f} TFLOP/s bf16 -- derived, not measured):"
    )
    print("| tokens | TFLOP / sample (fwd+bwd) | samples/s per GPU |\n|---|---|---|")
    for tokens, row in gpu.items():
        print(f"| {tokens} | {row['tflop_per_sample']:.2f} | {row['samples_per_s']:.1f} |")

    results: dict[str, Any] = {}
    load = os.getloadavg()[0]
    for storage, folder in folders.items():
        rates = loading_rates(folder, data, int(data["batch_size"]), args.seconds)
        sizes = [path.stat().st_size for path in (folder / "samples").glob("*.npz")]
        per_worker = rates["worker_cpu"]
        results[storage] = {
            **{f"samples_per_s_{k}": round(v, 2) for k, v in rates.items()},
            "mb_per_sample": round(sum(sizes) / len(sizes) / 1e6, 3),
            "samples_per_s_per_gpu": round(per_worker * args.workers_per_gpu, 1),
            "ratio_to_gpu_consumption": round(per_worker * args.workers_per_gpu / fastest, 2),
        }
    print(
        f"\nLoading, {len(sizes)} shapes, batch {data['batch_size']}, {data['n_uniform']} + {data['n_salient']} "
        f"points, {data['n_supervision']} supervision (CPU, page cache):"
    )
    print(
        f"| format | MB / sample | samples / CPU-s, one worker | DataLoader 1 worker, wall (load {load:.1f}) | "
        f"x{args.workers_per_gpu} workers | / GPU consumption ({fastest:.0f}/s at {min(gpu)} tokens) |\n"
        "|---|---|---|---|---|---|"
    )
    for storage, row in results.items():
        print(
            f"| {storage} | {row['mb_per_sample']} | {row['samples_per_s_worker_cpu']} | "
            f"{row['samples_per_s_dataloader_wall']} | {row['samples_per_s_per_gpu']} | "
            f"{row['ratio_to_gpu_consumption']}x |"
        )
    verdict = {storage: row["ratio_to_gpu_consumption"] >= args.margin for storage, row in results.items()}
    print(f"\nneeded: {args.margin}x = {needed:.0f} samples/s per GPU; meets it: {verdict}")
    report = {
        "gpu": {
            "derived_from_flops": True,
            "mfu": args.mfu,
            "peak_tflops": args.peak_tflops,
            "per_tokens": {str(k): {kk: round(vv, 3) for kk, vv in v.items()} for k, v in gpu.items()},
        },
        "loading": results,
        "load_average": round(load, 2),
        "ratios": {storage: row["ratio_to_gpu_consumption"] for storage, row in results.items()},
        "speedup_npz_over_compressed": round(
            results["npz"]["samples_per_s_per_gpu"] / results["npz_compressed"]["samples_per_s_per_gpu"], 2
        ),
        "meets_margin": verdict,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

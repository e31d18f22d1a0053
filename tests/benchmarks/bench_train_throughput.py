"""Training throughput of the VAE (configs/vae/dora_v1_1.yaml) and the DiT (configs/dit/base.yaml).

    python tests/benchmarks/bench_train_throughput.py [--models vae dit] [--out runs/bench_train_throughput]

Per variant (gradient checkpointing on/off x torch.compile on/off): seconds per optimizer step (median after
warm-up), samples/s, achieved TFLOP/s and MFU against the device's bf16 dense peak, peak memory. FLOPs are model
FLOPs from ``torch.utils.flop_counter`` counted once per shape on the meta device (recompute not counted, the
usual MFU convention; on the CPU the flop counter misses the fused attention kernel, the meta count does not).
Then, on a GPU, the largest batch that fits in 24 / 48 / 80 GB (checkpointing on, compile off), by doubling and
bisection with the process capped at that memory (``torch.cuda.set_per_process_memory_fraction``).

On a GPU: the configs' real sizes, bf16 autocast, SDPA restricted to the flash / memory-efficient kernels (math
would silently hide a kernel that does not apply), fused AdamW, blocks compiled one by one (regional compilation:
the VAE's FPS loop would unroll into the graph). Without a GPU it runs on the CPU at reduced sizes (small configs,
fp32, compile off unless asked) so the script stays tested, and says so: those figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import (  # noqa: E402
    bf16_peak_tflops,
    build_dit,
    build_vae,
    dit_batch,
    dit_step,
    dit_step_flops,
    largest_batch,
    vae_batch,
    vae_step,
    vae_step_flops,
)

from dora_shapegen.config import load_yaml  # noqa: E402
from dora_shapegen.vae.train_data import model_point_counts  # noqa: E402

# What each model is measured at: config, tokens, and the batch (GPU: the config's per-GPU batch).
GPU_SETUP = {
    "vae": {"config": "vae/dora_v1_1.yaml", "tokens": 2048},
    "dit": {"config": "dit/base.yaml", "tokens": 2048, "text_tokens": 77},
}
# Reduced sizes for the CPU: the same code paths at a fraction of the cost.
CPU_SETUP = {
    "vae": {
        "config": "vae/small.yaml",
        "tokens": 128,
        "batch": 2,
        "n_uniform": 1024,
        "n_salient": 256,
        "n_query": 1024,
    },
    "dit": {"config": "dit/small.yaml", "tokens": 128, "batch": 4, "text_tokens": 16},
}
REPEATED_BLOCKS = ("SelfAttentionBlock", "CrossAttentionBlock", "ShapeDiTBlock")


class Workload:
    """One model at one size: builds the model and a batch, runs a training step, knows its FLOPs."""

    def __init__(self, kind: str, setup: dict[str, Any], device: torch.device, quick: bool) -> None:
        self.kind, self.device = kind, device
        config = load_yaml(setup["config"])
        self.config_name, self.model_config = setup["config"], dict(config["model"])
        self.tokens = int(setup["tokens"])
        if kind == "vae":
            data = config["data"]
            uniform, salient = model_point_counts(config["model"])  # what data: leaves to the model
            self.batch = int(setup.get("batch", data["batch_size"]))
            self.points = (
                int(setup.get("n_uniform", data.get("n_uniform") or uniform)),
                int(setup.get("n_salient", data.get("n_salient") or salient)),
                int(setup.get("n_query", data["n_supervision"])),
            )
        else:
            self.batch = int(setup.get("batch", config["data"]["batch_size"]))
            self.text_tokens = int(setup["text_tokens"])
        if quick:
            self.batch = min(self.batch, 2)

    def flops_per_sample(self) -> int:
        if self.kind == "vae":
            return vae_step_flops(self.model_config, self.tokens, *self.points, batch=1)
        return dit_step_flops(self.model_config, self.tokens, self.text_tokens, batch=1)

    def build(self, checkpointing: bool, compiled: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = (
            build_vae(self.model_config, self.device)
            if self.kind == "vae"
            else build_dit(self.model_config, self.device)
        )
        if checkpointing:
            model.enable_gradient_checkpointing()
        if compiled:
            for module in model.modules():
                if type(module).__name__ in REPEATED_BLOCKS:
                    module.compile()
        return model.train()

    def batch_of(self, size: int) -> dict[str, Any]:
        if self.kind == "vae":
            return vae_batch(size, *self.points, self.device)
        return dit_batch(self.model_config, size, self.tokens, self.text_tokens, self.device)

    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> None:
        if self.kind == "vae":
            vae_step(model, batch, self.tokens)
        else:
            dit_step(model, batch)


def _contexts(device: torch.device) -> Any:
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    work: Workload, batch_size: int, checkpointing: bool, compiled: bool, steps: int, warmup: int
) -> dict:
    """Median seconds per optimizer step (forward, backward, clip, AdamW) and peak memory."""
    device = work.device
    model = work.build(checkpointing, compiled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = work.batch_of(batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with _contexts(device):
        for index in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with autocast:
                work.step(model, batch)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, optimizer, batch
    return {"seconds_per_step": statistics.median(times), "peak_memory_gib": peak}


def fits_in(work: Workload, budget_gib: float) -> Any:
    """A predicate for largest_batch: does one training step at batch b run within ``budget_gib``?"""
    total = torch.cuda.get_device_properties(work.device).total_memory / 2**30

    def fits(batch_size: int) -> bool:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib / total), work.device)
        try:
            measure(work, batch_size, checkpointing=True, compiled=False, steps=1, warmup=0)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, work.device)

    return fits


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = bf16_peak_tflops(name) if cuda else None
    if args.peak_tflops:
        peak = args.peak_tflops
    setups = GPU_SETUP if cuda else CPU_SETUP
    note = (
        f"GPU run on {name}, bf16 autocast, flash/efficient SDPA"
        if cuda
        else "CPU run at REDUCED sizes (small configs, fp32, no bf16 peak): not GPU figures, only a check that the "
        "script works; run it on a GPU for the real table"
    )
    print(note)
    compile_options = {"on": [True], "off": [False], "both": [False, True]}[
        args.compile or ("both" if cuda else "off")
    ]
    ckpt_options = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    rows, largest = [], {}
    for kind in args.models:
        work = Workload(kind, setups[kind], device, args.quick)
        batch_size = args.batch or work.batch
        flops = work.flops_per_sample() * batch_size
        for checkpointing in ckpt_options:
            for compiled in compile_options:
                row = {
                    "model": kind,
                    "config": work.config_name,
                    "tokens": work.tokens,
                    "batch": batch_size,
                    "checkpointing": checkpointing,
                    "compile": compiled,
                }
                try:
                    result = measure(work, batch_size, checkpointing, compiled, args.steps, args.warmup)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    rows.append(row)
                    continue
                seconds = result["seconds_per_step"]
                achieved = flops / seconds / 1e12
                row |= {
                    "seconds_per_step": round(seconds, 4),
                    "samples_per_s": round(batch_size / seconds, 4),
                    "tflop_per_step": round(flops / 1e12, 6),
                    "achieved_tflops": round(achieved, 6),
                    "mfu": round(achieved / peak, 4) if peak else None,
                    "peak_memory_gib": None
                    if result["peak_memory_gib"] is None
                    else round(result["peak_memory_gib"], 2),
                }
                rows.append(row)
        if cuda and not args.skip_largest_batch:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            largest[kind] = {
                f"{gb} GB": largest_batch(fits_in(work, gb), limit=args.max_batch)
                for gb in args.memory_gb
                if gb <= total
            }
    return {
        "device": name,
        "cuda": cuda,
        "note": note,
        "bf16_peak_tflops": peak,
        "rows": rows,
        "largest_batch": largest,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        "\n| model | tokens | batch | ckpt | compile | s / step | samples/s | TFLOP / step | TFLOP/s | MFU | "
        "peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for row in report["rows"]:
        if "error" in row:
            print(
                f"| {row['model']} | {row['tokens']} | {row['batch']} | {row['checkpointing']} | {row['compile']} "
                f"| {row['error']} |||||||"
            )
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (no bf16 peak)"
        print(
            f"| {row['model']} | {row['tokens']} | {row['batch']} | {row['checkpointing']} | {row['compile']} | "
            f"{row['seconds_per_step']} | {row['samples_per_s']} | {row['tflop_per_step']:.4g} | "
            f"{row['achieved_tflops']:.4g} | {mfu} | {row['peak_memory_gib'] or 'n/a'} |"
        )
    if report["largest_batch"]:
        print("\nLargest batch per GPU that fits (gradient checkpointing on):")
        for model, sizes in report["largest_batch"].items():
            print(f"  {model}: " + ", ".join(f"{gb}: {size}" for gb, size in sizes.items()))
    else:
        print("\nLargest-batch table: needs a GPU (binary search under a memory cap), skipped.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vae", "dit"], choices=["vae", "dit"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, help="override the batch (default: the config's per-GPU batch)")
    parser.add_argument("--checkpointing", default="both", choices=["on", "off", "both"])
    parser.add_argument(
        "--compile", choices=["on", "off", "both"], help="default: both on a GPU, off on the CPU"
    )
    parser.add_argument("--memory-gb", type=float, nargs="+", default=[24, 48, 80])
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--skip-largest-batch", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="override the device's bf16 dense peak")
    parser.add_argument("--cpu", action="store_true", help="force the reduced CPU run")
    parser.add_argument("--quick", action="store_true", help="batch <= 2 (smoke test)")
    parser.add_argument("--out", default="runs/bench_train_throughput")
    args = parser.parse_args(argv)
    from dora_shapegen.runtime import flush_denormals

    flush_denormals()  # as `dora` does: denormals (local attention makes many) slow the CPU several-fold
    report = run(args)
    print_report(report)
    ratios = {
        f"{r['model']}/ckpt={r['checkpointing']}/compile={r['compile']}": r.get("mfu") for r in report["rows"]
    }
    report["ratios"] = {"mfu": ratios}
    print(json.dumps(report, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

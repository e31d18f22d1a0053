"""Training-step efficiency on this CPU: achieved FLOP/s of the quickstart's VAE and DiT steps against the
machine's own fp32 matmul rate, measured in the same run.

    python tests/benchmarks/bench_mfu.py [--threads 2] [--steps 6] [--vae-config ...] [--dit-config ...]

Each step is the training loop's own: the VAE's ``compute_loss`` (forward with the configured token count, BCE /
MSE per supervision group, KL), backward, gradient clipping and the AdamW step built as ``dora train-vae`` builds
it; the DiT's flow-matching step as ``dora train-dit`` runs it (timestep sampling, noising, caption embeddings of
the packaged text encoder's size, loss, backward, clipping, AdamW). Batches are random tensors shaped like the
loaders' (the loaders keep data in memory in the quickstart, so no I/O is timed).

FLOPs per step are model FLOPs from ``throughput.count_flops`` (``torch.utils.flop_counter`` over one whole step:
matmuls and attention, backward = 2x forward; elementwise work such as norms, FPS and the optimizer is not counted,
as usual for MFU). PyTorch has no FLOP formula for the CPU flash-attention kernel, so without the mapping there
attention would count as zero: on the quickstart's models that is a third of the FLOPs.

The reference rate is the best of a few square fp32 matmuls (1024..4096) on the same threads, timed right before
the steps, so a busy machine lowers both and the ratio stays meaningful. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from throughput import count_flops  # noqa: E402

from dora_shapegen.config import CONFIG_DIR, from_dict, load_yaml  # noqa: E402
from dora_shapegen.training.schedules import TokenSchedule  # noqa: E402


def matmul_rate(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 3) -> float:
    """Best fp32 matmul FLOP/s over a few square sizes (the machine's practical peak on these threads)."""
    best = 0.0
    for size in sizes:
        left, right = torch.randn(size, size), torch.randn(size, size)
        left @ right  # warm-up (allocations, thread pool)
        started = time.perf_counter()
        for _ in range(repeats):
            left @ right
        best = max(best, 2.0 * size**3 * repeats / (time.perf_counter() - started))
    return best


def adamw(model: torch.nn.Module, training: Any) -> torch.optim.Optimizer:
    """The optimizer both training loops build."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=training.learning_rate,
        betas=tuple(training.adam_betas),
        weight_decay=training.weight_decay,
    )


def update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float
) -> None:
    """Backward, clipping and the optimizer step, as both loops do them."""
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def describe(model: torch.nn.Module, batch_size: int, tokens: int) -> dict[str, Any]:
    return {
        "batch": batch_size,
        "tokens": tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "width": model.config.width,
    }


def vae_step_factory(config_path: Path, num_tokens: int | None) -> tuple[Any, dict[str, Any]]:
    from dora_shapegen.vae.train import VAETrainConfig, build_model, compute_loss

    config = from_dict(VAETrainConfig, load_yaml(config_path), str(config_path))
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = adamw(model, config.training)
    data, tcfg = config.data, config.training
    batch_size = data.batch_size
    tokens = num_tokens or TokenSchedule(config.schedule).max_tokens
    generator = torch.Generator().manual_seed(0)

    def cloud(count: int) -> torch.Tensor:
        normals = torch.nn.functional.normalize(
            torch.randn(batch_size, count, 3, generator=generator), dim=-1
        )
        return torch.cat(
            [torch.rand(batch_size, count, 3, generator=generator) * 2 - 1, normals], dim=-1
        )  # (B, N, 6)

    queries = data.n_supervision or 1024
    batch = {
        "uniform": cloud(data.n_uniform or model.config.n_uniform),
        "salient": cloud(data.n_salient or model.config.n_salient),
        "sup_points": torch.rand(batch_size, queries, 3, generator=generator) * 2 - 1,  # (B, M, 3)
        "sup_occupancy": (torch.rand(batch_size, queries, generator=generator) > 0.5).float(),  # (B, M)
        "sup_tsdf": torch.rand(batch_size, queries, generator=generator) * 2 - 1,  # (B, M)
        "sup_group": torch.randint(0, 3, (batch_size, queries), generator=generator),  # (B, M)
    }

    def step() -> None:
        loss, _ = compute_loss(model, batch, tokens, model.config.output_type, tcfg)
        update(model, optimizer, loss, tcfg.max_grad_norm)

    return step, describe(model, batch_size, tokens)


def dit_step_factory(
    config_path: Path, num_tokens: int | None, text_tokens: int
) -> tuple[Any, dict[str, Any]]:
    from dora_shapegen.diffusion.flow_matching import (
        add_noise,
        flow_matching_loss,
        sample_timesteps,
        velocity_target,
    )
    from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
    from dora_shapegen.diffusion.train import DiTTrainConfig

    config = from_dict(DiTTrainConfig, load_yaml(config_path), str(config_path))
    torch.manual_seed(0)
    model = ShapeDiT(**config.model).train()
    optimizer = adamw(model, config.training)
    tcfg, batch_size = config.training, config.data.batch_size
    tokens = num_tokens or TokenSchedule(config.schedule).max_tokens
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch_size, tokens, model.config.in_channels, generator=generator)  # (B, N, C)
    text = torch.randn(
        batch_size, text_tokens, model.config.cross_attention_dim, generator=generator
    )  # (B, L, D)
    mask = torch.ones(batch_size, text_tokens, dtype=torch.bool)  # (B, L)
    pooled_dim = model.config.pooled_projection_dim
    pooled = (
        None if pooled_dim is None else torch.randn(batch_size, pooled_dim, generator=generator)
    )  # (B, P)

    def step() -> None:
        noise = torch.randn(latents.shape, generator=generator)  # (B, N, C)
        sigmas, timesteps = sample_timesteps(
            batch_size,
            tcfg.timestep_sampling,
            generator,
            "cpu",
            tcfg.logit_mean,
            tcfg.logit_std,
            tcfg.mode_scale,
            tcfg.scheduler_shift,
        )  # (B,), (B,)
        prediction = model(
            add_noise(latents, noise, sigmas),
            timesteps,
            text,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            return_dict=False,
        )[0]  # (B, N, C)
        loss = flow_matching_loss(prediction, velocity_target(latents, noise), tcfg.loss_weighting, sigmas)
        update(model, optimizer, loss, tcfg.max_grad_norm)

    return step, describe(model, batch_size, tokens)


def measure(name: str, step: Any, info: dict[str, Any], steps: int, peak: float) -> dict[str, Any]:
    flops = count_flops(step)  # also the first warm-up step
    step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    achieved = flops / seconds
    return {
        "name": name,
        **info,
        "gflop_per_step": flops / 1e9,
        "seconds_per_step": seconds,
        "achieved_gflops": achieved / 1e9,
        "matmul_gflops": peak / 1e9,
        "fraction_of_matmul": achieved / peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--vae-config", type=Path, nargs="*", default=[CONFIG_DIR / "quickstart" / "vae.yaml"]
    )
    parser.add_argument(
        "--dit-config", type=Path, nargs="*", default=[CONFIG_DIR / "quickstart" / "dit.yaml"]
    )
    parser.add_argument("--vae-tokens", type=int, default=None, help="default: the schedule's largest count")
    parser.add_argument("--dit-tokens", type=int, default=None, help="default: the schedule's largest count")
    parser.add_argument(
        "--text-tokens", type=int, default=16, help="caption length (MiniLM tokens of a caption)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    args = parser.parse_args(argv)
    from dora_shapegen.runtime import flush_denormals

    flush_denormals()  # as `dora` does: denormals (local attention makes many) slow the CPU several-fold
    torch.set_num_threads(args.threads)

    rows = []
    for path in args.vae_config:
        step, info = vae_step_factory(path, args.vae_tokens)
        rows.append(measure(f"vae:{path.stem}", step, info, args.steps, matmul_rate()))
    for path in args.dit_config:
        step, info = dit_step_factory(path, args.dit_tokens, args.text_tokens)
        rows.append(measure(f"dit:{path.stem}", step, info, args.steps, matmul_rate()))

    print(
        f"threads {args.threads}; ratio = step FLOP/s over the best fp32 matmul FLOP/s measured just before it"
    )
    header = f"{'step':<22}{'batch':>6}{'tokens':>7}{'GFLOP':>9}{'s/step':>8}{'GFLOP/s':>9}{'matmul':>8}{'ratio':>7}"
    print(header)
    for row in rows:
        print(
            f"{row['name']:<22}{row['batch']:>6}{row['tokens']:>7}{row['gflop_per_step']:>9.1f}"
            f"{row['seconds_per_step']:>8.3f}{row['achieved_gflops']:>9.1f}{row['matmul_gflops']:>8.1f}"
            f"{row['fraction_of_matmul']:>7.2f}"
        )
    print(json.dumps({"threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

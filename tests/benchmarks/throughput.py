"""Shared by bench_vae_loading.py and bench_train_throughput.py: FLOP counts of one training step (VAE / DiT),
bf16 peaks of common accelerators, and the largest-batch binary search.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; elementwise work such as
FPS, norms and the optimizer is not counted, as usual for MFU). They can be counted on the meta device: no memory
and no arithmetic, so the full ``dora_v1_1`` step at 4096 tokens is counted in seconds on a CPU. Gradient
checkpointing is off while counting, so the figure is model FLOPs (MFU), not hardware FLOPs (recompute included).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 dense (no sparsity)
# bf16 dense peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(); first match wins.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("4090", 165.0),
    ("3090", 71.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args: Any, **kwargs: Any
) -> int:
    # Model FLOPs: twice the forward (the gradients of Q, K, V), as the meta device's decomposed attention counts;
    # the kernel's recompute of the scores is hardware work, not model work.
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch has FLOP formulas for the CUDA attention kernels only: without these, attention on real CPU tensors
# counts as zero (the meta device decomposes it into counted matmuls instead).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of everything ``step`` runs (forward and backward if it calls backward), attention included on any
    device."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        step()
    return int(counter.get_total_flops())


def build_vae(
    model_config: dict[str, Any], device: str | torch.device = "cpu", gradient_checkpointing: bool = False
):
    from dora_shapegen.vae.modeling_dora_vae import DoraVAE

    values = {**model_config, "gradient_checkpointing": gradient_checkpointing}
    with torch.device(device):
        model = DoraVAE(**values)
    if torch.device(device).type == "meta":
        # The input check reads tensor values (isfinite(...).all() -> bool), which a meta tensor has none of;
        # skipping it on this one counting instance changes no FLOP.
        model._to_model = types.MethodType(lambda self, value, name: value, model)
    return model


def vae_batch(
    batch: int, n_uniform: int, n_salient: int, n_query: int, device: Any
) -> dict[str, torch.Tensor]:
    """A random batch shaped like the training loader's (points in [-1, 1], unit normals); meta tensors on meta."""

    def cloud(count: int) -> torch.Tensor:
        normals = torch.nn.functional.normalize(
            torch.randn(batch, count, 3, device=device), dim=-1
        )  # (B, N, 3)
        return torch.cat([torch.rand(batch, count, 3, device=device) * 2 - 1, normals], dim=-1)  # (B, N, 6)

    return {
        "uniform": cloud(n_uniform),
        "salient": cloud(n_salient),
        "query": torch.rand(batch, n_query, 3, device=device) * 2 - 1,  # (B, M, 3)
        "target": torch.zeros(batch, n_query, device=device),  # (B, M) TSDF target
    }


def vae_step(
    model: Any, batch: dict[str, torch.Tensor], tokens: int, kl_weight: float = 1e-3
) -> torch.Tensor:
    """One training forward + backward (TSDF MSE + KL, the dora_v1_1 objective up to group weights)."""
    out = model(
        uniform=batch["uniform"],
        salient=batch["salient"],
        query_points=batch["query"],
        num_tokens=tokens,
        sample_posterior=batch["uniform"].device.type != "meta",
    )
    loss = (
        torch.nn.functional.mse_loss(out["raw"].float(), batch["target"])
        + kl_weight * out["kl"].float().mean()
    )
    loss.backward()
    return loss.detach()


def vae_step_flops(
    model_config: dict[str, Any],
    tokens: int,
    n_uniform: int,
    n_salient: int,
    n_query: int,
    batch: int = 1,
    device: str = "meta",
) -> int:
    model = build_vae(model_config, device)
    data = vae_batch(batch, n_uniform, n_salient, n_query, device)
    return count_flops(lambda: vae_step(model, data, tokens))


def build_dit(model_config: dict[str, Any], device: str | torch.device = "cpu"):
    from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT

    with torch.device(device):
        return ShapeDiT(**model_config)


def dit_batch(
    model_config: dict[str, Any], batch: int, tokens: int, text_tokens: int, device: Any
) -> dict[str, Any]:
    make = torch.randn
    channels = model_config.get("in_channels", 64)
    pooled = model_config.get("pooled_projection_dim", 384)
    return {
        "latents": make(batch, tokens, channels, device=device),  # (B, N, C)
        "timesteps": torch.full((batch,), 500.0, device=device),  # (B,)
        "text": make(
            batch, text_tokens, model_config.get("cross_attention_dim", 384), device=device
        ),  # (B, L, D)
        "mask": torch.ones(batch, text_tokens, dtype=torch.bool, device=device),  # (B, L)
        "pooled": None if pooled is None else make(batch, pooled, device=device),  # (B, P)
    }


def dit_step(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """One flow-matching forward + backward (MSE to a velocity target)."""
    prediction = model(
        batch["latents"],
        batch["timesteps"],
        batch["text"],
        encoder_attention_mask=batch["mask"],
        pooled_projections=batch["pooled"],
        return_dict=False,
    )[0]  # (B, N, C)
    loss = (prediction.float() - batch["latents"].float()).pow(2).mean()
    loss.backward()
    return loss.detach()


def dit_step_flops(
    model_config: dict[str, Any], tokens: int, text_tokens: int = 77, batch: int = 1, device: str = "meta"
) -> int:
    model = build_dit(model_config, device)
    data = dit_batch(model_config, batch, tokens, text_tokens, device)
    return count_flops(lambda: dit_step(model, data))


def largest_batch(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """Largest b in [1, limit] with ``fits(b)``, assuming fitting is monotone (a larger batch never fits when a
    smaller one does not): doubling to bracket it, then bisection. 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # fits(low) is True; high does not fit or lies past the limit
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low

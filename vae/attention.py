"""Building blocks of the Dora VAE: the Fourier point embedder and pre-LN attention blocks (SDPA).

The layouts follow the released Dora-VAE v1.1 so its weights convert without any arithmetic beyond splitting the
fused projections (see ``vae/convert_dora.py``): Fourier features are ``[xyz, sin(24), cos(24)]`` with the 24
arguments coordinate-major and frequencies ``2^0..2^7`` (no pi); attention is plain multi-head SDPA without any
positional encoding (latent tokens are an unordered set); blocks are pre-LN with an exact-GELU MLP.

Q, K and V have separate projections (``to_q``/``to_k``/``to_v``) in self- and cross-attention alike. The
official checkpoint fuses them per head (interleaved), so a separate layout makes the conversion a plain
de-interleave and keeps one code path for both attention kinds.

This is the Dora path only; our distance-aware variant (``local_attention: true``) lives in
``vae/local_attention.py`` and subclasses the attention and cross-attention classes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class FourierEmbedder(nn.Module):
    """xyz -> ``[xyz, sin(x*f, y*f, z*f), cos(...)]`` with ``f = 2^0..2^(num_freqs-1)`` (optionally times pi).

    The sin/cos arguments are coordinate-major (x*f0..x*f7, y*f0..y*f7, z*f0..z*f7), sines first then cosines,
    as in Dora/Michelangelo, so converted weights see the features in the order they were trained on.
    """

    def __init__(self, num_freqs: int = 8, include_input: bool = True, include_pi: bool = False) -> None:
        super().__init__()
        frequencies = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        if include_pi:
            frequencies = frequencies * torch.pi
        # Not persistent: it is derived from the config, and the official checkpoint does not store it either.
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.include_input = include_input
        self.num_freqs = num_freqs

    def output_dim(self, input_dim: int = 3) -> int:
        return input_dim * (2 * self.num_freqs + int(self.include_input))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        # (..., D, F) -> (..., D*F): coordinate-major flattening.
        arguments = (points[..., None] * self.frequencies.to(points.dtype)).flatten(-2)
        parts = [points] if self.include_input else []
        return torch.cat([*parts, arguments.sin(), arguments.cos()], dim=-1)  # (..., D*(2F+1))


class MultiHeadAttention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``; self-attention when ``context`` is None.

    ``qk_norm`` adds an RMSNorm over each head's query and key channels (stabilises long-sequence training at
    scale); it is off by default because Dora has none, and converted weights need it off.
    """

    def __init__(self, width: int, heads: int, qkv_bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention width {width} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.to_q = nn.Linear(width, width, bias=qkv_bias)
        self.to_k = nn.Linear(width, width, bias=qkv_bias)
        self.to_v = nn.Linear(width, width, bias=qkv_bias)
        self.to_out = nn.Linear(width, width)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b l (h d) -> b h l d", h=self.heads)  # (B, H, L, D)

    def _project(
        self, x: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head query (B, H, Nq, D), key and value (B, H, Nk, D), QK-normalised when configured."""
        context = x if context is None else context
        query = self._split_heads(self.to_q(x))  # (B, H, Nq, D)
        key = self._split_heads(self.to_k(context))  # (B, H, Nk, D)
        value = self._split_heads(self.to_v(context))  # (B, H, Nk, D)
        if self.norm_q is not None:
            query, key = self.norm_q(query), self.norm_k(key)
        return query, key, value

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        query, key, value = self._project(x, context)
        # No mask and no positional term: the output is equivariant to permutations of x and invariant to
        # permutations of context, which is what makes the latent set order-free.
        out = F.scaled_dot_product_attention(query, key, value)  # (B, H, Nq, D)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, Nq, H*D), head-major channels
        return self.to_out(out)


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear (Dora uses the erf GELU, not the tanh approximation)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = MultiHeadAttention(width, heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.norm_mlp = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = FeedForward(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))  # (B, N, W)
        return x + self.mlp(self.norm_mlp(x))  # (B, N, W)


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention block: ``x + attn(norm_query(x), norm_context(context))`` then the MLP.

    The block keeps its own residual, so summing two of them on the same queries (Dora's dual cross-attention)
    counts the queries twice; ``DoraVAE`` reproduces that on purpose to stay weight-compatible. ``attention``
    replaces the plain :class:`MultiHeadAttention` (``vae/local_attention.py`` passes its own).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        attention: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(width, eps=layer_norm_eps)
        self.norm_context = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = (
            attention if attention is not None else MultiHeadAttention(width, heads, qkv_bias, qk_norm)
        )
        self.norm_mlp = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = FeedForward(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_query(x), self.norm_context(context))  # (B, Nq, W)
        return x + self.mlp(self.norm_mlp(x))  # (B, Nq, W)

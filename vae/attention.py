"""Building blocks of the Dora VAE: the Fourier point embedder and pre-LN attention blocks (SDPA).

The layouts follow the released Dora-VAE v1.1 so its weights convert without any arithmetic beyond splitting the
fused projections (see ``vae/convert_dora.py``): Fourier features are ``[xyz, sin(24), cos(24)]`` with the 24
arguments coordinate-major and frequencies ``2^0..2^7`` (no pi); attention is plain multi-head SDPA without any
positional encoding (latent tokens are an unordered set); blocks are pre-LN with an exact-GELU MLP.

Q, K and V have separate projections (``to_q``/``to_k``/``to_v``) in self- and cross-attention alike. The
official checkpoint fuses them per head (interleaved), so a separate layout makes the conversion a plain
de-interleave and keeps one code path for both attention kinds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Per head, from local attention: offset to the attended point (3), attended normal (3), IMLS signed distance (1).
GEOMETRY_FEATURES = 7


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

    ``locality_sigmas`` (one length per head, or None) adds a learnable distance term ``-|q_pos - k_pos|^2 / sigma_h^2``
    to each head's logits when the caller passes positions: a query then looks at nearby keys from the first step
    instead of having to learn locality from Fourier features; the geometry each head attended to (offset, normal,
    a moving-least-squares signed distance) is projected back into the output. Off by default (Dora has none).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        locality_sigmas: Sequence[float] | None = None,
    ) -> None:
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
        self.log_locality = None
        if locality_sigmas is not None:
            if len(locality_sigmas) != heads or min(locality_sigmas) <= 0:
                raise ValueError(f"locality_sigmas needs {heads} positive lengths (one per head), got {locality_sigmas}")
            inverse_variance = torch.tensor([1.0 / float(sigma) ** 2 for sigma in locality_sigmas])
            self.log_locality = nn.Parameter(inverse_variance.log())  # (H,)
            # Each head also reports the geometry it looked at (see _local_attention), projected into the output.
            self.geometry_proj = nn.Linear(GEOMETRY_FEATURES * heads, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def _local_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        key_normals: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention with a per-head distance term, plus the geometry each head attended to. (B, Nq, W).

        The term ``-s_h |q_pos - k_pos|^2`` is folded into the dot product by appending channels, so SDPA stays one
        fused call: ``[q/sqrt(D), 2 s q_pos, -s] . [k, k_pos, |k_pos|^2] = q.k/sqrt(D) - s|q_pos - k_pos|^2 + s|q_pos|^2``,
        and the last term is the same for every key, which softmax ignores. The values get the same number of
        extra channels (the fused CPU kernel needs equal head sizes; unequal ones fall back to the math path, ~3x
        slower): key position p, normal n and p.n. Their weighted means give, per head, the query's offset from
        the attended point and an implicit-moving-least-squares signed distance ``q.n_mean - (p.n)_mean`` (Kolluri,
        2005): a direct inside/outside cue that plain attention has to learn slowly. Runs in fp32: the folded
        terms are large and cancel, which bf16 inputs would not survive.
        """
        heads, dim = self.heads, self.head_dim
        strength = self.log_locality.exp().view(1, heads, 1, 1)  # (1, H, 1, 1)
        q_pos = query_positions.float()[:, None].expand(-1, heads, -1, -1)  # (B, H, Nq, 3)
        k_pos = key_positions.float()[:, None].expand(-1, heads, -1, -1)  # (B, H, Nk, 3)
        k_normal = torch.zeros_like(k_pos) if key_normals is None else key_normals.float()[:, None].expand_as(k_pos)
        q_zeros, k_zeros = q_pos.new_zeros(*q_pos.shape[:3], 4), k_pos.new_zeros(*k_pos.shape[:3], 4)
        query = torch.cat([query.float() / math.sqrt(dim), 2 * strength * q_pos, -strength.expand_as(q_pos[..., :1]),
                           q_zeros], dim=-1)  # (B, H, Nq, D + 8)
        key = torch.cat([key.float(), k_pos, k_pos.pow(2).sum(-1, keepdim=True), k_zeros], dim=-1)  # (B, H, Nk, D + 8)
        plane = (k_pos * k_normal).sum(-1, keepdim=True)  # (B, H, Nk, 1)
        value = torch.cat([value.float(), k_pos, k_normal, plane, k_zeros[..., :1]], dim=-1)  # (B, H, Nk, D + 8)
        attended = F.scaled_dot_product_attention(query, key, value, scale=1.0)  # (B, H, Nq, D + 8)
        mean_pos, mean_normal = attended[..., dim:dim + 3], attended[..., dim + 3:dim + 6]  # (B, H, Nq, 3) each
        sigma = self.log_locality.mul(-0.5).exp().view(1, heads, 1, 1)  # (1, H, 1, 1)
        offset = (q_pos - mean_pos) / sigma  # (B, H, Nq, 3)
        distance = ((q_pos * mean_normal).sum(-1, keepdim=True) - attended[..., dim + 6:dim + 7]) / sigma  # (B, H, Nq, 1)
        geometry = torch.cat([offset, mean_normal, distance], dim=-1)  # (B, H, Nq, GEOMETRY_FEATURES)
        dtype = self.to_out.weight.dtype
        out = attended[..., :dim].to(dtype).transpose(1, 2).flatten(2)  # (B, Nq, H*D)
        return self.to_out(out) + self.geometry_proj(geometry.to(dtype).transpose(1, 2).flatten(2))  # (B, Nq, W)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        key_normals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        query = self._split_heads(self.to_q(x))  # (B, H, Nq, D)
        key = self._split_heads(self.to_k(context))  # (B, H, Nk, D)
        value = self._split_heads(self.to_v(context))  # (B, H, Nk, D)
        if self.norm_q is not None:
            query, key = self.norm_q(query), self.norm_k(key)
        # No mask and no positional term: the output is equivariant to permutations of x and invariant to
        # permutations of context, which is what makes the latent set order-free.
        if self.log_locality is not None and query_positions is not None and key_positions is not None:
            return self._local_attention(query, key, value, query_positions, key_positions, key_normals)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, H, Nq, D)
        out = out.transpose(1, 2).flatten(2)  # (B, Nq, H*D), head-major channels
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
    counts the queries twice; ``DoraVAE`` reproduces that on purpose to stay weight-compatible.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        locality_sigmas: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(width, eps=layer_norm_eps)
        self.norm_context = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = MultiHeadAttention(width, heads, qkv_bias=qkv_bias, qk_norm=qk_norm, locality_sigmas=locality_sigmas)
        self.norm_mlp = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = FeedForward(width, int(width * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        query_positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        key_normals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_query(x), self.norm_context(context), query_positions, key_positions,
                          key_normals)  # (B, Nq, W)
        return x + self.mlp(self.norm_mlp(x))  # (B, Nq, W)

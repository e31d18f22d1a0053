"""Local attention: our distance-aware cross-attention for the Dora VAE (not part of Dora), plugged in by config.

With ``local_attention: true`` every cross-attention head of ``DoraVAE`` gets a learnable distance term
``-|q_pos - k_pos|^2 / sigma_h^2`` (sigma from 0.04 to 0.5 across heads by default): a query then looks at nearby
keys from the first step instead of having to learn locality from Fourier features. Encoder queries sit at their
FPS points; decoder keys sit at the position and normal each decoded token predicts from its own content (the
``anchor_head``, trained to match the token's FPS point), so the latents stay an unordered set with no positional
encoding. Each head also returns the geometry it attended to (offset, normal, an implicit-moving-least-squares
signed distance), projected into its output.

``DoraVAE`` touches this module only where ``config.local_attention`` is set: :func:`cross_attention_block` for
its cross-attention blocks, :func:`anchor_head`, :func:`encoder_geometry` / :func:`decoder_geometry` for the
positions the blocks take, and :func:`anchor_loss` in the training pass. Parameter names (``attn.log_locality``,
``attn.geometry_proj``, ``anchor_head``) are those saved checkpoints carry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dora_shapegen.vae.attention import CrossAttentionBlock, MultiHeadAttention

# Per head, from local attention: offset to the attended point (3), attended normal (3), IMLS signed distance (1).
GEOMETRY_FEATURES = 7


def default_locality_sigmas(heads: int) -> list[float]:
    """One length per head, geometric from fine (0.04) to coarse (0.5); 0.1 for a single head."""
    return np.geomspace(0.04, 0.5, heads).tolist() if heads > 1 else [0.1]


class LocalMultiHeadAttention(MultiHeadAttention):
    """:class:`MultiHeadAttention` with a learnable per-head distance term when the caller passes positions
    (without positions it is the plain attention), and the geometry each head attended to added to the output."""

    def __init__(
        self,
        width: int,
        heads: int,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        locality_sigmas: Sequence[float] = (0.1,),
    ) -> None:
        super().__init__(width, heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        if len(locality_sigmas) != heads or min(locality_sigmas) <= 0:
            raise ValueError(
                f"locality_sigmas needs {heads} positive lengths (one per head), got {locality_sigmas}"
            )
        inverse_variance = torch.tensor([1.0 / float(sigma) ** 2 for sigma in locality_sigmas])
        self.log_locality = nn.Parameter(inverse_variance.log())  # (H,)
        # Each head also reports the geometry it looked at (see _local_attention), projected into the output.
        self.geometry_proj = nn.Linear(GEOMETRY_FEATURES * heads, width)

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
        k_normal = (
            torch.zeros_like(k_pos) if key_normals is None else key_normals.float()[:, None].expand_as(k_pos)
        )
        q_zeros, k_zeros = q_pos.new_zeros(*q_pos.shape[:3], 4), k_pos.new_zeros(*k_pos.shape[:3], 4)
        query = torch.cat(
            [
                query.float() / math.sqrt(dim),
                2 * strength * q_pos,
                -strength.expand_as(q_pos[..., :1]),
                q_zeros,
            ],
            dim=-1,
        )  # (B, H, Nq, D + 8)
        key = torch.cat(
            [key.float(), k_pos, k_pos.pow(2).sum(-1, keepdim=True), k_zeros], dim=-1
        )  # (B, H, Nk, D + 8)
        plane = (k_pos * k_normal).sum(-1, keepdim=True)  # (B, H, Nk, 1)
        value = torch.cat(
            [value.float(), k_pos, k_normal, plane, k_zeros[..., :1]], dim=-1
        )  # (B, H, Nk, D + 8)
        attended = F.scaled_dot_product_attention(query, key, value, scale=1.0)  # (B, H, Nq, D + 8)
        mean_pos, mean_normal = (
            attended[..., dim : dim + 3],
            attended[..., dim + 3 : dim + 6],
        )  # (B, H, Nq, 3) each
        sigma = self.log_locality.mul(-0.5).exp().view(1, heads, 1, 1)  # (1, H, 1, 1)
        offset = (q_pos - mean_pos) / sigma  # (B, H, Nq, 3)
        distance = (
            (q_pos * mean_normal).sum(-1, keepdim=True) - attended[..., dim + 6 : dim + 7]
        ) / sigma  # (B, H, Nq, 1)
        geometry = torch.cat([offset, mean_normal, distance], dim=-1)  # (B, H, Nq, GEOMETRY_FEATURES)
        dtype = self.to_out.weight.dtype
        out = rearrange(attended[..., :dim].to(dtype), "b h n d -> b n (h d)")  # (B, Nq, H*D)
        geometry = rearrange(geometry.to(dtype), "b h n g -> b n (h g)")  # (B, Nq, H*GEOMETRY_FEATURES)
        return self.to_out(out) + self.geometry_proj(geometry)  # (B, Nq, W)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        key_normals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if query_positions is None or key_positions is None:
            return super().forward(x, context)
        query, key, value = self._project(x, context)  # (B, H, Nq, D), (B, H, Nk, D) x 2
        return self._local_attention(
            query, key, value, query_positions, key_positions, key_normals
        )  # (B, Nq, W)


class LocalCrossAttentionBlock(CrossAttentionBlock):
    """:class:`CrossAttentionBlock` around :class:`LocalMultiHeadAttention`; forward also takes query positions
    (B, Nq, 3), key positions (B, Nk, 3) and key normals (B, Nk, 3) or None."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        locality_sigmas: Sequence[float] = (0.1,),
    ) -> None:
        attention = LocalMultiHeadAttention(
            width, heads, qkv_bias=qkv_bias, qk_norm=qk_norm, locality_sigmas=locality_sigmas
        )
        super().__init__(
            width,
            heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            layer_norm_eps=layer_norm_eps,
            attention=attention,
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        query_positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        key_normals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(
            self.norm_query(x), self.norm_context(context), query_positions, key_positions, key_normals
        )  # (B, Nq, W)
        return x + self.mlp(self.norm_mlp(x))  # (B, Nq, W)


def cross_attention_block(
    heads: int, locality_sigmas: Sequence[float] | None
) -> Callable[..., LocalCrossAttentionBlock]:
    """The block constructor ``DoraVAE`` uses instead of ``CrossAttentionBlock`` (same arguments)."""
    sigmas = default_locality_sigmas(heads) if locality_sigmas is None else locality_sigmas
    return functools.partial(LocalCrossAttentionBlock, locality_sigmas=[float(sigma) for sigma in sigmas])


def anchor_head(width: int) -> nn.Linear:
    """Where each decoded token sits and which way the surface faces there: xyz + normal (6) from its content."""
    return nn.Linear(width, 6)


def encoder_geometry(
    query_xyz: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query positions (B, N, 3), key positions (B, Nk, 3), key normals (B, Nk, 3) or None) for an encoder
    cross-attention whose keys are the points (B, Nk, 3 or 6) of one stream."""
    return query_xyz, points[..., :3], points[..., 3:6] if points.shape[-1] >= 6 else None


def decoder_geometry(
    query_points: torch.Tensor, anchors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query positions (B, M, 3), key positions (B, N, 3), key normals (B, N, 3)) for the query decoder, the
    keys at the anchors (B, N, 6) the decoded tokens predict."""
    return query_points, anchors[..., :3], anchors[..., 3:]


def anchor_loss(anchors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,) squared error of each token's predicted xyz + normal (B, N, 6) against its FPS point's (B, N, 6), or
    xyz alone for inputs without normals; mean over tokens."""
    known = min(anchors.shape[-1], positions.shape[-1])
    return (anchors[..., :known] - positions[..., :known]).pow(2).sum(-1).mean(-1)  # (B,)

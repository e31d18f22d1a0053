"""Building blocks of ShapeDiT (``diffusion/modeling_shape_dit.py``): multi-head attention with RMS QK-norm, and
the PixArt-style block (modulated self-attention, cross-attention to the conditioning, modulated MLP) with an
optional U-ViT long skip.

The model itself (adaLN-single, the conditioning inputs, the skip wiring) is in ``modeling_shape_dit.py``; these
are its per-block parts, kept apart as ``vae/attention.py`` keeps the Dora VAE's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention through SDPA with RMS QK-norm; self-attention when ``context_dim`` is None.

    Written here rather than using ``diffusers.models.attention_processor.Attention`` because we want
    ``torch.nn.RMSNorm`` QK-norm over the head dimension and a plain boolean SDPA mask, in ~30 readable lines.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        context_dim: int | None = None,
        qk_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.dropout = dropout
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(context_dim or width, width)
        self.to_v = nn.Linear(context_dim or width, width)
        self.to_out = nn.Linear(width, width)
        # QK-norm keeps attention logits bounded as weights grow (SD3, Hunyuan3D-2.1, TripoSG all use it).
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = hidden_states if context is None else context
        heads = self.num_heads
        query = self.norm_q(rearrange(self.to_q(hidden_states), "b n (h d) -> b h n d", h=heads))  # (B,H,N,d)
        key = self.norm_k(rearrange(self.to_k(context), "b l (h d) -> b h l d", h=heads))  # (B,H,L,d)
        value = rearrange(self.to_v(context), "b l (h d) -> b h l d", h=heads)  # (B,H,L,d)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p
        )  # (B,H,N,d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (B,N,W)


class ShapeDiTBlock(nn.Module):
    """[long skip] -> modulated self-attention -> cross-attention to text -> modulated MLP (PixArt block layout)."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float,
        cross_attention_dim: int,
        qk_norm: bool,
        dropout: float,
        long_skip: bool,
    ) -> None:
        super().__init__()
        # U-ViT long skip (Hunyuan3D-2.1 / TripoSG): concat the mirrored first-half output, project back to width.
        self.skip_linear = nn.Linear(2 * width, width) if long_skip else None
        self.skip_norm = nn.LayerNorm(width, eps=1e-6) if long_skip else None
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(width, num_heads, qk_norm=qk_norm, dropout=dropout)
        # Cross-attention is not modulated (as in PixArt): text conditioning must not depend on adaLN's state.
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross_attn = Attention(width, num_heads, cross_attention_dim, qk_norm=qk_norm, dropout=dropout)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
        )
        # Per-block part of adaLN-single: rows = shift/scale/gate (attention), shift/scale/gate (MLP).
        self.scale_shift_table = nn.Parameter(torch.randn(6, width) / width**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        modulation: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        context_gate: torch.Tensor | None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            merged = torch.cat([hidden_states, skip], dim=-1)  # (B,N,2W)
            hidden_states = self.skip_norm(self.skip_linear(merged))  # (B,N,W)
        batch_size, _, width = hidden_states.shape
        table = self.scale_shift_table[None] + modulation.view(batch_size, 6, width)  # (B,6,W)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table[:, :, None].unbind(
            1
        )  # (B,1,W)

        attn_in = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa  # (B,N,W)
        hidden_states = hidden_states + gate_msa * self.self_attn(attn_in)
        text = self.cross_attn(self.norm2(hidden_states), context, context_mask)  # (B,N,W)
        if context_gate is not None:
            text = text * context_gate  # rows without any valid text token get no text contribution
        hidden_states = hidden_states + text
        mlp_in = self.norm3(hidden_states) * (1 + scale_mlp) + shift_mlp  # (B,N,W)
        return hidden_states + gate_mlp * self.mlp(mlp_in)

"""RenderEncoder: a small CNN image encoder trained together with the DiT: the offline CPU image conditioner.

Why a CNN trained from scratch: nothing may be downloaded here, so a pretrained DINOv2 is not available on a fresh
clone, and a randomly initialised ViT learns slowly from a few hundred renders. Convolutions carry the locality
prior that makes a small encoder useful after a few hundred steps. It is trained end to end with the DiT's flow
matching loss (its gradients come through cross-attention), so it learns exactly the features the denoiser reads.
For real runs use the frozen DINOv2 (``diffusion/image_encoder.py``), as Hunyuan3D-2.1 and TRELLIS do.

Layout: a stride-2 stem, then one stride-2 stage per entry of ``channels`` (a strided conv and a residual block,
GroupNorm + SiLU), so an image of ``image_size`` px becomes a ``(image_size / 2^(len(channels)+1))^2`` grid;
a 1x1 projection to ``hidden_size``, a fixed 2D sine-cosine position code (cross-attention has no other way to
know where a token sits), LayerNorm. Output: the grid's tokens (B, L, D) for cross-attention and their mean as the
pooled vector (B, D) -- the same (tokens, mask, pooled) triple the text encoder gives.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn


def sincos_position_code(height: int, width: int, dim: int) -> torch.Tensor:
    """(H*W, dim) fixed 2D sine-cosine code (MAE / ViT): half the channels for rows, half for columns."""
    if dim % 4 != 0:
        raise ValueError(f"the position code needs a channel count divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )  # (H, W) each
    angles_r = rows.reshape(-1, 1) * frequencies  # (H*W, dim/4)
    angles_c = cols.reshape(-1, 1) * frequencies  # (H*W, dim/4)
    code = torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)  # (H*W, dim)
    return code.float()


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (pre-activation ResNet block)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.body(features)  # (B, C, H, W)


class RenderEncoder(ModelMixin, ConfigMixin):
    """Small CNN: (B, 3, S, S) images normalised to [-1, 1] -> tokens (B, L, D) and a pooled vector (B, D).

    Args:
        image_size: input size S in px (square); must divide by 2^(len(channels) + 1).
        channels: feature channels of the stages after the stem; each halves the resolution.
        stem_channels: channels of the stride-2 stem.
        hidden_size: D of the output tokens and the pooled vector (the DiT's cross_attention_dim).
        groups: GroupNorm groups (must divide every channel count).
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 128,
        channels: tuple[int, ...] = (32, 64, 128),
        stem_channels: int = 16,
        hidden_size: int = 128,
        groups: int = 8,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        stride = 2 ** (len(channels) + 1)
        if image_size % stride != 0:
            raise ValueError(
                f"RenderEncoder: image_size={image_size} must be divisible by {stride} (2^(stages + 1))"
            )
        if any(c % groups for c in (stem_channels, *channels)):
            raise ValueError(f"RenderEncoder: groups={groups} must divide every channel count {channels}")
        self.grid = image_size // stride
        self.stem = nn.Conv2d(3, stem_channels, 3, stride=2, padding=1)
        stages = []
        previous = stem_channels
        for width in channels:
            stages += [
                nn.GroupNorm(groups, previous),
                nn.SiLU(),
                nn.Conv2d(previous, width, 3, stride=2, padding=1),
                ResidualBlock(width, groups),
            ]
            previous = width
        self.stages = nn.Sequential(*stages)
        self.norm_features = nn.GroupNorm(groups, previous)
        self.proj = nn.Conv2d(previous, hidden_size, 1)
        self.register_buffer(
            "position_code", sincos_position_code(self.grid, self.grid, hidden_size), persistent=False
        )  # (L, D)
        self.norm_out = nn.LayerNorm(hidden_size)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (tokens (B, L, D), pooled (B, D))."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"RenderEncoder: pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        features = self.stages(self.stem(pixel_values))  # (B, C, g, g)
        features = self.proj(torch.nn.functional.silu(self.norm_features(features)))  # (B, D, g, g)
        tokens = rearrange(features, "b d h w -> b (h w) d") + self.position_code.to(
            features.dtype
        )  # (B, L, D)
        tokens = self.norm_out(tokens)  # (B, L, D)
        pooled = tokens.mean(dim=1)  # (B, D)
        return tokens, pooled

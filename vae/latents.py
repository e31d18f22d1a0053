"""The latent side of DoraVAE: the token posterior, the FPS interleaving of the two streams, and decoded latents
as a queryable field. Kept apart from ``modeling_dora_vae.py`` so the model file holds the network alone; the model
imports this module and never the reverse (:class:`DecodedLatents` sees the model only through :class:`TokenQuery`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class LatentPosterior:
    """Diagonal Gaussian over latent tokens. diffusers' DiagonalGaussianDistribution assumes channel-first
    image tensors (B, 2C, H, W), so this token-last (B, N, C) version is written out here."""

    mean: torch.Tensor  # (B, N, C)
    logvar: torch.Tensor  # (B, N, C), already clamped to [-30, 20]
    positions: torch.Tensor | None = (
        None  # (B, N, 6): xyz + normal of the FPS point each token was taken from
    )

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn_tensor(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise  # (B, N, C)

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per shape (B,), averaged over tokens and channels so it does not grow with the token
        count (training mixes token counts)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean(dim=(1, 2))


def interleave_order(num_uniform: int, num_salient: int) -> torch.Tensor:
    """Permutation of ``[uniform tokens ; salient tokens]`` merging the two FPS sequences proportionally.

    Token i of a stream with k tokens gets the key (i + 0.5) / k; sorting by key (uniform first on ties) makes
    every prefix hold about the same uniform:salient ratio as the whole set, each stream in its own FPS order.
    """
    keys = torch.cat(
        [
            (torch.arange(num_uniform, dtype=torch.float64) + 0.5) / max(num_uniform, 1),
            (torch.arange(num_salient, dtype=torch.float64) + 0.5) / max(num_salient, 1),
        ]
    )
    return torch.argsort(keys, stable=True)


def stream_array(point_cloud: Any, stream: str) -> np.ndarray:
    """(N, 6) xyz+normal of one stream of a PointCloud-like object (duck-typed to keep data and vae decoupled)."""
    points, normals = (
        getattr(point_cloud, f"{stream}_points", None),
        getattr(point_cloud, f"{stream}_normals", None),
    )
    if points is None or normals is None:
        raise ValueError(
            f"point cloud has no {stream}_points/{stream}_normals (got {type(point_cloud).__name__})"
        )
    return np.concatenate([np.asarray(points, np.float32), np.asarray(normals, np.float32)], axis=-1)


class TokenQuery(Protocol):
    """What :class:`DecodedLatents` needs of a model (``DoraVAE`` provides it): values (B, M) of decoded tokens
    (B, N, W) at query points."""

    def _query_tokens(
        self,
        tokens: torch.Tensor,
        query_points: Any,
        output: str = "occupancy",
        chunk_size: int | None = None,
    ) -> torch.Tensor: ...


class DecodedLatents:
    """Decoded latent tokens as a field: call with query points (M, 3) or (B, M, 3) to get (B, M) values in
    [0, 1] where 0.5 is the surface and > 0.5 is inside. Queries run in chunks to bound memory, without
    gradients (this object is meant for mesh extraction and evaluation)."""

    def __init__(self, model: TokenQuery, tokens: torch.Tensor, chunk_size: int | None = None) -> None:
        self.model = model
        self.tokens = tokens  # (B, N, W)
        self.chunk_size = chunk_size

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def __call__(self, query_points: torch.Tensor | np.ndarray, output: str = "occupancy") -> torch.Tensor:
        with torch.no_grad():
            return self.model._query_tokens(self.tokens, query_points, output, self.chunk_size)  # (B, M)

    def field(self, index: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
        """The field of shape ``index`` alone: (M, 3) -> (M,), the signature mesh extraction expects. Only that
        shape's tokens are queried, so meshing a batch item by item costs B single-shape evaluations."""
        single = DecodedLatents(self.model, self.tokens[index : index + 1], self.chunk_size)
        return lambda query_points: single(query_points)[0]

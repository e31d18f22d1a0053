"""DoraVAE: a vecset shape VAE with dual cross-attention (Dora), or the uniform-only 3DShape2VecSet baseline.

Encoder: Fourier(xyz) ++ normals -> one input projection per stream (uniform surface samples, salient/sharp-edge
samples). The query tokens are farthest-point-sampled points of each stream, taken from the projected features.
They attend to the whole uniform stream and to the whole salient stream in two cross-attention blocks whose
outputs are summed, then pass self-attention layers, a LayerNorm and the KL bottleneck (mean/logvar per token).
Decoder: a projection back to the width, self-attention layers over the tokens, and a query decoder that embeds
query xyz, cross-attends into the tokens and predicts one value per point (occupancy logit or TSDF).

Latent tokens carry no positional encoding: they are an unordered set, so the model accepts any number of them,
including more than it was trained with. Token ORDER is still meaningful to the user: each stream's queries are
in FPS order and the two streams are interleaved proportionally, so ``latents[:, :k]`` is a coarse cover of the
shape for any ``k`` (a cheap low-resolution code). The default sizes are those of the released Dora-VAE v1.1.

``local_attention: true`` (off in Dora) swaps in our distance-aware cross-attention from
``vae/local_attention.py``; every place it plugs in is marked ``# local attention``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dora_shapegen.vae import local_attention as local
from dora_shapegen.vae.attention import CrossAttentionBlock, FourierEmbedder, SelfAttentionBlock
from dora_shapegen.vae.fps import farthest_point_indices
from dora_shapegen.vae.latents import DecodedLatents, LatentPosterior, interleave_order, stream_array

__all__ = ["DecodedLatents", "DoraVAE", "LatentPosterior", "interleave_order"]

OUTPUT_TYPES = ("occupancy", "tsdf")


class DoraVAE(ModelMixin, ConfigMixin):
    """Dora shape VAE. ``use_salient=False`` gives the 3DShape2VecSet-style baseline (uniform points only, one
    cross-attention) with the same code.

    Config args: width, heads, num_encoder_layers (self-attention layers after the cross-attention),
    num_decoder_layers, latent_channels, mlp_ratio, num_freqs / include_pi (Fourier features), point_feature_dim
    (3 = normals), use_salient, salient_token_fraction (share of tokens taken from the salient stream),
    qkv_bias, qk_norm, qk_norm_scale (the attention logits' initial scale with qk-norm), layer_norm_eps,
    output_type ("occupancy" logits or "tsdf"), default_num_tokens,
    max_train_tokens, num_query_layers (query cross-attention blocks; Dora has 1), local_attention /
    locality_sigmas (distance-aware cross-attention, see local_attention.py; off in Dora) / local_decoder
    (False: in the encoder only, the query decoder stays plain), the preprocessing the weights were trained
    with: epsilon, tsdf_truncation, n_uniform, n_salient, and sample_posterior (what
    :meth:`encode` does by default: the posterior mean, or a sample as the official Dora test config does, which
    converted weights follow). gradient_checkpointing switches activation checkpointing on for every block.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        width: int = 768,
        heads: int = 12,
        num_encoder_layers: int = 8,
        num_decoder_layers: int = 16,
        latent_channels: int = 64,
        mlp_ratio: float = 4.0,
        num_freqs: int = 8,
        include_pi: bool = False,
        point_feature_dim: int = 3,
        use_salient: bool = True,
        salient_token_fraction: float = 0.5,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        qk_norm_scale: float = 1.0,
        layer_norm_eps: float = 1e-5,
        output_type: str = "tsdf",
        default_num_tokens: int = 2048,
        max_train_tokens: int = 4096,
        epsilon: float = 2 / 256,
        tsdf_truncation: float = 0.015,
        n_uniform: int = 32768,
        n_salient: int = 32768,
        gradient_checkpointing: bool = False,
        decode_chunk_size: int = 8192,
        num_query_layers: int = 1,
        local_attention: bool = False,
        locality_sigmas: Sequence[float] | None = None,
        local_decoder: bool = True,
        sample_posterior: bool = False,
    ) -> None:
        super().__init__()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_query_layers < 1:
            raise ValueError(f"num_query_layers must be at least 1, got {num_query_layers}")
        if qk_norm_scale <= 0:
            raise ValueError(f"qk_norm_scale must be positive, got {qk_norm_scale}")
        if not 0.0 <= salient_token_fraction <= 1.0:
            raise ValueError(f"salient_token_fraction must lie in [0, 1], got {salient_token_fraction}")
        blocks = {
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "qk_norm": qk_norm,
            "layer_norm_eps": layer_norm_eps,
        }
        cross_block = CrossAttentionBlock
        if local_attention:  # local attention: the same blocks with a per-head distance term
            cross_block = local.cross_attention_block(heads, locality_sigmas)
        # local_decoder=False keeps the query decoder plain: the encoder's queries sit at exactly known FPS
        # points, the decoder's keys at positions the tokens predict, which a generated code gets wrong.
        decoder_block = cross_block if local_attention and local_decoder else CrossAttentionBlock
        self.fourier = FourierEmbedder(num_freqs=num_freqs, include_input=True, include_pi=include_pi)
        point_dim = self.fourier.output_dim(3) + point_feature_dim
        # Encoder.
        self.uniform_proj = nn.Linear(point_dim, width)
        self.cross_attn_uniform = cross_block(width, heads, **blocks)
        self.salient_proj = nn.Linear(point_dim, width) if use_salient else None
        self.cross_attn_salient = cross_block(width, heads, **blocks) if use_salient else None
        self.encoder_blocks = nn.ModuleList(
            SelfAttentionBlock(width, heads, **blocks) for _ in range(num_encoder_layers)
        )
        self.encoder_norm_out = nn.LayerNorm(width, eps=layer_norm_eps)
        self.pre_kl = nn.Linear(width, 2 * latent_channels)
        # Decoder.
        self.post_kl = nn.Linear(latent_channels, width)
        self.decoder_blocks = nn.ModuleList(
            SelfAttentionBlock(width, heads, **blocks) for _ in range(num_decoder_layers)
        )
        self.query_proj = nn.Linear(self.fourier.output_dim(3), width)
        self.cross_attn_decoder = decoder_block(width, heads, **blocks)
        # Dora has one query cross-attention; more let a query refine where it looks (a coarse pass, then a local
        # one). A separate list keeps the official parameter names of the first block.
        self.extra_query_blocks = nn.ModuleList(
            decoder_block(width, heads, **blocks) for _ in range(num_query_layers - 1)
        )
        # local attention in the decoder
        self.anchor_head = local.anchor_head(width) if local_attention and local_decoder else None
        self.decoder_norm_out = nn.LayerNorm(width, eps=layer_norm_eps)
        self.output_proj = nn.Linear(width, 1)
        self.gradient_checkpointing = False
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
        if qk_norm and qk_norm_scale != 1.0:
            self._scale_qk_norms(qk_norm_scale)

    def _scale_qk_norms(self, scale: float) -> None:
        """Start every query and key RMSNorm weight at sqrt(scale), so the attention logits start ``scale`` times
        larger (they stay learnable). Normalised queries and keys bound a logit by sqrt(head_dim), ~5.7 here: a
        softmax over 512 tokens that cannot get sharper than that spreads a query over much of the shape, and a
        thin part, covered by a few tokens, blurs away; the weights barely move in a few hundred steps (1.03
        after the quickstart's 520)."""
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith(("norm_q.weight", "norm_k.weight")):
                    parameter.fill_(math.sqrt(scale))

    # ----------------------------------------------------------------------------------------------- inputs
    def _run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _to_model(self, value: Any, name: str) -> torch.Tensor:
        tensor = torch.as_tensor(value).to(device=self.device, dtype=self.dtype)
        if tensor.dim() == 2:
            tensor = tensor[None]
        expected = 3 + self.config.point_feature_dim
        if tensor.dim() != 3 or tensor.shape[-1] != expected:
            raise ValueError(
                f"{name}: expected shape (B, N, {expected}) (xyz + normal), got {tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
        return tensor

    def _warn_epsilon(self, epsilons: Sequence[float | None]) -> None:
        trained = float(self.config.epsilon)
        for epsilon in {float(e) for e in epsilons if e is not None}:
            if not math.isclose(epsilon, trained, rel_tol=1e-6, abs_tol=1e-9):
                warnings.warn(
                    f"point cloud was prepared with epsilon={epsilon:.6g}, but this model was trained at "
                    f"epsilon={trained:.6g}: thin structures below the trained scale come out with holes (or "
                    f"vanish). Prepare meshes with MeshProcessor(epsilon={trained:.6g}) for this model.",
                    UserWarning,
                    stacklevel=5,  # the caller of encode()
                )

    def _streams(self, point_cloud: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Normalise the accepted inputs to groups of (uniform (B, Nu, 6), salient (B, Ns, 6) | None) tensors;
        a list of PointClouds with different point counts becomes one group per shape."""
        use_salient = self.config.use_salient
        if isinstance(point_cloud, dict):
            if "uniform" not in point_cloud:
                raise ValueError("input dict needs a 'uniform' entry of shape (B, N_u, 6)")
            self._warn_epsilon([point_cloud.get("epsilon")])
            salient = point_cloud.get("salient") if use_salient else None
            if use_salient and salient is None:
                raise ValueError(
                    "this model uses the salient stream (use_salient=True): input dict needs 'salient'"
                )
            uniform = self._to_model(point_cloud["uniform"], "uniform")
            salient = None if salient is None else self._to_model(salient, "salient")
            if salient is not None and salient.shape[0] != uniform.shape[0]:
                raise ValueError(
                    f"uniform and salient batch sizes differ: {uniform.shape[0]} vs {salient.shape[0]}"
                )
            return [(uniform, salient)]
        clouds = list(point_cloud) if isinstance(point_cloud, (list, tuple)) else [point_cloud]
        if not clouds:
            raise ValueError("encode got an empty list of point clouds")
        self._warn_epsilon([getattr(cloud, "epsilon", None) for cloud in clouds])
        arrays = []
        for index, cloud in enumerate(clouds):
            try:
                arrays.append(
                    (stream_array(cloud, "uniform"), stream_array(cloud, "salient") if use_salient else None)
                )
            except ValueError as error:
                raise ValueError(f"point cloud {index}: {error}") from None
        shapes = {(a.shape, None if b is None else b.shape) for a, b in arrays}
        groups = [arrays] if len(shapes) == 1 else [[pair] for pair in arrays]
        return [
            (
                self._to_model(np.stack([a for a, _ in group]), "uniform"),
                None if group[0][1] is None else self._to_model(np.stack([b for _, b in group]), "salient"),
            )
            for group in groups
        ]

    # ----------------------------------------------------------------------------------------------- encoder
    def token_split(self, num_tokens: int) -> tuple[int, int]:
        """(uniform, salient) token counts for ``num_tokens`` (all uniform when use_salient is False)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        num_salient = int(num_tokens * self.config.salient_token_fraction) if self.config.use_salient else 0
        return num_tokens - num_salient, num_salient

    def _embed_points(self, points: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.fourier(points[..., :3]), points[..., 3:]], dim=-1)  # (B, N, 51 + 3)

    def _queries(
        self, features: torch.Tensor, points: torch.Tensor, count: int, stream: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if count > points.shape[1]:
            raise ValueError(
                f"{count} {stream}-stream tokens requested but the point cloud has only {points.shape[1]} {stream} "
                f"points; sample more points or ask for fewer tokens"
            )
        indices = farthest_point_indices(points[..., :3], count)  # (B, K)
        picked = torch.gather(features, 1, indices[..., None].expand(-1, -1, features.shape[-1]))  # (B, K, W)
        return picked, torch.gather(
            points, 1, indices[..., None].expand(-1, -1, points.shape[-1])
        )  # (B, K, 6)

    def _key_geometry(self, positions: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Extra arguments of an encoder cross-attention: none on the Dora path; with local attention the
        query positions (the tokens' FPS points) and the stream's point positions and normals."""
        if not self.config.local_attention:
            return ()
        return local.encoder_geometry(positions[..., :3], points)

    def _encode_group(
        self, uniform: torch.Tensor, salient: torch.Tensor | None, num_tokens: int
    ) -> LatentPosterior:
        num_uniform, num_salient = self.token_split(num_tokens)
        uniform_features = self.uniform_proj(self._embed_points(uniform))  # (B, Nu, W)
        picked = [self._queries(uniform_features, uniform, num_uniform, "uniform")]
        if self.config.use_salient:
            salient_features = self.salient_proj(self._embed_points(salient))  # (B, Ns, W)
            picked.append(self._queries(salient_features, salient, num_salient, "salient"))
        order = interleave_order(num_uniform, num_salient if self.config.use_salient else 0).to(self.device)
        queries = torch.cat([features for features, _ in picked], dim=1)[
            :, order
        ]  # (B, N, W), FPS-interleaved
        positions = torch.cat([point for _, point in picked], dim=1)[:, order]  # (B, N, 6) xyz + normal
        tokens = self._run_block(
            self.cross_attn_uniform, queries, uniform_features, *self._key_geometry(positions, uniform)
        )  # (B, N, W)
        if self.config.use_salient:
            # As in Dora: both blocks keep their residual, so the sum holds the queries twice. Kept on purpose,
            # the released weights were trained that way.
            tokens = tokens + self._run_block(
                self.cross_attn_salient, queries, salient_features, *self._key_geometry(positions, salient)
            )  # (B, N, W)
        for block in self.encoder_blocks:
            tokens = self._run_block(block, tokens)  # (B, N, W)
        moments = self.pre_kl(self.encoder_norm_out(tokens))  # (B, N, 2C)
        mean, logvar = moments.chunk(2, dim=-1)  # (B, N, C) each
        return LatentPosterior(mean=mean, logvar=logvar.clamp(-30.0, 20.0), positions=positions)

    def encode_posterior(self, point_cloud: Any, num_tokens: int | None = None) -> LatentPosterior:
        """Posterior (mean, logvar) over ``num_tokens`` latent tokens; inputs as for :meth:`encode`."""
        num_tokens = int(num_tokens or self.config.default_num_tokens)
        posteriors = [self._encode_group(u, s, num_tokens) for u, s in self._streams(point_cloud)]
        if len(posteriors) == 1:
            return posteriors[0]
        return LatentPosterior(
            mean=torch.cat([p.mean for p in posteriors]),
            logvar=torch.cat([p.logvar for p in posteriors]),
            positions=torch.cat([p.positions for p in posteriors]),
        )

    def encode(
        self,
        point_cloud: Any,
        num_tokens: int | None = None,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Latent tokens (B, num_tokens, latent_channels) of a PointCloud, a list of them, or a dict with
        "uniform" (B, N_u, 6) and "salient" (B, N_s, 6) xyz+normal tensors (optional "epsilon").

        ``sample_posterior=None`` follows ``config.sample_posterior``: the posterior mean (deterministic) for
        models trained here, a sample (pass a seeded ``generator`` to reproduce it) for converted Dora weights,
        whose official test config samples when reconstructing. ``num_tokens`` may exceed the training
        maximum (the set has no positions); it is limited only by the points available per stream. Tokens come
        in interleaved FPS order, so ``latents[:, :k]`` is a coarse cover of the shape for any ``k``. Warns when
        the input was prepared at another epsilon than the model's.
        """
        posterior = self.encode_posterior(point_cloud, num_tokens)
        if sample_posterior is None:
            sample_posterior = bool(self.config.sample_posterior)
        return posterior.sample(generator) if sample_posterior else posterior.mode()

    # ----------------------------------------------------------------------------------------------- decoder
    def decode(self, latents: torch.Tensor, chunk_size: int | None = None) -> DecodedLatents:
        """Run the latent transformer once; the result is a field to query at any points (see DecodedLatents)."""
        if latents.dim() != 3 or latents.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"latents must have shape (B, N, {self.config.latent_channels}), got {tuple(latents.shape)}"
            )
        tokens = self.post_kl(latents.to(device=self.device, dtype=self.dtype))  # (B, N, W)
        for block in self.decoder_blocks:
            tokens = self._run_block(block, tokens)  # (B, N, W)
        return DecodedLatents(self, tokens, chunk_size)

    def token_anchors(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, N, 6) xyz + normal the decoded tokens place themselves at (local attention only; None on the Dora
        path)."""
        return None if self.anchor_head is None else self.anchor_head(tokens)

    def _query_raw(
        self, tokens: torch.Tensor, query_points: torch.Tensor, anchors: torch.Tensor | None
    ) -> torch.Tensor:
        """Raw output (B, M) at query points; ``anchors`` from :meth:`token_anchors` (None without local attention)."""
        queries = self.query_proj(self.fourier(query_points))  # (B, M, W)
        geometry = () if anchors is None else local.decoder_geometry(query_points, anchors)  # local attention
        hidden = self._run_block(self.cross_attn_decoder, queries, tokens, *geometry)  # (B, M, W)
        for block in self.extra_query_blocks:
            hidden = self._run_block(block, hidden, tokens, *geometry)  # (B, M, W)
        return self.output_proj(self.decoder_norm_out(hidden)).squeeze(-1)  # (B, M)

    def raw_to_occupancy(self, raw: torch.Tensor) -> torch.Tensor:
        """Map the raw output to [0, 1], 0.5 at the surface, larger inside (TSDF is positive inside)."""
        if self.config.output_type == "occupancy":
            return torch.sigmoid(raw)
        return ((raw + 1.0) * 0.5).clamp(0.0, 1.0)

    def _query_tokens(
        self,
        tokens: torch.Tensor,
        query_points: Any,
        output: str = "occupancy",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        if output not in ("occupancy", "raw"):
            raise ValueError(f"output must be 'occupancy' or 'raw', got {output!r}")
        points = torch.as_tensor(query_points).to(device=self.device, dtype=self.dtype)
        if points.dim() == 2:
            points = points[None].expand(tokens.shape[0], -1, -1)  # (B, M, 3)
        if points.dim() != 3 or points.shape[-1] != 3 or points.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"query_points must be (M, 3) or ({tokens.shape[0]}, M, 3), got {tuple(torch.as_tensor(query_points).shape)}"
            )
        chunk_size = int(chunk_size or self.config.decode_chunk_size)
        # Chunks over M bound the (B, heads, chunk, N) attention and (B, chunk, 4W) MLP activations.
        anchors = self.token_anchors(tokens)  # (B, N, 6) or None, once for all chunks
        chunks = [self._query_raw(tokens, chunk, anchors) for chunk in points.split(chunk_size, dim=1)]
        raw = torch.cat(chunks, dim=1) if chunks else points.new_zeros(points.shape[:2])  # (B, M)
        return raw if output == "raw" else self.raw_to_occupancy(raw)

    def decode_at_points(
        self,
        latents: torch.Tensor,
        query_points: torch.Tensor | np.ndarray,
        output: str = "occupancy",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Values (B, M) at query points (M, 3) or (B, M, 3): "occupancy" in [0, 1] or the "raw" logit/TSDF."""
        return self._query_tokens(self.decode(latents).tokens, query_points, output, chunk_size)

    # ----------------------------------------------------------------------------------------------- training
    def forward(
        self,
        uniform: torch.Tensor | None = None,
        salient: torch.Tensor | None = None,
        query_points: torch.Tensor | None = None,
        num_tokens: int | None = None,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        latent_noise: float | torch.Tensor = 0.0,
        latents: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training pass: dict(raw=(B, M) logits or TSDF at query_points (B, M, 3), kl=(B,), latents=(B, N, C)
        as decoded, mean, logvar, and with local attention anchor_loss=(B,), the squared error of each token's
        predicted xyz + normal against its FPS point's). No chunking: the whole query set takes part in the backward
        pass. ``latent_noise`` > 0 decodes ``latents + latent_noise * std * N(0, 1)`` (std per channel over the
        batch, no gradient): a decoder that must read slightly wrong codes tolerates the errors of a generated one,
        and a relative scale cannot be escaped by growing the latents (the posterior's own noise can be shrunk).
        A (B,) tensor gives each code its own level.

        ``latents`` (B, N, C) given: decode these codes and skip the encoder (a decoder fine-tune on codes a DiT
        made, ``data.codes`` of `dora train-vae`); the result then has no kl, mean, logvar or anchor_loss."""
        if query_points is None:
            raise ValueError("forward needs query_points (B, M, 3)")
        posterior = None
        if latents is None:
            if uniform is None:
                raise ValueError("forward needs a point cloud (uniform) or latents to decode")
            posterior = self.encode_posterior({"uniform": uniform, "salient": salient}, num_tokens)
            latents = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, N, C)
        else:
            if latents.dim() != 3 or latents.shape[-1] != self.config.latent_channels:
                raise ValueError(
                    f"latents must have shape (B, N, {self.config.latent_channels}), got {tuple(latents.shape)}"
                )
            latents = latents.to(device=self.device, dtype=self.dtype)  # (B, N, C)
        # A tensor of levels (one per code) always perturbs; a float only when positive (no host sync either way).
        if isinstance(latent_noise, torch.Tensor) or latent_noise > 0:
            spread = latents.detach().flatten(0, 1).std(0)  # (C,)
            noise = torch.randn(
                latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
            )
            level = torch.as_tensor(latent_noise, device=latents.device, dtype=latents.dtype)
            level = level.reshape(-1, 1, 1) if level.dim() == 1 else level  # (B, 1, 1) or ()
            latents = latents + level * spread * noise  # (B, N, C)
        tokens = self.post_kl(latents)  # (B, N, W)
        for block in self.decoder_blocks:
            tokens = self._run_block(block, tokens)  # (B, N, W)
        points = query_points.to(device=self.device, dtype=self.dtype)
        if points.dim() == 2:
            points = points[None].expand(tokens.shape[0], -1, -1)  # (B, M, 3)
        anchors = self.token_anchors(tokens)  # (B, N, 6) or None
        raw = self._query_raw(tokens, points, anchors)  # (B, M)
        out = {"raw": raw, "latents": latents}
        if posterior is None:  # given codes: nothing of the encoder to regularise
            return out
        out |= {"kl": posterior.kl(), "mean": posterior.mean, "logvar": posterior.logvar}
        if anchors is not None:  # local attention
            out["anchor_loss"] = local.anchor_loss(anchors, posterior.positions)  # (B,)
        return out

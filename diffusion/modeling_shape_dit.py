"""ShapeDiT: a diffusion transformer over vecset shape latents, conditioned on text or an image (or both).

The latents of the shape VAE are an unordered set of tokens (B, N, C), and any prefix of them is a valid coarser
shape, so the denoiser has no positional embedding at all: every layer is per-token or attention, which makes the
model permutation-equivariant over tokens and lets it run on any N (Dora's README recommends exactly this for
diffusion on its latents). Timesteps follow ``FlowMatchEulerDiscreteScheduler`` (float t in [0, 1000], t = 1000 *
sigma) and ``forward`` returns the rectified-flow velocity (noise - x0), predicted directly or, with
``prediction_type="sample"``, derived from a predicted clean sample; see ``diffusion/flow_matching.py``. Its
blocks (attention with QK-norm, the PixArt block with the long skip) are in ``diffusion/attention.py``.

Conditioning:
- timestep (+ optional pooled text vector) -> one embedding -> **adaLN-single** (PixArt-alpha): a single shared MLP
  maps the embedding to 6 * width modulation values and every block adds its own learned (6, width) table. We use
  it instead of DiT's per-block adaLN-Zero because a per-block adaLN MLP costs 6 * width^2 parameters per block
  (+151M on top of 406M at width 1024 / 24 layers), which PixArt-alpha found unnecessary. The gate rows and the shared
  MLP start at zero, so every block starts as the identity, which is what makes adaLN-Zero train stably.
- text tokens -> cross-attention (keys/values straight from the encoder's hidden size) with the encoder's mask.
- an image instead of text (``condition: image``): the image encoder's tokens and pooled vector take the same two
  places. Both (``condition: both``, ``diffusion/conditioning.py``): the image tokens are projected to the text width
  (``image_embed_dim``) and appended to the cross-attention context with their own mask, and the image's pooled
  vector gets its own embedding (``image_pooled_projection_dim``) added beside the text's. These modules exist only
  when configured, so a text model's parameters, initial weights and outputs are what they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from dora_shapegen.diffusion.attention import ShapeDiTBlock

TIME_PROJECTION_CHANNELS = 256  # sinusoidal features fed to the timestep MLP (DiT / SD3 use 256)


@dataclass
class ShapeDiTOutput(BaseOutput):
    """ShapeDiT's prediction for a token set (diffusers' image outputs describe (B, C, H, W) grids instead).

    Args:
        sample: (B, N, C) the rectified-flow velocity, one per latent token, shaped like the input latents.
    """

    sample: torch.Tensor


TEXT_CONTEXTS = ("tokens", "pooled", "pooled+tokens")
PREDICTION_TYPES = ("velocity", "sample")
NUM_TRAIN_TIMESTEPS = 1000  # timestep = sigma * 1000, FlowMatchEulerDiscreteScheduler's default


class ShapeDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Rectified-flow velocity predictor for vecset latents, conditioned on text tokens (+ pooled text vector).

    Args:
        in_channels: latent channels C of the VAE (the latent cache manifest records it).
        out_channels: predicted channels; defaults to ``in_channels``.
        width / num_layers / num_heads / mlp_ratio: transformer size (width must divide by num_heads).
        cross_attention_dim: hidden size D of the text encoder's token embeddings.
        pooled_projection_dim: size of the pooled text vector added to the timestep embedding; None disables it.
        use_long_skips: U-ViT skips from block i to block num_layers-1-i (second half concatenates first half).
        qk_norm: RMS-normalise queries and keys in self- and cross-attention.
        dropout: attention and MLP dropout (training only).
        text_context: what cross-attention reads: ``"tokens"`` (the encoder's token states), ``"pooled"`` (one
            token, the projected pooled vector) or ``"pooled+tokens"`` (that token first, then the states). A
            sentence encoder's pooled vector is trained to be the same for a paraphrase (all-MiniLM-L6-v2 puts
            every benchmark paraphrase nearest a training caption of its category), its token states are not.
        image_embed_dim: D of a second, image token stream (``condition: both``), projected to
            ``cross_attention_dim`` and appended to the context; None = no second stream.
        image_pooled_projection_dim: size of that stream's pooled vector, added to the timestep embedding; None
            disables it.
        prediction_type: what the network's last layer predicts. ``"velocity"`` (noise - x0) as usual;
            ``"sample"``: the clean latents x0 (x-prediction, Li & He, arXiv 2511.13720), turned into the velocity
            ``(x_t - x0_hat) / max(sigma, min_sigma)`` inside ``forward``, so every caller (the training loss,
            the schedulers, guidance) still sees a velocity. A network that outputs clean latents only has to
            model the data, a low-dimensional set, not the full-dimensional noise.
        min_sigma: the divisor's floor for ``"sample"`` (0.05 as in that paper), so that the velocity of a nearly
            clean input does not blow up the network's error.

    ``PeftAdapterMixin`` gives diffusers' LoRA methods (``add_adapter``, ``load_lora_adapter``, ``set_adapters``,
    ``fuse_lora``); see ``diffusion/finetune.py``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ShapeDiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 64,
        out_channels: int | None = None,
        width: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        cross_attention_dim: int = 384,
        pooled_projection_dim: int | None = 384,
        use_long_skips: bool = True,
        qk_norm: bool = True,
        dropout: float = 0.0,
        text_context: str = "tokens",
        image_embed_dim: int | None = None,
        image_pooled_projection_dim: int | None = None,
        prediction_type: str = "velocity",
        min_sigma: float = 0.05,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"ShapeDiT: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if not 0.0 < min_sigma <= 1.0:
            raise ValueError(f"ShapeDiT: min_sigma must lie in (0, 1], got {min_sigma}")
        if text_context not in TEXT_CONTEXTS:
            raise ValueError(f"ShapeDiT: text_context must be one of {TEXT_CONTEXTS}, got {text_context!r}")
        if text_context != "tokens" and pooled_projection_dim is None:
            raise ValueError(f"ShapeDiT: text_context={text_context!r} needs a pooled_projection_dim")
        if width % num_heads != 0:
            raise ValueError(f"ShapeDiT: width={width} must be divisible by num_heads={num_heads}")
        if num_layers < 1:
            raise ValueError(f"ShapeDiT: num_layers must be >= 1, got {num_layers}")
        out_channels = out_channels or in_channels
        self.gradient_checkpointing = False  # flipped by ModelMixin.enable_gradient_checkpointing()
        self.num_skip_layers = num_layers // 2 if use_long_skips else 0

        self.proj_in = nn.Linear(in_channels, width)  # per-token: no positional embedding on purpose
        self.time_proj = Timesteps(TIME_PROJECTION_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(TIME_PROJECTION_CHANNELS, width)
        self.pooled_embedding = (
            PixArtAlphaTextProjection(pooled_projection_dim, width, act_fn="silu")
            if pooled_projection_dim is not None
            else None
        )
        self.pooled_context = (
            nn.Linear(pooled_projection_dim, cross_attention_dim) if text_context != "tokens" else None
        )
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # shared by all blocks
        self.blocks = nn.ModuleList(
            ShapeDiTBlock(
                width,
                num_heads,
                mlp_ratio,
                cross_attention_dim,
                qk_norm,
                dropout,
                long_skip=index >= num_layers - self.num_skip_layers,
            )
            for index in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_scale_shift_table = nn.Parameter(torch.randn(2, width) / width**0.5)
        self.proj_out = nn.Linear(width, out_channels)
        # Created last and only when configured: a text model draws the same initial weights as before.
        self.image_proj = nn.Linear(image_embed_dim, cross_attention_dim) if image_embed_dim else None
        self.image_pooled_embedding = (
            PixArtAlphaTextProjection(image_pooled_projection_dim, width, act_fn="silu")
            if image_pooled_projection_dim is not None
            else None
        )
        self._init_zero()

    def _init_zero(self) -> None:
        # adaLN-Zero-style start: gates at 0 (blocks = identity), text cross-attn output at 0 (as PixArt), and a
        # zero output layer so the untrained model predicts zero velocity instead of random noise.
        nn.init.zeros_(self.adaln_single[1].weight)
        nn.init.zeros_(self.adaln_single[1].bias)
        for block in self.blocks:
            with torch.no_grad():
                block.scale_shift_table[2].zero_()
                block.scale_shift_table[5].zero_()
            nn.init.zeros_(block.cross_attn.to_out.weight)
            nn.init.zeros_(block.cross_attn.to_out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _embed_time(
        self,
        timestep: torch.Tensor | float,
        batch_size: int,
        pooled: torch.Tensor | None,
        like: torch.Tensor,
        image_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=like.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        if timestep.shape != (batch_size,):
            raise ValueError(
                f"ShapeDiT: timestep must be a scalar or shape ({batch_size},), got {tuple(timestep.shape)}"
            )
        time_features = self.time_proj(timestep).to(like.dtype)  # (B,256)
        embedding = self.time_embedding(time_features)  # (B,W)
        if self.pooled_embedding is not None:
            if pooled is None:
                raise ValueError(
                    "ShapeDiT: pooled_projections is required because the model was configured with "
                    f"pooled_projection_dim={self.config.pooled_projection_dim} (pass the encoder's pooled vector)"
                )
            embedding = embedding + self.pooled_embedding(pooled.to(like.dtype))  # (B,W)
        elif pooled is not None:
            raise ValueError(
                "ShapeDiT: pooled_projections given but the model has pooled_projection_dim=None"
            )
        if self.image_pooled_embedding is not None:
            if image_pooled is None:
                raise ValueError(
                    "ShapeDiT: image_pooled_projections is required (image_pooled_projection_dim="
                    f"{self.config.image_pooled_projection_dim}); pass zeros for no image"
                )
            embedding = embedding + self.image_pooled_embedding(image_pooled.to(like.dtype))  # (B,W)
        elif image_pooled is not None:
            raise ValueError(
                "ShapeDiT: image_pooled_projections given but the model has image_pooled_projection_dim=None"
            )
        return embedding

    def _sample_to_velocity(
        self, noisy: torch.Tensor, clean: torch.Tensor, timestep: torch.Tensor | float, batch_size: int
    ) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise, so v = noise - x0 = (x_t - x0) / sigma."""
        timestep = torch.as_tensor(timestep, device=noisy.device, dtype=torch.float32).expand(
            batch_size
        )  # (B,)
        sigmas = (timestep / NUM_TRAIN_TIMESTEPS).clamp(min=self.config.min_sigma)  # (B,)
        return (noisy - clean) / sigmas.to(noisy.dtype)[:, None, None]  # (B,N,C)

    def _append_image_context(
        self,
        context: torch.Tensor,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text context (B, L, D) with the projected image tokens (B, L_i, D_i) appended, and the joint mask."""
        if self.image_proj is None:
            if image is not None:
                raise ValueError("ShapeDiT: image_hidden_states given but the model has image_embed_dim=None")
            return context, mask
        if image is None or image.ndim != 3 or image.shape[0] != context.shape[0]:
            raise ValueError(
                f"ShapeDiT: image_hidden_states (B={context.shape[0]}, L, {self.config.image_embed_dim}) are "
                "required for a model with an image stream (ImageEncoder.unconditional gives 'no image')"
            )
        image_context = self.image_proj(image.to(context.dtype))  # (B,L_i,D)
        batch, length, image_length = context.shape[0], context.shape[1], image.shape[1]
        text_mask = mask if mask is not None else torch.ones(batch, length, device=context.device)
        if image_mask is None:
            image_mask = torch.ones(batch, image_length, device=context.device)
        joint_mask = torch.cat([text_mask.long(), image_mask.long()], dim=1)  # (B,L+L_i)
        return torch.cat([context, image_context], dim=1), joint_mask  # (B,L+L_i,D)

    @staticmethod
    def _context_mask(
        encoder_attention_mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if encoder_attention_mask is None:
            return None, None
        keep = encoder_attention_mask.bool()  # (B,L) True = attend
        has_tokens = keep.any(dim=-1)  # (B,)
        # A row with no valid key would give softmax over nothing = NaN; let it attend everywhere (finite) and
        # zero its cross-attention output with the gate instead, so it behaves as "no text".
        keep = keep | ~has_tokens[:, None]  # (B,L)
        return keep[:, None, None, :], has_tokens.to(dtype)[:, None, None]  # (B,1,1,L), (B,1,1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        return_dict: bool = True,
        image_hidden_states: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        image_pooled_projections: torch.Tensor | None = None,
    ) -> ShapeDiTOutput | tuple[torch.Tensor]:
        """Predict the flow velocity for noisy latents ``hidden_states`` (B, N, C) at ``timestep`` (B,) in [0, 1000].

        ``encoder_hidden_states`` (B, L, D) are text token embeddings with ``encoder_attention_mask`` (B, L)
        (1/True = real token); ``pooled_projections`` (B, P) is the pooled text vector. A model with an image stream
        (``image_embed_dim``) also takes ``image_hidden_states`` (B, L_i, D_i), ``image_attention_mask`` (B, L_i)
        and ``image_pooled_projections`` (B, P_i). Returns a
        :class:`ShapeDiTOutput`, or the tuple ``(sample,)`` with ``return_dict=False``.
        """
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"ShapeDiT: hidden_states must be (B, N, {self.config.in_channels}), got {tuple(hidden_states.shape)}"
            )
        batch_size = hidden_states.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"ShapeDiT: encoder_hidden_states must be (B={batch_size}, L, D), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[1] == 0:
            raise ValueError(
                "ShapeDiT: encoder_hidden_states has no tokens; encode the empty prompt '' instead"
            )

        hidden = self.proj_in(hidden_states)  # (B,N,W)
        context = encoder_hidden_states.to(hidden.dtype)  # (B,L,D)
        if self.pooled_context is not None:  # text_context "pooled" / "pooled+tokens"
            if pooled_projections is None:
                raise ValueError(
                    f"ShapeDiT: text_context={self.config.text_context!r} needs pooled_projections"
                )
            pooled_token = self.pooled_context(pooled_projections.to(hidden.dtype))[:, None]  # (B,1,D)
            if self.config.text_context == "pooled":
                context, encoder_attention_mask = pooled_token, None  # (B,1,D)
            else:
                context = torch.cat([pooled_token, context], dim=1)  # (B,1+L,D)
                if encoder_attention_mask is not None:
                    first = encoder_attention_mask.new_ones((batch_size, 1))  # (B,1)
                    encoder_attention_mask = torch.cat([first, encoder_attention_mask], dim=1)  # (B,1+L)
        context, encoder_attention_mask = self._append_image_context(
            context, encoder_attention_mask, image_hidden_states, image_attention_mask
        )  # (B,L',D), (B,L')
        context_mask, context_gate = self._context_mask(encoder_attention_mask, hidden.dtype)
        conditioning = self._embed_time(
            timestep, batch_size, pooled_projections, hidden, image_pooled_projections
        )  # (B,W)
        modulation = self.adaln_single(conditioning)  # (B,6W)

        skips: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            skip = skips.pop() if block.skip_linear is not None else None
            args = (hidden, modulation, context, context_mask, context_gate, skip)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = self._gradient_checkpointing_func(block, *args)
            else:
                hidden = block(*args)
            if index < self.num_skip_layers:
                skips.append(hidden)

        shift, scale = (self.out_scale_shift_table[None] + conditioning[:, None]).unbind(1)  # (B,W) each
        hidden = self.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]  # (B,N,W)
        output = self.proj_out(hidden)  # (B,N,C)
        if self.config.prediction_type == "sample":
            output = self._sample_to_velocity(hidden_states, output, timestep, batch_size)  # (B,N,C)
        if not return_dict:
            return (output,)
        return ShapeDiTOutput(sample=output)

"""DoraTextTo3DPipeline: text -> vecset latents (ShapeDiT, flow matching) -> Dora VAE field -> mesh.

Follows the diffusers pipeline layout (see StableDiffusion3Pipeline): ``check_inputs``, ``encode_prompt``,
``prepare_latents``, a denoising loop with a progress bar and ``callback_on_step_end`` (``pipelines/denoising.py``,
which the image pipeline runs too), ``decode_latents``; the argument checks (``pipelines/checks.py``) and the mesh
extraction with the output class (``pipelines/decoding.py``) are shared with the image pipeline the same way.
Components are registered with ``register_modules`` so ``save_pretrained`` / ``from_pretrained`` write and read
the standard layout (model_index.json + one folder per component). The latent statistics of the cache manifest
(the DiT was trained on normalised latents) are optional ``__init__`` arguments registered to the config, so they
land in model_index.json and ``from_pretrained`` passes them back.

Importing this module also imports ``vae.modeling_dora_vae`` and ``diffusion.modeling_shape_dit``: diffusers 0.42
loads a component from a non-diffusers library only when its module is already imported (it will not import code
named by a model_index.json), so ``DoraTextTo3DPipeline.from_pretrained`` works in a fresh process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from dora_shapegen.data.latent_shards import LatentStats
from dora_shapegen.diffusion.lora_loader import ShapeDiTLoraLoaderMixin
from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
from dora_shapegen.diffusion.sampling import (
    check_guidance_interval,
    encode_prompts,
    initial_noise,
    uses_guidance,
)
from dora_shapegen.diffusion.text_encoder import KINDS as TEXT_ENCODER_KINDS
from dora_shapegen.diffusion.text_encoder import TextEmbeddings, TextEncoder, detect_kind
from dora_shapegen.pipelines.checks import (  # noqa: F401  (OUTPUT_TYPES: re-exported)
    OUTPUT_TYPES,
    check_call,
    check_default_guidance_scale,
    check_latent_stats,
    string_list,
)
from dora_shapegen.pipelines.decoding import (  # noqa: F401  (reduce_faces: re-exported)
    DoraTextTo3DPipelineOutput,
    decode_meshes,
    finish,
    reduce_faces,
)
from dora_shapegen.pipelines.denoising import denoise
from dora_shapegen.pipelines.limits import DEFAULT_GUIDANCE_SCALE, DEFAULT_MAX_FACES
from dora_shapegen.vae.modeling_dora_vae import DoraVAE

LEGACY_MODULES = {
    "vae.modeling_dora_vae": "dora_shapegen.vae.modeling_dora_vae",
    "diffusion.modeling_shape_dit": "dora_shapegen.diffusion.modeling_shape_dit",
}
logger = logging.getLogger(__name__)


class DoraTextTo3DPipeline(DiffusionPipeline, ShapeDiTLoraLoaderMixin):
    r"""Text-to-3D with a flow-matching ShapeDiT over Dora VAE vecset latents.

    Args:
        vae: ``vae.DoraVAE``; decodes (B, N, C) latents into an occupancy-like field.
        transformer: ``diffusion.ShapeDiT``; predicts the flow-matching velocity ``noise - x0``.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (x_t = (1 - sigma) x0 + sigma noise, t = 1000 sigma).
        text_encoder, tokenizer: the frozen transformers encoder and its tokenizer that the DiT was trained with.
        latent_mean, latent_std: per-channel statistics (length C) of the cached latents the DiT was trained on;
            generated latents are mapped back with ``x * std + mean`` before decoding. None = identity.
        max_tokens: the largest ``num_tokens`` accepted. None = the VAE's recorded maximum (its config), if any.
        default_num_tokens: ``num_tokens`` used when the call does not give one (the DiT's training length).
        default_guidance_scale: ``guidance_scale`` used when the call does not give one, in ``GUIDANCE_RANGE``
            (`dora assemble-pipeline` stores the DiT run's ``sampling.guidance_scale``, the guidance of its
            training previews). None = ``pipelines.limits.DEFAULT_GUIDANCE_SCALE``.
        text_max_length: tokenizer truncation length, the one used in DiT training.
        text_encoder_kind: how the pooled vector is made (``diffusion.text_encoder.KINDS``); recorded because a
            saved transformers folder loses the sentence-transformers marker (L2-normalised mean pooling).
            None = inferred from the model type ("clip", "t5", else "bert").

    LoRA adapters of the transformer (trained by `dora train-dit` with ``lora.rank > 0``) load with diffusers'
    API: ``pipe.load_lora_weights(DIR, adapter_name="a")``, ``pipe.set_adapters(["a", "b"], [1.0, 0.5])``,
    ``pipe.fuse_lora()`` / ``pipe.unfuse_lora()``, ``pipe.disable_lora()``, ``pipe.unload_lora_weights()``.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"]

    def __init__(
        self,
        vae: DoraVAE,
        transformer: ShapeDiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        latent_mean: list[float] | None = None,
        latent_std: list[float] | None = None,
        max_tokens: int | None = None,
        default_num_tokens: int | None = None,
        text_max_length: int = 77,
        text_encoder_kind: str | None = None,
        default_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        if text_encoder_kind is not None and text_encoder_kind not in TEXT_ENCODER_KINDS:
            raise ValueError(
                f"text_encoder_kind must be one of {TEXT_ENCODER_KINDS}, got {text_encoder_kind!r}"
            )
        latent_mean, latent_std = check_latent_stats(latent_mean, latent_std, self.latent_channels)
        # Plain config values (not modules): stored in model_index.json, passed back by from_pretrained.
        self.register_to_config(
            latent_mean=latent_mean,
            latent_std=latent_std,
            max_tokens=max_tokens,
            default_num_tokens=default_num_tokens,
            text_max_length=text_max_length,
            text_encoder_kind=text_encoder_kind,
            default_guidance_scale=check_default_guidance_scale(default_guidance_scale),
        )

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_config``, with the module paths of pipelines saved before the ``dora_shapegen``
        namespace (``model_index.json`` naming ``vae.modeling_dora_vae``, the checkout's top-level module) mapped
        to today's, so such folders still load: diffusers imports a component's module by that name."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        for value in config.values():
            if isinstance(value, list) and len(value) == 2 and value[0] in LEGACY_MODULES:
                value[0] = LEGACY_MODULES[value[0]]
        return result

    # ------------------------------------------------------------------ model facts

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def token_limit(self) -> int | None:
        """Largest accepted ``num_tokens``: the pipeline's ``max_tokens`` if set, else the VAE's
        ``max_train_tokens`` (the most tokens its decoder was trained on; neither model has a positional table,
        so more would run, but nothing checked that they decode well)."""
        limit = self.config.max_tokens or getattr(self.vae.config, "max_train_tokens", None)
        return None if limit is None else int(limit)

    @property
    def default_num_tokens(self) -> int:
        """The pipeline's ``default_num_tokens`` (the cached latents' count), else the VAE's default."""
        return int(self.config.default_num_tokens or self.vae.config.default_num_tokens)

    @property
    def default_guidance_scale(self) -> float:
        """The pipeline's ``default_guidance_scale`` (its DiT run's preview guidance, when assembled from a run),
        else ``DEFAULT_GUIDANCE_SCALE`` (a folder saved before pipelines stored one loads with None)."""
        stored = self.config.default_guidance_scale
        return DEFAULT_GUIDANCE_SCALE if stored is None else float(stored)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return uses_guidance(self._guidance_scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def text_encoder_wrapper(self) -> TextEncoder:
        """The registered encoder + tokenizer behind the same ``encode`` the DiT was trained with (same padding,
        truncation, pooling and empty-prompt unconditional embedding)."""
        kind = self.config.text_encoder_kind or detect_kind(self.text_encoder.config)
        return TextEncoder(self.text_encoder, self.tokenizer, kind, max_length=self.config.text_max_length)

    # ------------------------------------------------------------------ steps

    def report_prompt_handling(self, prompts: list[str]) -> None:
        """Say what happens to prompts that are not read as written: an empty one gives an unconditional shape
        (the embedding the DiT saw on caption dropout), a long one is cut at the text encoder's token limit."""
        encoder = self.text_encoder_wrapper()
        limit = encoder.max_length
        for index, prompt in enumerate(prompts):
            label = "the prompt" if len(prompts) == 1 else f"prompt {index}"
            if not prompt.strip():
                logger.warning(
                    "%s is empty: generating an unconditional shape (what the model makes without text)",
                    label,
                )
                continue
            # One token more than the limit tells whether anything is cut, without tokenizing a huge prompt whole.
            ids = self.tokenizer(prompt, truncation=True, max_length=limit + 1)["input_ids"]
            if len(ids) > limit:
                kept = self.tokenizer.decode(
                    self.tokenizer(prompt, truncation=True, max_length=limit)["input_ids"],
                    skip_special_tokens=True,
                )
                logger.warning(
                    "%s (%d characters) is longer than the text encoder's %d tokens: only its beginning is read "
                    '(up to "...%s")',
                    label,
                    len(prompt),
                    limit,
                    kept[-40:],
                )

    def check_inputs(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        num_inference_steps: int,
        num_tokens: int,
        num_shapes_per_prompt: int,
        mesh_resolution: int,
        output_type: str,
        latents: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_scale: float | None = None,
        mesh_threshold: float = 0.5,
        max_faces: int | None = None,
    ) -> None:
        """The call's arguments checked (``pipelines/checks.py``); ``guidance_scale`` None is the pipeline's
        default."""
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        check_call(
            self, prompt, negative_prompt, num_inference_steps, num_tokens, num_shapes_per_prompt, mesh_resolution,
            output_type, latents, callback_on_step_end_tensor_inputs, guidance_scale, mesh_threshold, max_faces,
        )  # fmt: skip

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_shapes_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text embeddings for the DiT, repeated per shape; with CFG the batch is ``[uncond, cond]``.

        The unconditional branch uses the negative prompt, or "" (the prompt the DiT saw on CFG dropout).
        Returns ``(hidden (B',L,D), attention_mask (B',L), pooled (B',D))`` with B' = (2 if CFG else 1) * B * S
        (``diffusion.sampling.encode_prompts``, which the training previews use too).
        """
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return encode_prompts(
            self.text_encoder_wrapper(),
            prompts,
            negative_prompt,
            do_classifier_free_guidance,
            num_shapes_per_prompt,
            device,
        )

    def prepare_latents(
        self,
        batch_size: int,
        num_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        return initial_noise(
            batch_size, num_tokens, self.latent_channels, dtype, device, generator
        )  # (B, N, C)

    def unnormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT space -> VAE space with the cache manifest's per-channel statistics."""
        if self.config.latent_mean is None:
            return latents
        # The cache's own inverse, so a dead channel gets the same std floor as in training.
        stats = LatentStats(mean=np.asarray(self.config.latent_mean), std=np.asarray(self.config.latent_std))
        return stats.denormalize(latents)  # (B, N, C)

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        mesh_resolution: int = 256,
        mesh_threshold: float = 0.5,
        remove_floaters: bool = True,
    ) -> list[Any]:
        """VAE-space latents (B, N, C) -> one trimesh per item, by coarse-to-fine extraction of the VAE field.

        A shape whose field never crosses ``mesh_threshold`` gives an empty ``trimesh.Trimesh``.
        """
        return decode_meshes(self.vae, latents, mesh_resolution, mesh_threshold, remove_floaters)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        num_tokens: int | None = None,
        num_shapes_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "trimesh",
        mesh_resolution: int = 256,
        mesh_threshold: float = 0.5,
        remove_floaters: bool = True,
        max_faces: int | None = DEFAULT_MAX_FACES,
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DoraTextTo3DPipelineOutput | tuple:
        r"""Generate shapes from text.

        Args:
            prompt: one prompt or a list of prompts.
            negative_prompt: the unconditional branch of CFG (default ""); a string or one per prompt.
            num_inference_steps: Euler steps of the flow-matching ODE.
            guidance_scale: CFG weight ``w`` (``v = v_u + w (v_c - v_u)``); <= 1 disables CFG. Default:
                ``pipe.default_guidance_scale`` (the guidance the pipeline was assembled with, else 5).
            guidance_interval: ``(low, high)``: guide only at noise levels sigma in this interval (arXiv 2404.07724);
                None guides every step.
            num_tokens: latent tokens per shape (default: ``pipe.default_num_tokens``); at most ``pipe.token_limit``.
            num_shapes_per_prompt: shapes per prompt.
            generator: torch generator(s) for the initial noise; same seed -> same result.
            latents: initial noise in DiT space, (B*num_shapes_per_prompt, num_tokens, C).
            output_type: "trimesh" (meshes), "latent" (latents only, no mesh extraction) or "np" (numpy arrays).
            mesh_resolution: finest grid resolution of the mesh extraction.
            mesh_threshold: iso-level of the VAE's occupancy-like field (0.5 = surface).
            remove_floaters: drop small disconnected components after extraction.
            max_faces: reduce each mesh to at most this many faces (quadric decimation); None keeps the full
                resolution of the extraction (250k-1M faces at 256^3).
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` called after each step;
                returned "latents" / "prompt_embeds" / ... replace the pipeline's.
            callback_on_step_end_tensor_inputs: names passed in ``callback_kwargs`` (default ["latents"]).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        num_tokens = self.default_num_tokens if num_tokens is None else num_tokens
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(
            prompt, negative_prompt, num_inference_steps, num_tokens, num_shapes_per_prompt, mesh_resolution,
            output_type, latents=latents, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            guidance_scale=guidance_scale, mesh_threshold=mesh_threshold, max_faces=max_faces,
        )  # fmt: skip
        self.report_prompt_handling(string_list(prompt, "prompt"))
        self._guidance_scale = float(guidance_scale)
        guidance_interval = check_guidance_interval(guidance_interval)
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device

        # 1. Text conditioning
        prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_shapes_per_prompt, device
        )  # (B', L, D), (B', L), (B', D)
        dtype = next(self.transformer.parameters()).dtype
        prompt_embeds = prompt_embeds.to(dtype)
        pooled_prompt_embeds = pooled_prompt_embeds.to(dtype)

        # 2-4. Initial noise, timesteps and the guided Euler steps (pipelines/denoising.py, around
        #      diffusion.sampling.guided_sample, the sampler the training previews run); the callback may replace
        #      the latents and the text conditioning. Latents (B*S, N, C).
        text = TextEmbeddings(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds)
        latents = denoise(
            self, {"prompt": text}, batch_size * num_shapes_per_prompt, num_tokens, num_inference_steps,
            generator, latents, guidance_interval, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 5. Back to VAE space, then the field -> meshes.
        return finish(
            self, latents, output_type, mesh_resolution, mesh_threshold, remove_floaters, return_dict, max_faces
        )  # fmt: skip

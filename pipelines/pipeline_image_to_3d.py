"""DoraImageTo3DPipeline: an image (and, for a ``both`` model, a prompt) -> vecset latents -> Dora VAE field -> mesh.

The text pipeline's layout and steps (``DoraTextTo3DPipeline``, which this class extends): ``check_inputs``, the
conditioning, its denoising loop (``pipelines/denoising.py``, around the guided sampler of ``diffusion/sampling.py``
that `dora train-dit`'s previews run), ``decode_latents`` with the same mesh post-processing. What differs is the conditioning:

- ``condition="image"``: ``pipe(image)``; the image encoder's tokens are the DiT's context (no text encoder);
- ``condition="both"``: ``pipe(image, prompt=...)``, ``pipe(image)`` or ``pipe(prompt=...)``: a missing modality is
  what the DiT saw when it was dropped in training ("" for text, no tokens for the image).

Classifier-free guidance contrasts with "no image" (and the negative prompt, or "", for text). Images go through
``data.condition_image`` (checked, object recentred on white, as the training renders were), so a bad image is an
``ImageInputError`` (a ValueError) naming it. The image encoder is a pipeline component: the trained
``RenderEncoder`` (the CPU default) or a transformers ``Dinov2Model``; ``save_pretrained`` / ``from_pretrained``
write and read it like the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from dora_shapegen.diffusion.image_encoder import BORDER_RATIO, DINOV2_IMAGE_SIZE, ImageEncoder
from dora_shapegen.diffusion.image_encoder import KINDS as IMAGE_ENCODER_KINDS
from dora_shapegen.diffusion.modeling_render_encoder import RenderEncoder  # noqa: F401  (diffusers loads imported classes only)
from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
from dora_shapegen.diffusion.sampling import check_guidance_interval, encode_prompts, merge_embeddings
from dora_shapegen.diffusion.text_encoder import KINDS as TEXT_ENCODER_KINDS
from dora_shapegen.diffusion.text_encoder import TextEmbeddings
from dora_shapegen.pipelines.checks import check_default_guidance_scale, check_latent_stats
from dora_shapegen.pipelines.decoding import DoraTextTo3DPipelineOutput, finish
from dora_shapegen.pipelines.denoising import denoise
from dora_shapegen.pipelines.limits import DEFAULT_MAX_FACES
from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline
from dora_shapegen.vae.modeling_dora_vae import DoraVAE

IMAGE_CONDITIONS = ("image", "both")


class DoraImageTo3DPipeline(DoraTextTo3DPipeline):
    r"""Image-to-3D (and image + text to 3D) with a flow-matching ShapeDiT over Dora VAE vecset latents.

    Args:
        vae, transformer, scheduler: as :class:`DoraTextTo3DPipeline`.
        image_encoder: the trained ``RenderEncoder`` or a transformers ``Dinov2Model`` /
            ``Dinov2WithRegistersModel`` the DiT was trained with.
        text_encoder, tokenizer: the frozen text encoder of a ``condition="both"`` model; None for ``"image"``.
        latent_mean, latent_std, max_tokens, default_num_tokens, text_max_length, text_encoder_kind,
            default_guidance_scale: as the text pipeline.
        condition: ``"image"`` or ``"both"`` (the DiT run's ``condition``).
        image_size: the encoder's input size in px (None: the RenderEncoder's own, 518 for DINOv2).
        image_border_ratio: the recentring margin of input images (the renders were made with it).
        image_encoder_kind: ``"render-cnn"`` or ``"dinov2"``; None = from the component's class.
    """

    model_cpu_offload_seq = "image_encoder->text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = [
        *DoraTextTo3DPipeline._callback_tensor_inputs,
        "image_embeds",
        "image_attention_mask",
        "pooled_image_embeds",
    ]

    def __init__(
        self,
        vae: DoraVAE,
        transformer: ShapeDiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        image_encoder: torch.nn.Module,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        latent_mean: list[float] | None = None,
        latent_std: list[float] | None = None,
        max_tokens: int | None = None,
        default_num_tokens: int | None = None,
        text_max_length: int = 77,
        text_encoder_kind: str | None = None,
        condition: str = "image",
        image_size: int | None = None,
        image_border_ratio: float = BORDER_RATIO,
        image_encoder_kind: str | None = None,
        default_guidance_scale: float | None = None,
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        if condition not in IMAGE_CONDITIONS:
            raise ValueError(f"condition must be one of {IMAGE_CONDITIONS}, got {condition!r}")
        if condition == "both" and (text_encoder is None or tokenizer is None):
            raise ValueError("condition='both' needs the text_encoder and tokenizer the DiT was trained with")
        if text_encoder_kind is not None and text_encoder_kind not in TEXT_ENCODER_KINDS:
            raise ValueError(
                f"text_encoder_kind must be one of {TEXT_ENCODER_KINDS}, got {text_encoder_kind!r}"
            )
        if image_encoder_kind is not None and image_encoder_kind not in IMAGE_ENCODER_KINDS:
            raise ValueError(
                f"image_encoder_kind must be one of {IMAGE_ENCODER_KINDS}, got {image_encoder_kind!r}"
            )
        latent_mean, latent_std = check_latent_stats(latent_mean, latent_std, self.latent_channels)
        self.register_to_config(
            latent_mean=latent_mean,
            latent_std=latent_std,
            max_tokens=max_tokens,
            default_num_tokens=default_num_tokens,
            text_max_length=text_max_length,
            text_encoder_kind=text_encoder_kind,
            condition=condition,
            image_size=image_size,
            image_border_ratio=image_border_ratio,
            image_encoder_kind=image_encoder_kind,
            default_guidance_scale=check_default_guidance_scale(default_guidance_scale),
        )

    # ------------------------------------------------------------------ model facts
    def image_encoder_wrapper(self) -> ImageEncoder:
        """The registered image encoder behind the ``encode`` the DiT was trained with (same recentring, size,
        normalisation and token choice)."""
        kind = self.config.image_encoder_kind or (
            "render-cnn" if isinstance(self.image_encoder, RenderEncoder) else "dinov2"
        )
        default_size = self.image_encoder.config.image_size if kind == "render-cnn" else DINOV2_IMAGE_SIZE
        return ImageEncoder(
            self.image_encoder, kind, self.config.image_size or default_size,
            border_ratio=self.config.image_border_ratio,
        )  # fmt: skip

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _as_list(image: Any) -> list[Any]:
        """One image or a batch (list/tuple, (B, H, W, C) array, (B, C, H, W) tensor) as a list of images."""
        if isinstance(image, (list, tuple)):
            if not image:
                raise ValueError("`image` is an empty list: give at least one image")
            return list(image)
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
            return list(image)
        return [image]

    def _batch(self, images: list[Any] | None, prompts: list[str] | None) -> int:
        condition = self.config.condition
        if condition == "image" and prompts is not None:
            raise ValueError(
                "this pipeline's DiT was trained on images only (condition='image') and has no text encoder: "
                "drop `prompt`, or use a model trained with condition 'both'"
            )
        if images is None and (condition == "image" or prompts is None):
            raise ValueError(
                "`image` is required"
                + ("" if condition == "image" else " (or a `prompt`, for this 'both' model)")
            )
        if images is not None and prompts is not None and len(images) != len(prompts):
            raise ValueError(
                f"got {len(images)} images but {len(prompts)} prompts; give one prompt per image"
            )
        return len(images) if images is not None else len(prompts)

    @torch.no_grad()
    def encode_image(
        self,
        images: Sequence[Any] | None,
        batch_size: int,
        do_classifier_free_guidance: bool = True,
        num_shapes_per_prompt: int = 1,
        device: torch.device | None = None,
        names: Sequence[str] | None = None,
    ) -> TextEmbeddings:
        """Image embeddings for the DiT, repeated per shape; with CFG the batch is ``[no image, images]``.

        ``images`` None (a "both" model called with a prompt only) gives "no image" for every row. Returns
        ``(tokens (B', L, D), mask (B', L), pooled (B', D))`` with B' = (2 if CFG else 1) * B * S.
        """
        device = device or self._execution_device
        encoder = self.image_encoder_wrapper()
        dtype = next(self.image_encoder.parameters()).dtype
        empty = encoder.unconditional(batch_size, device, dtype)
        embeddings = empty if images is None else encoder.encode(images, device=device, names=names)
        if do_classifier_free_guidance:
            embeddings = merge_embeddings(empty, embeddings)  # (2B, L, D): unconditional first
        return TextEmbeddings(
            *(tensor.repeat_interleave(num_shapes_per_prompt, dim=0) for tensor in embeddings)
        )

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        prompt: str | list[str] | None = None,
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
        image_names: Sequence[str] | None = None,
    ) -> DoraTextTo3DPipelineOutput | tuple:
        r"""Generate shapes from images (and prompts, for a ``condition="both"`` model).

        Args:
            image: one image or a list: a file path, a PIL image, an (H, W, 3|4) uint8 array or a (3, H, W) tensor
                in [0, 1]; RGBA cut-outs use their alpha as the object mask.
            prompt, negative_prompt: text for a ``"both"`` model (one prompt per image); refused by ``"image"``.
            image_names: labels for the images in error messages (default: their paths).
            Everything else: as :meth:`DoraTextTo3DPipeline.__call__` (guidance contrasts with "no image"; its
                default is ``pipe.default_guidance_scale``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        images = None if image is None else self._as_list(image)
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        batch_size = self._batch(images, prompts)
        num_tokens = self.default_num_tokens if num_tokens is None else num_tokens
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(
            prompts if prompts is not None else [""] * batch_size, negative_prompt, num_inference_steps,
            num_tokens, num_shapes_per_prompt, mesh_resolution, output_type, latents=latents,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            guidance_scale=guidance_scale, mesh_threshold=mesh_threshold, max_faces=max_faces,
        )  # fmt: skip
        self._guidance_scale = float(guidance_scale)
        guidance_interval = check_guidance_interval(guidance_interval)
        self._interrupt = False
        device = self._execution_device
        dtype = next(self.transformer.parameters()).dtype
        guidance = self.do_classifier_free_guidance

        # 1. Conditioning: the image stream, and the text stream of a "both" model ("" where no prompt).
        streams = {
            "image": self.encode_image(
                images, batch_size, guidance, num_shapes_per_prompt, device, image_names
            ).to(device, dtype)  # (B', L, D), (B', L), (B', D)
        }
        if self.config.condition == "both":
            streams["prompt"] = encode_prompts(
                self.text_encoder_wrapper(), prompts or [""] * batch_size, negative_prompt, guidance,
                num_shapes_per_prompt, device,
            ).to(device, dtype)  # fmt: skip

        # 2-4. Noise, timesteps and guided steps: the text pipeline's loop (pipelines/denoising.py); an "image"
        #      model reads the image as its primary (and only) stream. Latents (B*S, N, C).
        latents = denoise(
            self, streams, batch_size * num_shapes_per_prompt, num_tokens, num_inference_steps, generator,
            latents, guidance_interval, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 5. Back to VAE space, then the field -> meshes (the text pipeline's post-processing).
        return finish(
            self, latents, output_type, mesh_resolution, mesh_threshold, remove_floaters, return_dict, max_faces
        )  # fmt: skip

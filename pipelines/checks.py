"""The argument checks both pipelines share: the latent statistics given to ``__init__`` and the arguments of a
call (``check_inputs``). A bad one is a ValueError naming it and what it may be, raised before any model runs; the
ranges are ``pipelines/limits.py``'s, which `dora generate` and the demo check too."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dora_shapegen.pipelines.limits import (
    GUIDANCE_RANGE,
    MAX_INFERENCE_STEPS,
    MESH_RESOLUTION_RANGE,
    not_text_problem,
)

OUTPUT_TYPES = ("trimesh", "latent", "np")


def string_list(value: Any, name: str) -> list[str]:
    """A prompt argument as a non-empty list of strings, or a ValueError naming the argument and the bad item."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}")
    if len(items) == 0:
        raise ValueError(f"`{name}` is an empty list: give at least one prompt")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"`{name}` items must be strings; item {index} is a {type(item).__name__}")
        problem = not_text_problem(item)
        if problem:
            raise ValueError(f"`{name}` item {index}: {problem}")
    return list(items)


def check_range(name: str, value: Any, low: float, high: float, integer: bool) -> None:
    """``value`` is a (finite) number in [low, high], an integer when ``integer``; else a ValueError with the range."""
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if integer:
        is_number = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(float(value)) or not low <= value <= high:
        low_text, high_text = (int(low), int(high)) if integer else (f"{low:g}", f"{high:g}")
        raise ValueError(f"`{name}` must be {kind} in [{low_text}, {high_text}], got {value!r}")


def check_default_guidance_scale(value: float | None) -> float | None:
    """A pipeline's stored guidance as a float (None: none stored), or a ValueError with the range ``guidance_scale``
    has, so that a pipeline never stores a default its own calls would refuse."""
    if value is None:
        return None
    check_range("default_guidance_scale", value, *GUIDANCE_RANGE, integer=False)
    return float(value)


def check_latent_stats(
    latent_mean: list[float] | None, latent_std: list[float] | None, channels: int
) -> tuple[list[float] | None, list[float] | None]:
    """The cache statistics as float lists, or a ValueError when they do not fit each other or the models."""
    if (latent_mean is None) != (latent_std is None):
        raise ValueError("latent_mean and latent_std must be given together (both from the cache manifest)")
    if latent_mean is None:
        return None, None
    latent_mean = [float(value) for value in latent_mean]
    latent_std = [float(value) for value in latent_std]
    if len(latent_mean) != len(latent_std):
        raise ValueError(f"latent_mean has {len(latent_mean)} channels but latent_std has {len(latent_std)}")
    if len(latent_mean) != channels:
        raise ValueError(f"latent statistics have {len(latent_mean)} channels but the models use {channels}")
    if min(latent_std) < 0:
        raise ValueError("latent_std must be non-negative in every channel")
    return latent_mean, latent_std


def check_call(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None,
    num_inference_steps: int,
    num_tokens: int,
    num_shapes_per_prompt: int,
    mesh_resolution: int,
    output_type: str,
    latents: torch.Tensor | None,
    callback_on_step_end_tensor_inputs: list[str] | None,
    guidance_scale: float,
    mesh_threshold: float,
    max_faces: int | None,
) -> None:
    """The arguments of a ``pipe(...)`` call, checked against each other and the pipeline's models (its
    ``check_inputs``); the first problem is a ValueError."""
    prompts = string_list(prompt, "prompt")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negatives = string_list(negative_prompt, "negative_prompt")
        if len(negatives) != len(prompts):
            raise ValueError(
                f"`negative_prompt` has {len(negatives)} items but `prompt` has {len(prompts)}; "
                "give one negative prompt per prompt or a single string"
            )
    check_range("num_inference_steps", num_inference_steps, 1, MAX_INFERENCE_STEPS, integer=True)
    check_range("mesh_resolution", mesh_resolution, *MESH_RESOLUTION_RANGE, integer=True)
    for name, value in (("num_tokens", num_tokens), ("num_shapes_per_prompt", num_shapes_per_prompt)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    check_range("guidance_scale", guidance_scale, *GUIDANCE_RANGE, integer=False)
    # The decoded field lies in [0, 1] (0.5 at the surface): a level at 0 or 1 or beyond never meets it.
    is_level = isinstance(mesh_threshold, (int, float, np.floating)) and not isinstance(mesh_threshold, bool)
    if not is_level or not 0.0 < mesh_threshold < 1.0:
        raise ValueError(f"`mesh_threshold` must be a number in (0, 1), got {mesh_threshold!r}")
    if max_faces is not None:
        check_range("max_faces", max_faces, 4, 2**31 - 1, integer=True)
    limit = pipe.token_limit
    if limit is not None and num_tokens > limit:
        raise ValueError(f"`num_tokens`={num_tokens} is beyond what the models support (at most {limit})")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if latents is not None:
        expected = (len(prompts) * num_shapes_per_prompt, num_tokens, pipe.latent_channels)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"`latents` must have shape (batch*num_shapes_per_prompt, num_tokens, channels) = {expected}, "
                f"got {got}"
            )
    if callback_on_step_end_tensor_inputs is not None:
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in pipe._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {pipe._callback_tensor_inputs}, "
                f"but found {unknown}"
            )

"""The run config of `dora train-dit`: one dataclass per section of a DiT YAML (``data:``, ``training:``,
``schedule:``, ``sampling:``, ``lora:``, ...), read by ``training.config.load_run_config``. Every key a DiT config
may hold is listed here, with its default; ``diffusion/train.py`` is the command that runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dora_shapegen.diffusion.finetune import LoraConfig
from dora_shapegen.diffusion.image_encoder import DEFAULT_IMAGE_ENCODER
from dora_shapegen.diffusion.text_encoder import DEFAULT_TEXT_ENCODER
from dora_shapegen.errors import ConfigError
from dora_shapegen.training.config import LoopConfig
from dora_shapegen.training.schedules import ScheduleConfig


@dataclass
class DataConfig:
    shards: str = (
        "runs/latents"  # latent cache folder (manifest.json + shards) or manifest URL; --shards wins
    )
    in_memory: bool = True  # read the whole cache once (small caches); false = stream resampled shards
    batch_size: int = 32  # per process and micro-step
    num_workers: int = 2  # streaming only: DataLoader workers
    shuffle_buffer: int = 1000  # streaming only: samples in webdataset's shuffle buffer
    # > 0: never train on the shapes of the benchmark's held-out split (shape-id hash, `dora bench-generation`'s
    # held_out_fraction), so image prompts rendered from them are unseen; 0 = every cached shape
    held_out_fraction: float = 0.0


@dataclass
class TrainingConfig(LoopConfig):
    """The ``training:`` section: the core's keys (optimizer, precision, EMA, checkpoints, ...) + the objective."""

    max_steps: int = 2000  # optimizer steps
    learning_rate: float = 3e-4
    use_ema: bool = True
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.1  # per-sample probability of training on "" (classifier-free guidance)
    image_dropout: float = 0.1  # condition image | both: per-sample probability of "no image" (guidance)
    timestep_sampling: str = "logit_normal"  # logit_normal | mode | uniform (diffusers.training_utils)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    scheduler_shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift of the training noise levels
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap (diffusers' SD3 weightings)
    text_max_length: int = 77


@dataclass
class SamplingConfig:
    every_steps: int = 0  # preview every N steps (0 = only at the end)
    final: bool = True  # preview after training
    prompts: list[str] = field(default_factory=list)  # empty = the first prompt of num_prompts categories
    num_prompts: int = 8
    num_tokens: int | None = None  # None = the schedule's largest token count
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    # FlowMatchEulerDiscreteScheduler shift for sampling: the previews and the scheduler exported with the model, which
    # `dora assemble-pipeline` gives the pipeline. None = training.scheduler_shift. A shift > 1 spends more of a short
    # schedule at high noise, where the layout is decided, without changing what the model learns.
    scheduler_shift: float | None = None
    mesh_resolution: int = 64
    seed: int = 0


@dataclass
class DiTTrainConfig:
    condition: str = "text"  # text | image | both (diffusion/conditioning.py)
    text_encoder: str = DEFAULT_TEXT_ENCODER  # TextEncoder.from_name argument (frozen)
    # condition image | both: render-cnn (trained with the DiT; offline CPU default) | dinov2:<folder or Hub id>
    # (frozen) | tiny-random:dinov2 (tests); ImageEncoder.from_name in diffusion/image_encoder.py
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    image_encoder_model: dict[str, Any] = field(default_factory=dict)  # RenderEncoder(**...) for render-cnn
    image_size: int | None = None  # DINOv2 input px (None: 518); the RenderEncoder's is in its model config
    model: dict[str, Any] = field(default_factory=dict)  # passed unchanged to ShapeDiT(**model)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    init_from: str | None = None  # fine-tune a trained DiT folder (diffusion/finetune.py); --init-from
    init_from_sha256: dict[str, str] | None = (
        None  # recorded by the run: sha256 of that folder's weight files
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig
    )  # rank > 0: train LoRA adapters only (needs init_from)


def sampling_shift(config: DiTTrainConfig) -> float:
    """The scheduler shift samples are drawn with: ``sampling.scheduler_shift``, else the training one."""
    key, shift = "sampling.scheduler_shift", config.sampling.scheduler_shift
    if shift is None:
        key, shift = "training.scheduler_shift", config.training.scheduler_shift
    if not 0.0 < float(shift) < float("inf"):
        raise ConfigError(f"{key} must be a positive number (1 = no shift), got {shift!r}")
    return float(shift)

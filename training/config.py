"""What the run configs and command lines of `dora train-vae` and `dora train-dit` share.

Each stage keeps its own ``TrainingConfig`` dataclass (its loss weights, its defaults); both subclass
:class:`LoopConfig`, the keys the training core (``training/loop.py``) reads. The command lines share their budget,
resume, seed and fine-tuning flags through :func:`add_run_arguments` and :func:`load_run_config`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dora_shapegen import cli_types
from dora_shapegen.config import load_config

T = TypeVar("T")


@dataclass
class LoopConfig:
    """The ``training:`` keys of every stage: optimizer, LR schedule, precision, seed, EMA, checkpoints, logs."""

    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    lr_scheduler: str = "cosine"  # any diffusers.optimization.get_scheduler name
    warmup_steps: int = 100
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    # auto = bf16 on CUDA, fp32 ("no") on CPU (bf16 is ~45x slower there); or no | fp16 | bf16
    mixed_precision: str = "auto"
    seed: int = 0
    use_ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 500  # optimizer steps; 0 = only at the end
    checkpoints_total_limit: int = 3  # newest checkpoints kept (0 = all)
    log_every: int = 10


def flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested run config as the flat ``section.key: scalar`` mapping tensorboard's hparams take (lists and
    other values as their string)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_hparams(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def add_run_arguments(
    parser: argparse.ArgumentParser, stage: str, config_example: str, budget_end: str, init_from_help: str
) -> None:
    """The flags both training commands take; ``stage`` names the default output folder (runs/<stage>_<config>)."""
    parser.add_argument("--config", required=True, help=f"YAML run config (e.g. {config_example})")
    parser.add_argument("--output-dir", default=None, help=f"run folder (default runs/{stage}_<config name>)")
    parser.add_argument(
        "--max-steps", type=cli_types.positive_int, default=None, help="override training.max_steps (>= 1)"
    )
    parser.add_argument(
        "--max-minutes",
        type=cli_types.positive_float,
        default=None,
        help=f"wall-clock budget of this invocation: then {budget_end}",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="'latest' (newest checkpoint in the output dir) or a checkpoint folder",
    )
    parser.add_argument("--seed", type=cli_types.seed, default=None, help="override training.seed")
    parser.add_argument("--init-from", default=None, help=init_from_help)
    parser.set_defaults(run_stage=stage)


def load_run_config(
    config_cls: type[T], args: argparse.Namespace, stage_overrides: dict[str, Any] | None = None
) -> tuple[T, str]:
    """(run config with the command-line overrides, output folder) for a parsed :func:`add_run_arguments` line;
    ``stage_overrides`` maps dotted config keys to flag values (None = flag not given). Sets up logging too."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    given = {"training.max_steps": args.max_steps, "training.seed": args.seed, "init_from": args.init_from}
    overrides = {key: value for key, value in (given | (stage_overrides or {})).items() if value is not None}
    config = load_config(config_cls, args.config, overrides)
    return config, args.output_dir or f"runs/{args.run_stage}_{Path(args.config).stem}"

"""`dora assemble-pipeline`: a trained VAE + DiT + its conditioners + the cache statistics -> one pipeline folder.

The folder is a standard diffusers pipeline (model_index.json + vae/ transformer/ scheduler/ text_encoder/
tokenizer/), loadable offline with ``DoraTextTo3DPipeline.from_pretrained(DIR)``. A DiT trained with
``condition: image | both`` gives a ``DoraImageTo3DPipeline`` with an ``image_encoder/`` component instead (and the
text encoder only for ``both``); ``dora_shapegen.pipelines.load_pipeline(DIR)`` opens either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from dora_shapegen import cli_types
from dora_shapegen.diffusion import DEFAULT_TEXT_ENCODER
from dora_shapegen.pipelines.limits import DEFAULT_GUIDANCE_SCALE, GUIDANCE_RANGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora assemble-pipeline",
        description="Assemble a trained Dora VAE, a trained ShapeDiT and their text encoder into a diffusers pipeline.",
    )
    parser.add_argument("--vae", required=True, help="DoraVAE folder (save_pretrained / train-vae output)")
    parser.add_argument(
        "--transformer", required=True, help="ShapeDiT folder (save_pretrained / train-dit output)"
    )
    parser.add_argument(
        "--manifest", required=True, help="latent cache manifest.json (or its folder): latent statistics"
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        help=f"text encoder the DiT was trained with (default: the one in the run_config.yaml beside the DiT, "
        f"else {DEFAULT_TEXT_ENCODER})",
    )
    parser.add_argument(
        "--scheduler-shift",
        type=cli_types.positive_float,
        default=None,
        help="FlowMatchEulerDiscreteScheduler shift (default: the scheduler the DiT run exported, with its "
        "sampling.scheduler_shift; else 1.0)",
    )
    parser.add_argument(
        "--max-tokens",
        type=cli_types.positive_int,
        default=None,
        help="largest num_tokens the pipeline accepts (default: the VAE's recorded maximum)",
    )
    parser.add_argument(
        "--num-tokens",
        type=cli_types.positive_int,
        default=None,
        help="default num_tokens at generation (default: the DiT run's sampling/schedule token "
        "count, else the token count of the cached latents)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=cli_types.float_in(*GUIDANCE_RANGE),
        default=None,
        help="classifier-free guidance scale generation uses by default, in [0, 100] (default: the DiT run's "
        f"sampling.guidance_scale, the guidance of its training previews; else {DEFAULT_GUIDANCE_SCALE:g})",
    )
    parser.add_argument(
        "--allow-vae-mismatch",
        action="store_true",
        help="accept a --vae whose weights differ from the VAE the manifest's latents came from",
    )
    parser.add_argument(
        "--image-encoder",
        default=None,
        help="image encoder of an image-conditioned DiT (default: final/image_encoder for a trained RenderEncoder, "
        "else the DINOv2 in the run config); dinov2:<folder or Hub id> or render-cnn:<folder>",
    )
    parser.add_argument("--out", required=True, help="output pipeline folder")
    return parser


# The run config `dora train-dit` writes beside its exported weights (final/run_config.yaml; checkpoints hold a
# config.yaml): it records the text encoder, its max_length and the token schedule the DiT was trained with.
RUN_RECORDS = ("run_config.yaml", "config.yaml")


def _run_record(transformer_dir: Path) -> dict[str, Any]:
    """The DiT's training run config from beside (or one level above) its folder; {} if there is none."""
    for folder in (transformer_dir, transformer_dir.parent):
        for name in RUN_RECORDS:
            path = folder / name
            if path.is_file():
                values = yaml.safe_load(path.read_text())
                if isinstance(values, dict) and "text_encoder" in values:
                    return values
    return {}


def _trained_num_tokens(record: dict[str, Any]) -> int | None:
    """Token count the DiT run sampled its previews with: sampling.num_tokens, else the schedule's largest."""
    sampled = (record.get("sampling") or {}).get("num_tokens")
    if sampled:
        return int(sampled)
    if record.get("schedule"):
        from dora_shapegen.config import from_dict
        from dora_shapegen.training.schedules import ScheduleConfig, TokenSchedule

        return TokenSchedule(from_dict(ScheduleConfig, record["schedule"], "run config schedule")).max_tokens
    return None


def _trained_guidance_scale(record: dict[str, Any]) -> float | None:
    """Guidance the DiT run sampled its previews with (sampling.guidance_scale), or None when it records none."""
    guidance = (record.get("sampling") or {}).get("guidance_scale")
    if guidance is None:
        return None
    from dora_shapegen.pipelines.checks import check_range

    try:
        check_range("sampling.guidance_scale", guidance, *GUIDANCE_RANGE, integer=False)
    except ValueError as error:
        raise ValueError(f"the DiT's run record: {error}; pass --guidance-scale") from None
    return float(guidance)


def _scheduler(transformer_dir: Path, shift: float | None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    for candidate in (transformer_dir / "scheduler", transformer_dir.parent / "scheduler"):
        if (candidate / "scheduler_config.json").is_file():
            overrides = {} if shift is None else {"shift": shift}
            return FlowMatchEulerDiscreteScheduler.from_pretrained(candidate, **overrides)
    return FlowMatchEulerDiscreteScheduler(shift=1.0 if shift is None else shift)


def decoder_fine_tune_of(vae_dir: Path, weights_sha256: Any) -> bool:
    """Whether ``vae_dir`` is a decoder-only fine-tune (`dora train-vae --init-from` with ``training.trainable:
    decoder``) of the VAE with these weights: its encoder is that VAE's, so latents cached with it stay valid."""
    path = vae_dir / "run_config.yaml"
    if not path.is_file():
        return False
    record = yaml.safe_load(path.read_text()) or {}
    # No recorded weights (a cache without a VAE identity) match no run, not even one that records none.
    if not weights_sha256 or not isinstance(record, dict):
        return False
    trainable = (record.get("training") or {}).get("trainable")
    return trainable == "decoder" and record.get("init_from_sha256") == weights_sha256


def assemble(
    vae_dir: str | Path,
    transformer_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    text_encoder: str | None = None,
    scheduler_shift: float | None = None,
    max_tokens: int | None = None,
    num_tokens: int | None = None,
    allow_vae_mismatch: bool = False,
    image_encoder: str | None = None,
    guidance_scale: float | None = None,
) -> Any:
    """Build, check and save the pipeline (a DoraImageTo3DPipeline when the DiT run's ``condition`` is ``image``
    or ``both``); returns it. ``guidance_scale``: the pipeline's default guidance (None: the DiT run's
    ``sampling.guidance_scale``, if its run record has one)."""
    from dora_shapegen.data.latent_shards import LatentStats, load_manifest
    from dora_shapegen.diffusion import ShapeDiT
    from dora_shapegen.diffusion.text_encoder import TextEncoder
    from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline
    from dora_shapegen.vae import DoraVAE

    transformer_dir = Path(transformer_dir)
    manifest_path = Path(manifest)
    info = load_manifest(manifest_path)  # cheap checks first
    stats = LatentStats.from_manifest(info)
    vae = DoraVAE.from_pretrained(vae_dir)
    recorded = (info.get("vae") or {}).get("weights_sha256")
    if recorded and not allow_vae_mismatch:
        from dora_shapegen.vae.cache_latents import vae_identity

        actual = vae_identity(Path(vae_dir), vae)["weights_sha256"]
        if actual != recorded and not decoder_fine_tune_of(Path(vae_dir), recorded):
            raise ValueError(
                f"{manifest_path}: the cached latents (and the DiT trained on them) come from a VAE with weights "
                f"{recorded}, but --vae {vae_dir} has {actual}; pass the same VAE (or --allow-vae-mismatch)"
            )
    transformer = ShapeDiT.from_pretrained(transformer_dir)
    record = _run_record(transformer_dir)
    if guidance_scale is None:
        guidance_scale = _trained_guidance_scale(record)
    if record.get("condition", "text") != "text":
        pipe = _image_pipeline(
            vae, transformer, transformer_dir, record, stats, info, text_encoder, image_encoder, scheduler_shift,
            max_tokens, num_tokens, guidance_scale,
        )  # fmt: skip
        pipe.save_pretrained(out_dir)
        return pipe
    name = text_encoder or record.get("text_encoder") or DEFAULT_TEXT_ENCODER
    max_length = int((record.get("training") or {}).get("text_max_length", 77))
    encoder = TextEncoder.from_name(name, max_length=max_length)

    channels = transformer.config.in_channels
    if len(stats.mean) != channels:
        raise ValueError(
            f"{manifest_path}: the cached latents have {len(stats.mean)} channels but the DiT expects {channels}"
        )
    if encoder.hidden_size != transformer.config.cross_attention_dim:
        raise ValueError(
            f"text encoder {name!r} gives {encoder.hidden_size}-d tokens but the DiT's cross_attention_dim is "
            f"{transformer.config.cross_attention_dim}; pass the --text-encoder the DiT was trained with"
        )
    pooled_dim = transformer.config.pooled_projection_dim
    if pooled_dim is not None and encoder.pooled_size != pooled_dim:
        raise ValueError(
            f"text encoder {name!r} gives a {encoder.pooled_size}-d pooled vector but the DiT's "
            f"pooled_projection_dim is {pooled_dim}; pass the --text-encoder the DiT was trained with"
        )
    if vae.config.latent_channels != channels:
        raise ValueError(
            f"the VAE has {vae.config.latent_channels} latent channels but the DiT expects {channels}"
        )
    pipe = DoraTextTo3DPipeline(
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(transformer_dir, scheduler_shift),
        text_encoder=encoder.model,
        tokenizer=encoder.tokenizer,
        latent_mean=[float(value) for value in stats.mean],
        latent_std=[float(value) for value in stats.std],
        max_tokens=max_tokens,
        default_num_tokens=num_tokens or _trained_num_tokens(record) or info.get("num_tokens"),
        text_max_length=encoder.max_length,
        text_encoder_kind=encoder.kind,
        default_guidance_scale=guidance_scale,
    )
    pipe.save_pretrained(out_dir)
    return pipe


def _image_pipeline(
    vae: Any,
    transformer: Any,
    transformer_dir: Path,
    record: dict[str, Any],
    stats: Any,
    info: dict[str, Any],
    text_encoder: str | None,
    image_encoder: str | None,
    scheduler_shift: float | None,
    max_tokens: int | None,
    num_tokens: int | None,
    guidance_scale: float | None,
) -> Any:
    """A DoraImageTo3DPipeline for an image (or image + text) DiT: its image encoder is the trained RenderEncoder
    beside the weights (``final/image_encoder``) or the DINOv2 named in the run config (``--image-encoder`` to
    point elsewhere)."""
    from dora_shapegen.diffusion.conditioning import IMAGE_ENCODER_FOLDER, check_dit_fits
    from dora_shapegen.diffusion.image_encoder import ImageEncoder
    from dora_shapegen.diffusion.text_encoder import TextEncoder
    from dora_shapegen.pipelines.pipeline_image_to_3d import DoraImageTo3DPipeline

    condition = record["condition"]
    name = image_encoder or record.get("image_encoder") or "render-cnn"
    if name == "render-cnn":
        trained = transformer_dir / IMAGE_ENCODER_FOLDER
        if not (trained / "config.json").is_file():
            raise FileNotFoundError(
                f"{transformer_dir}: the DiT was trained with a RenderEncoder but {trained} holds none; pass the "
                "run's final/ folder (or --image-encoder render-cnn:<folder>)"
            )
        name = f"render-cnn:{trained}"
    images = ImageEncoder.from_name(name, image_size=record.get("image_size"))
    text = None
    if condition == "both":
        max_length = int((record.get("training") or {}).get("text_max_length", 77))
        text = TextEncoder.from_name(text_encoder or record.get("text_encoder"), max_length=max_length)
    check_dit_fits(transformer.config, condition, text, images)
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"the VAE has {vae.config.latent_channels} latent channels but the DiT expects "
            f"{transformer.config.in_channels}"
        )
    return DoraImageTo3DPipeline(
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(transformer_dir, scheduler_shift),
        image_encoder=images.model,
        text_encoder=text.model if text else None,
        tokenizer=text.tokenizer if text else None,
        latent_mean=[float(value) for value in stats.mean],
        latent_std=[float(value) for value in stats.std],
        max_tokens=max_tokens,
        default_num_tokens=num_tokens or _trained_num_tokens(record) or info.get("num_tokens"),
        text_max_length=text.max_length if text else 77,
        text_encoder_kind=text.kind if text else None,
        condition=condition,
        image_size=images.image_size,
        image_border_ratio=images.border_ratio,
        image_encoder_kind=images.kind,
        default_guidance_scale=guidance_scale,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, path in (
        ("--vae", args.vae),
        ("--transformer", args.transformer),
        ("--manifest", args.manifest),
    ):
        if not Path(path).exists():
            print(f"dora assemble-pipeline: {flag} {path} does not exist", file=sys.stderr)
            return 2
    try:
        assemble(
            args.vae,
            args.transformer,
            args.manifest,
            args.out,
            text_encoder=args.text_encoder,
            scheduler_shift=args.scheduler_shift,
            max_tokens=args.max_tokens,
            num_tokens=args.num_tokens,
            allow_vae_mismatch=args.allow_vae_mismatch,
            image_encoder=args.image_encoder,
            guidance_scale=args.guidance_scale,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"dora assemble-pipeline: {error}", file=sys.stderr)
        return 2
    print(f"wrote pipeline to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

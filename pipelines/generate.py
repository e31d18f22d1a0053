"""`dora generate "prompt" --pipeline DIR -o out.glb`: text -> mesh file(s) + a preview PNG beside them.

`dora generate --image photo.png --pipeline DIR -o out.glb` does the same from an image with an image-conditioned
pipeline (``DoraImageTo3DPipeline``; with a ``both`` model a prompt may be given too); the preview then shows the
input (as the model saw it: recentred on white) beside each mesh. A bad image is refused with its reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dora_shapegen import cli_types
from dora_shapegen.pipelines.limits import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_MAX_FACES,
    GUIDANCE_RANGE,
    MAX_INFERENCE_STEPS,
    MAX_SHAPES,
    not_text_problem,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora generate",
        description="Generate mesh(es) from a text prompt or an image with a saved pipeline.",
    )
    parser.add_argument(
        "prompt", nargs="?", default=None, help="what to generate, e.g. 'a round table with one central leg'"
    )
    parser.add_argument(
        "--image",
        default=None,
        help="an image to generate from (PNG/JPEG; an RGBA cut-out's alpha is the object mask), for an "
        "image-conditioned pipeline",
    )
    parser.add_argument("--pipeline", required=True, help="folder written by `dora assemble-pipeline`")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="mesh path; the extension picks the format (.glb/.obj/.ply/.stl)",
    )
    parser.add_argument(
        "--negative-prompt", default=None, help="unconditional branch of CFG (default: empty prompt)"
    )
    parser.add_argument(
        "--steps",
        type=cli_types.int_in(1, MAX_INFERENCE_STEPS),
        default=30,
        help="Euler steps of the flow ODE (default 30)",
    )
    parser.add_argument(
        "--guidance",
        type=cli_types.float_in(*GUIDANCE_RANGE),
        default=None,
        help="classifier-free guidance scale in [0, 100] (<=1 disables; default: the pipeline's stored "
        f"guidance, else {DEFAULT_GUIDANCE_SCALE:g})",
    )
    parser.add_argument(
        "--tokens",
        type=cli_types.positive_int,
        default=None,
        help="latent tokens per shape, up to the pipeline's limit (default: the pipeline's)",
    )
    parser.add_argument("--seed", type=cli_types.seed, default=0, help="random seed (same seed, same shapes)")
    parser.add_argument(
        "--num",
        type=cli_types.int_in(1, MAX_SHAPES),
        default=1,
        help=f"number of shapes, up to {MAX_SHAPES}; several are written as NAME_<i>.EXT",
    )
    parser.add_argument(
        "--resolution",
        type=cli_types.resolution,
        default=256,
        help="finest grid resolution of mesh extraction, in [16, 1024] (default 256)",
    )
    parser.add_argument(
        "--threshold",
        type=cli_types.float_in(0.0, 1.0, low_open=True, high_open=True),
        default=0.5,
        help="iso-level of the occupancy field, in (0, 1) (default 0.5)",
    )
    parser.add_argument(
        "--faces",
        type=cli_types.int_in(4, also=(0,)),
        default=DEFAULT_MAX_FACES,
        help=f"reduce each mesh to at most this many faces (default {DEFAULT_MAX_FACES:,}); 0 keeps the full "
        "resolution of the extraction",
    )
    parser.add_argument("--keep-floaters", action="store_true", help="keep small disconnected components")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="DIR[:SCALE]",
        help="a LoRA adapter folder from `dora train-dit` (lora.rank > 0) with an optional scale "
        "(default 1.0); repeat to combine adapters",
    )
    return parser


def parse_lora(spec: str) -> tuple[Path, float]:
    """``DIR[:SCALE]`` -> (folder, scale); the scale is whatever follows the last colon, when it is a number."""
    folder, _, scale = spec.rpartition(":")
    if folder:
        try:
            return Path(folder), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def load_loras(pipe: Any, specs: list[str], transformer_dir: Path | None = None) -> list[str]:
    """Load each ``--lora DIR[:SCALE]`` into the pipeline's transformer and activate them all with their scales;
    returns the adapter names. A folder without an adapter file is a ValueError naming it. With the pipeline's
    ``transformer_dir``, an adapter whose run recorded other base weights (``init_from_sha256``) is warned about."""
    import yaml

    from dora_shapegen.diffusion.finetune import ADAPTER_FILE
    from dora_shapegen.provenance import weight_hashes

    base = weight_hashes(transformer_dir) if transformer_dir is not None else None
    names, scales = [], []
    for index, spec in enumerate(specs):
        folder, scale = parse_lora(spec)
        if not (folder / ADAPTER_FILE).is_file():
            raise ValueError(f"--lora {spec}: {folder} holds no LoRA adapter ({ADAPTER_FILE})")
        record = folder / "run_config.yaml"
        trained_on = (
            (yaml.safe_load(record.read_text()) or {}).get("init_from_sha256") if record.is_file() else None
        )
        if base and trained_on and trained_on != base:
            logger.warning(
                "--lora %s was trained on DiT weights %s, but this pipeline's transformer is %s: "
                "the adapter may not fit it",
                spec,
                trained_on,
                base,
            )
        name = f"lora{index}_{folder.parent.name if folder.name == 'final' else folder.name}"
        pipe.load_lora_weights(str(folder), adapter_name=name)
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, scales)
    return names


def _check_conditions(args: argparse.Namespace, takes_images: bool, reads_prompts: bool) -> str | None:
    """What is wrong with the prompt / --image given for this pipeline, or None."""
    if args.image is None and args.prompt is None:
        return "give a prompt" + (" or --image" if takes_images else "")
    if args.image is not None and not takes_images:
        return f"{args.pipeline} is a text-to-3D pipeline: it takes a prompt, not --image"
    if args.prompt is not None and not reads_prompts:
        return f"{args.pipeline} was trained on images only (condition image): give --image without a prompt"
    if takes_images and args.image is None and not reads_prompts:
        return "this pipeline needs --image"
    return None


def output_paths(output: Path, count: int) -> list[Path]:
    """One path per shape: ``output`` itself for one shape, ``stem_<i>.ext`` beside it for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index}{output.suffix}") for index in range(count)]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and what is wrong; a code, not an exit
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dora_shapegen.pipelines.mesh_post import EXPORT_FORMATS

    output = Path(args.output)
    if output.suffix.lower() not in EXPORT_FORMATS:
        print(
            f"dora generate: --output {output} must end with one of {', '.join(EXPORT_FORMATS)}",
            file=sys.stderr,
        )
        return 2
    for name, text in (("the prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        problem = not_text_problem(text) if text is not None else None
        if problem:
            print(f"dora generate: {name}: {problem}", file=sys.stderr)
            return 2
    pipeline_dir = Path(args.pipeline)
    if not (pipeline_dir / "model_index.json").is_file():
        print(f"dora generate: {pipeline_dir} is not a saved pipeline (no model_index.json)", file=sys.stderr)
        return 2

    import torch

    from dora_shapegen.pipelines.loading import is_image_pipeline, load_pipeline, takes_prompts
    from dora_shapegen.pipelines.mesh_post import export_mesh, render_grid_png, render_mesh_png

    try:
        pipe = load_pipeline(pipeline_dir, args.device)
    except ValueError as error:
        print(f"dora generate: {error}", file=sys.stderr)
        return 2
    problem = _check_conditions(args, is_image_pipeline(pipe), takes_prompts(pipe))
    if problem:
        print(f"dora generate: {problem}", file=sys.stderr)
        return 2
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    inputs = {"prompt": args.prompt} if args.image is None else {"image": args.image, "prompt": args.prompt}
    try:
        for name in load_loras(pipe, args.lora, pipeline_dir / "transformer"):
            print(f"LoRA adapter {name} loaded")
        result = pipe(
            **inputs,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_tokens=args.tokens,
            num_shapes_per_prompt=args.num,
            generator=generator,
            mesh_resolution=args.resolution,
            mesh_threshold=args.threshold,
            remove_floaters=not args.keep_floaters,
            max_faces=args.faces or None,
        )
    except ValueError as error:
        print(f"dora generate: {error}", file=sys.stderr)
        return 2

    output.parent.mkdir(parents=True, exist_ok=True)
    meshes = []
    written = 0
    for index, (mesh, path) in enumerate(zip(result.meshes, output_paths(output, len(result.meshes)))):
        if len(mesh.faces) == 0:
            # An empty mesh is no valid file in any of the formats: report it, keep going with the others.
            logger.warning(
                "shape %d: the field never crosses %.3f, so its mesh is empty; %s not written",
                index,
                args.threshold,
                path,
            )
            meshes.append(mesh)
            continue
        export_mesh(mesh, path)
        meshes.append(mesh)
        written += 1
        extracted = mesh.metadata.get("extracted_faces", len(mesh.faces))
        reduced = (
            f", reduced from {extracted} (--faces 0 keeps them all)" if extracted > len(mesh.faces) else ""
        )
        print(f"wrote {path} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces{reduced})")

    preview = output.with_suffix(".png")
    # The image's name for an image, else the prompt; an empty prompt (an unconditional shape) says so.
    label = (
        Path(args.image).name if args.image is not None else (args.prompt or "(empty prompt: unconditional)")
    )
    if args.image is not None:  # the input as the model saw it, beside each mesh
        from dora_shapegen.data.render import render_pairs_png

        seen = pipe.image_encoder_wrapper().load_images(args.image, [args.image])[0].numpy()  # (S, S, 3)
        render_pairs_png(
            [seen] * len(meshes), meshes, preview, [f"{label} #{index}" for index in range(len(meshes))]
        )
    elif len(meshes) == 1:
        render_mesh_png(meshes[0], preview, title=label)
    else:
        render_grid_png(meshes, preview, titles=[f"{label} #{index}" for index in range(len(meshes))])
    print(f"wrote {preview}")
    if written == 0:
        print(
            "dora generate: every generated mesh was empty (try another --seed or --threshold)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""`dora bench-generation`: judge a text- or image-to-3D pipeline's shapes the way the field does.

    dora bench-generation --pipeline outputs/quickstart/pipeline --out outputs/quickstart/bench_generation \
        [--reference PREPARED | MESH_FOLDER | INDEX | builtin:N] [--split held-out|train|all] \
        [--prompts captions configs/bench_generation/paraphrases.jsonl renders] [--views-per-shape 1] \
        [--samples-per-prompt 4] [--steps 25 --guidance G --tokens N --seed 0 --resolution 96 --device cpu|cuda] \
        [--config YAML]

For every prompt set (``captions``: training-style captions of the reference shapes, one or more per category; a
.txt / .jsonl prompt file, JSONL rows ``{"prompt", "category"}``; or ``renders``: image prompts, renders of each
evaluated reference shape, ``pipelines/bench/images.py``) it samples ``samples_per_prompt`` shapes per
prompt in batches, extracts each mesh, and measures (``pipelines/bench/metrics.py`` has the protocol):

- distribution: 1-NNA, COV, MMD with Chamfer (and exact EMD on a small point count) against the reference split,
  overall and per category;
- text following: the category a k-NN judge on Chamfer distance (fitted on the reference set's training part, its
  own held-out accuracy reported beside) gives each sample, against the prompt's category;
- structure: one connected component or not, share of volume (or area) in floaters, empty or failed, watertight,
  face count;
- image prompts also: Chamfer distance and F-score to the shape each image was rendered from, and category
  accuracy against that shape's category.

Outputs in OUT: ``results.json``, ``results.md`` (with the per-category table), ``contact_sheet_<set>.png``. From
Python, :func:`run_generation_bench` returns the results dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_shapegen import cli_types
from dora_shapegen.config import CONFIG_DIR, from_dict, load_yaml
from dora_shapegen.diffusion.sampling import check_guidance_interval
from dora_shapegen.pipelines.bench.data import (
    CAPTIONS,
    SPLITS,
    PromptItem,
    ReferenceShape,
    load_prompt_set,
    load_reference,
    select_split,
)
from dora_shapegen.pipelines.bench.images import (
    DEFAULT_FSCORE_THRESHOLDS,
    RENDERS,
    load_render_prompts,
    source_metrics,
)
from dora_shapegen.pipelines.bench.metrics import (
    CloudSet,
    category_spread,
    chamfer_matrix,
    emd_matrix,
    fit_judge,
    mesh_cloud,
    mesh_structure,
    prompt_diversity,
)
from dora_shapegen.pipelines.checks import check_range
from dora_shapegen.pipelines.limits import DEFAULT_GUIDANCE_SCALE, GUIDANCE_RANGE, MAX_INFERENCE_STEPS
from dora_shapegen.seeding import derive_seed

logger = logging.getLogger(__name__)

DEFAULT_PARAPHRASES = CONFIG_DIR / "bench_generation" / "paraphrases.jsonl"


@dataclass
class GenerationBenchConfig:
    reference: str | None = None  # None: the quickstart layout's PIPELINE/../prepared
    split: str = "held-out"  # reference shapes the generated set is compared with (SPLITS)
    held_out_fraction: float = 0.1  # shape-id hash split, as the VAE configs' data.val_fraction
    prompts: list[str] = field(default_factory=lambda: [CAPTIONS, str(DEFAULT_PARAPHRASES)])
    prompts_per_category: int = 1
    samples_per_prompt: int = 4
    steps: int = 25
    guidance: float | None = None  # None: the pipeline's default_guidance_scale; results record the one used
    guidance_interval: list[float] | None = (
        None  # (low, high) noise levels where guidance applies; None = all
    )
    threshold: float = 0.5  # iso-level of the extraction (the VAE's occupancy-like field)
    tokens: int | None = None  # None: the pipeline's default token count
    seed: int = 0
    resolution: int = 96  # finest grid of the mesh extraction
    # False: judge the raw extraction; the pipeline's own post-processing hides small fragments, and the structure
    # figures are about what the model makes.
    remove_floaters: bool = False
    batch_size: int = 8
    device: str | None = None  # None: cuda when available, else cpu
    points: int = 2048  # surface samples per shape (PointFlow's 2048)
    emd_points: int = 256  # exact EMD on this many of them; 0 = no EMD
    judge_k: int = 3
    save_meshes: bool = False  # also write OUT/meshes/<set>/<index>.glb
    contact_sheet_columns: int = 8
    contact_sheet_size: int = 160
    # Image prompts (prompt set "renders", pipelines/bench/images.py): renders per evaluated shape, F-score taus.
    views_per_shape: int = 1
    fscore_thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_FSCORE_THRESHOLDS))


def check_config(config: GenerationBenchConfig) -> None:
    """A ValueError naming the first bad setting."""
    positive = (
        "prompts_per_category",
        "samples_per_prompt",
        "steps",
        "resolution",
        "batch_size",
        "points",
        "judge_k",
        "contact_sheet_columns",
        "contact_sheet_size",
        "views_per_shape",
    )
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.tokens is not None and config.tokens < 1:
        raise ValueError(f"tokens must be positive, got {config.tokens}")
    if config.emd_points < 0:
        raise ValueError(f"emd_points must be >= 0, got {config.emd_points}")
    if config.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {config.split!r}")
    if not config.prompts:
        raise ValueError(
            "prompts: give at least one prompt set ('captions', 'renders' or a .txt / .jsonl file)"
        )
    if config.guidance is not None:
        check_range("guidance", config.guidance, *GUIDANCE_RANGE, integer=False)
    check_guidance_interval(config.guidance_interval)
    if not 0.0 < config.threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), the occupancy field's range, got {config.threshold}")
    if not config.fscore_thresholds or min(config.fscore_thresholds) <= 0:
        raise ValueError(f"fscore_thresholds must be positive, got {config.fscore_thresholds}")


def _resolve_reference(pipeline_dir: Path | None, reference: str | None) -> str:
    if reference:
        return reference
    if pipeline_dir is None:
        raise ValueError(
            "reference: give a reference set when passing a loaded pipeline (no folder to look beside)"
        )
    default = pipeline_dir.parent / "prepared"
    if not default.is_dir():
        raise ValueError(
            f"no reference set given and {default} (the quickstart layout's training data) does not "
            "exist: pass --reference PREPARED | MESH_FOLDER | INDEX | builtin:N"
        )
    return str(default)


def load_pipeline(pipeline_dir: str | Path, device: str | None = None) -> Any:
    """The saved pipeline (text- or image-to-3D) on ``device``; a ValueError naming the folder when it is not one."""
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(
            f"pipeline {pipeline_dir}: not a saved pipeline (no model_index.json); "
            "make one with `dora assemble-pipeline`"
        )
    from dora_shapegen.pipelines.loading import load_pipeline as load_saved

    pipe = load_saved(pipeline_dir, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_kind(pipeline: Any) -> tuple[bool, bool]:
    """(takes images, reads prompts) of a pipeline folder or a loaded pipeline, without loading a folder's models."""
    from dora_shapegen.pipelines.loading import is_image_pipeline, pipeline_class, takes_prompts

    if not isinstance(pipeline, (str, Path)):
        return is_image_pipeline(pipeline), takes_prompts(pipeline)
    if pipeline_class(pipeline).__name__ == "DoraTextTo3DPipeline":
        return False, True
    import json

    condition = json.loads((Path(pipeline) / "model_index.json").read_text()).get("condition")
    return True, condition == "both"


def _prompt_specs(config: GenerationBenchConfig, takes_images: bool, reads_prompts: bool) -> list[str]:
    """The prompt sets to run: an image-only pipeline given the default (text) sets runs the renders instead;
    sets the pipeline cannot read are a ValueError."""
    default = GenerationBenchConfig().prompts
    if takes_images and not reads_prompts and list(config.prompts) == default:
        logger.info("an image-only pipeline: judging it on the '%s' prompt set", RENDERS)
        return [RENDERS]
    for spec in config.prompts:
        if spec == RENDERS and not takes_images:
            raise ValueError(
                f"prompt set '{RENDERS}' needs an image-conditioned pipeline; this one reads text"
            )
        if spec != RENDERS and not reads_prompts:
            raise ValueError(
                f"prompt set {spec!r} is text, but the pipeline was trained on images only (condition image); "
                f"use --prompts {RENDERS}"
            )
    return list(config.prompts)


# ---------------------------------------------------------------------------------------------- sampling
def _sample_seed(seed: int, prompt: str, sample_index: int) -> int:
    # Per prompt text and sample, so a shape depends neither on the batch size nor on the other prompts of the run
    # (a later run with more prompts per category reproduces the shapes of the prompts it shares).
    return derive_seed(seed, prompt, sample_index)


def generate_meshes(
    pipe: Any, requests: list[dict[str, Any]], config: GenerationBenchConfig
) -> list[dict[str, Any]]:
    """Each request (``prompt``, ``seed``) -> itself plus ``mesh`` (None if it failed) and ``error``.

    Denoising runs in batches; meshes are extracted one by one so one failing extraction costs one sample.
    """
    import torch
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(requests), desc="bench-generation", unit="shape") as progress:
        for batch in _batches(requests, config.batch_size):
            generators = [torch.Generator().manual_seed(r["seed"]) for r in batch]
            if batch[0].get("image") is not None:
                inputs = {"image": [r["image"] for r in batch], "image_names": [r["prompt"] for r in batch]}
            else:  # a text pipeline, or text prompts for a "both" model
                inputs = {"prompt": [r["prompt"] for r in batch]}
            try:
                latents = pipe(
                    **inputs,
                    num_inference_steps=config.steps,
                    guidance_scale=config.guidance,
                    guidance_interval=config.guidance_interval,
                    num_tokens=config.tokens,
                    generator=generators,
                    output_type="latent",
                ).latents  # (b, N, C) in VAE space
            except Exception as error:  # a batch job logs, skips and goes on
                logger.warning("sampling failed for prompts %s: %s", [r["prompt"] for r in batch], error)
                results += [
                    {**r, "mesh": None, "error": f"sampling: {type(error).__name__}: {error}"} for r in batch
                ]
                progress.update(len(batch))
                continue
            for request, latent in zip(batch, latents):
                try:
                    mesh = pipe.decode_latents(
                        latent[None],
                        mesh_resolution=config.resolution,
                        mesh_threshold=config.threshold,
                        remove_floaters=config.remove_floaters,
                    )[0]
                    results.append({**request, "mesh": mesh, "error": None})
                except Exception as error:
                    logger.warning("mesh extraction failed for %r: %s", request["prompt"], error)
                    results.append(
                        {**request, "mesh": None, "error": f"extraction: {type(error).__name__}: {error}"}
                    )
                progress.update(1)
    return results


def _batches(requests: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Consecutive batches of at most ``size`` requests, never mixing image and text prompts."""
    batches: list[list[dict[str, Any]]] = []
    for request in requests:
        is_image = request.get("image") is not None
        last = batches[-1] if batches else None
        if last is None or len(last) == size or (last[0].get("image") is not None) != is_image:
            batches.append([])
        batches[-1].append(request)
    return batches


# ---------------------------------------------------------------------------------------------- evaluation
def _distance_matrices(generated: CloudSet, reference: CloudSet, emd_points: int) -> dict[str, tuple]:
    matrices = {
        "CD": (
            chamfer_matrix(generated, generated, symmetric=True),
            chamfer_matrix(generated, reference),
            chamfer_matrix(reference, reference, symmetric=True),
        )
    }
    if emd_points:
        matrices["EMD"] = (
            emd_matrix(generated, generated, emd_points, symmetric=True),
            emd_matrix(generated, reference, emd_points),
            emd_matrix(reference, reference, emd_points, symmetric=True),
        )
    return matrices


def _fit_judge(shapes: list[ReferenceShape], k: int) -> Any:
    labelled = [s for s in shapes if s.category]
    train = [s for s in labelled if not s.held_out]
    held = [s for s in labelled if s.held_out]
    return fit_judge(
        [s.cloud for s in train],
        [s.category for s in train],
        [s.cloud for s in held],
        [s.category for s in held],
        k=k,
    )


def run_generation_bench(
    pipeline: str | Path | Any,
    out: str | Path | None = None,
    config: GenerationBenchConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Sample, measure and (with ``out``) write results.json / results.md / contact sheets; returns the results.

    ``pipeline``: a saved pipeline folder or a loaded ``DoraTextTo3DPipeline`` / ``DoraImageTo3DPipeline`` (an
    image-only pipeline runs the ``renders`` prompt set unless told otherwise). ``overrides``: any
    :class:`GenerationBenchConfig` field, e.g. ``run_generation_bench("PIPE", "OUT", samples_per_prompt=2)``.
    Bad input raises a ValueError naming the item.
    """
    from dora_shapegen.pipelines.bench.report import evaluate_samples, write_outputs

    config = dataclasses.replace(config or GenerationBenchConfig(), **overrides)
    check_config(config)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    pipeline_dir = Path(pipeline) if isinstance(pipeline, (str, Path)) else None
    if pipeline_dir is not None and not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(
            f"pipeline {pipeline_dir}: not a saved pipeline (no model_index.json); "
            "make one with `dora assemble-pipeline`"
        )
    config = dataclasses.replace(config, prompts=_prompt_specs(config, *_pipeline_kind(pipeline)))
    reference_source = _resolve_reference(pipeline_dir, config.reference)
    shapes = load_reference(reference_source, config.points, config.held_out_fraction, config.seed)
    evaluated = select_split(shapes, config.split)
    if not evaluated:
        raise ValueError(f"reference set {reference_source}: its {config.split} split is empty")
    prompt_sets: list[tuple[str, list[PromptItem]]] = [
        (RENDERS, load_render_prompts(reference_source, evaluated, config.views_per_shape))
        if spec == RENDERS
        else load_prompt_set(spec, shapes, evaluated, config.prompts_per_category, reference_source)
        for spec in config.prompts
    ]
    names = [name for name, _ in prompt_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"prompt sets must have distinct names (file stems), got {names}")
    wants_judge = any(item.category for _, items in prompt_sets for item in items)
    judge = _fit_judge(shapes, config.judge_k) if wants_judge else None
    timings["reference_and_judge"] = time.perf_counter() - clock

    clock = time.perf_counter()
    pipe = load_pipeline(pipeline_dir, config.device) if pipeline_dir is not None else pipeline
    if config.guidance is None:  # the settings written with the results name the guidance the samples had
        config = dataclasses.replace(config, guidance=pipe.default_guidance_scale)
    requests = [
        {
            "set": name,
            "prompt": item.prompt,
            "category": item.category,
            "prompt_index": p,
            "sample": s,
            "seed": _sample_seed(config.seed, item.prompt, s),
            "image": item.image,
            "source_index": item.source_index,
        }
        for name, items in prompt_sets
        for p, item in enumerate(items)
        for s in range(config.samples_per_prompt)
    ]
    samples = generate_meshes(pipe, requests, config)
    timings["generation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    for index, sample in enumerate(samples):
        sample.update(mesh_structure(sample["mesh"]))
        sample["cloud"] = mesh_cloud(
            sample["mesh"], config.points, derive_seed(config.seed, "bench-sample-cloud", index)
        )
    made = [s for s in samples if s["cloud"] is not None]
    generated = CloudSet([s["cloud"] for s in made])
    reference = CloudSet([s.cloud for s in evaluated])
    matrices = _distance_matrices(generated, reference, config.emd_points) if made else {}
    if judge is not None and made:
        for sample, verdict in zip(made, judge.predict(generated)):
            sample["judged"] = verdict
    if made and judge is not None:  # diversity: samples of one prompt against real shapes of its category
        spread = category_spread(judge.gallery, judge.categories)
        ratios = prompt_diversity(
            matrices["CD"][0],
            [(s["set"], s["prompt_index"]) for s in made],
            [s["category"] for s in made],
            spread,
        )
        for sample, ratio in zip(made, ratios):
            sample["diversity"] = ratio
    for sample in samples:  # image prompts: fidelity to the shape the image was rendered from
        if sample["source_index"] is not None:
            source = evaluated[sample["source_index"]]
            sample["source"] = source.shape_id
            sample.update(source_metrics(sample["cloud"], source.cloud, config.fscore_thresholds))
    results = evaluate_samples(samples, made, evaluated, matrices, prompt_sets, judge, config)
    timings["metrics"] = time.perf_counter() - clock
    results.update(
        pipeline=str(pipeline_dir) if pipeline_dir else "(in memory)",
        reference_source=reference_source,
        settings=dataclasses.asdict(config),
        # The sampler is part of what was measured: the scheduler's shift places the steps (sampling.scheduler_shift).
        scheduler={"class": type(pipe.scheduler).__name__, "shift": pipe.scheduler.config.get("shift")},
        seconds={k: round(v, 1) for k, v in timings.items()},
    )
    if out is not None:
        write_outputs(Path(out), results, samples, prompt_sets, config)
    return results


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora bench-generation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pipeline", required=True, help="pipeline folder written by `dora assemble-pipeline`"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (results.json, results.md, contact sheets)"
    )
    parser.add_argument(
        "--config", default=None, help="YAML of GenerationBenchConfig fields; flags override it"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="prepared folder, mesh folder, index file or builtin:N (default: PIPELINE/../prepared)",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default=None, help="reference shapes compared with (held-out)"
    )
    parser.add_argument(
        "--held-out-fraction",
        type=cli_types.float_in(0.0, 1.0, low_open=True, high_open=True),
        default=None,
        help="shape-id hash split (0.1)",
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        help="prompt sets: 'captions', 'renders' (image prompts) and/or .txt/.jsonl files (default: captions + the "
        "paraphrases; 'renders' for an image-only pipeline)",
    )
    parser.add_argument(
        "--prompts-per-category",
        type=cli_types.positive_int,
        default=None,
        help="prompts kept per category (1)",
    )
    parser.add_argument(
        "--samples-per-prompt", type=cli_types.positive_int, default=None, help="shapes per prompt (4)"
    )
    parser.add_argument(
        "--steps", type=cli_types.int_in(1, MAX_INFERENCE_STEPS), default=None, help="Euler steps (25)"
    )
    parser.add_argument(
        "--guidance",
        type=cli_types.float_in(*GUIDANCE_RANGE),
        default=None,
        help="classifier-free guidance scale (default: the pipeline's stored guidance, else "
        f"{DEFAULT_GUIDANCE_SCALE:g})",
    )
    parser.add_argument(
        "--tokens", type=cli_types.positive_int, default=None, help="latent tokens (default: the pipeline's)"
    )
    parser.add_argument("--seed", type=cli_types.seed, default=None, help="random seed (0)")
    parser.add_argument(
        "--resolution",
        type=cli_types.resolution,
        default=None,
        help="mesh extraction grid (96)",
    )
    parser.add_argument(
        "--batch-size", type=cli_types.positive_int, default=None, help="prompts denoised together (8)"
    )
    parser.add_argument(
        "--guidance-interval",
        type=cli_types.fraction,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="guide only at noise levels in [LOW, HIGH] (0 <= LOW < HIGH <= 1; default: every step)",
    )
    parser.add_argument(
        "--threshold",
        type=cli_types.float_in(0.0, 1.0, low_open=True, high_open=True),
        default=None,
        help="iso-level of the extraction, in (0, 1) (0.5)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--points", type=cli_types.positive_int, default=None, help="surface points per shape (2048)"
    )
    parser.add_argument(
        "--emd-points",
        type=cli_types.non_negative_int,
        default=None,
        help="points for the exact EMD, 0 = none (256)",
    )
    parser.add_argument(
        "--judge-k",
        type=cli_types.positive_int,
        default=None,
        help="neighbours voting in the category judge (3)",
    )
    parser.add_argument(
        "--remove-floaters",
        action="store_true",
        default=None,
        help="measure the pipeline's post-processed meshes instead of the raw extraction",
    )
    parser.add_argument("--save-meshes", action="store_true", default=None, help="write every mesh as .glb")
    parser.add_argument(
        "--views-per-shape",
        type=int,
        default=None,
        help=f"prompt set '{RENDERS}': image prompts (renders) per evaluated shape (1)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> GenerationBenchConfig:
    values = load_yaml(args.config) if args.config else {}
    config = from_dict(GenerationBenchConfig, values, str(args.config or "defaults"))
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GenerationBenchConfig)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(config, **flags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        results = run_generation_bench(args.pipeline, args.out, config)
    except (ValueError, FileNotFoundError) as error:
        print(f"dora bench-generation: {error}", file=sys.stderr)
        return 2
    print(results["summary_text"])
    print(f"wrote {Path(args.out) / 'results.md'} (in {sum(results['seconds'].values()):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

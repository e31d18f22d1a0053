"""`dora demo --pipeline DIR`: a Gradio app around a saved pipeline (prompt or image -> 3D viewer + download).

A text-to-3D pipeline gets a prompt box; an image-conditioned one (``DoraImageTo3DPipeline``) an image upload
(RGBA cut-outs keep their alpha as the object mask), plus the prompt box when it was trained with ``both``. A bad
image (unreadable, wrong mode, too small or large, fully transparent) is reported in the page, not a crash.

``build_demo(pipeline)`` returns the ``gr.Blocks`` without launching it, so tests and other apps can mount it.
Analytics are switched off and nothing is shared unless asked, so the demo works on an offline machine.

Misuse gets a message and never takes the server down: one generation runs at a time (the event's concurrency
limit, shared by the button and the prompt's Enter) and at most ``max_queue`` requests wait (Gradio answers
"Queue is full" beyond); the handler checks every input itself, so a request made without the page (the HTTP
API, a script) with a 100k-character prompt, NaN guidance or a slider value out of range is told which control is
wrong and what its range is.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from dora_shapegen import cli_types
from dora_shapegen.pipelines.limits import MAX_PROMPT_CHARS, not_text_problem

# Before gradio is imported (lazily, in build_demo): no telemetry and no version check from the server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT_STEPS = 30
DEFAULT_SEED = 0
GUIDANCE_SLIDER = (1.0, 15.0)  # widened to hold a pipeline's stored guidance outside it (_guidance_range)
SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed takes as a signed value, and JSON carries exactly
DEFAULT_MAX_QUEUE = 16
EXAMPLE_PROMPTS = ["a round table with one central leg", "a chair with four legs", "a tall cylindrical vase"]


def _str_to_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _guidance_range(pipeline: Any) -> tuple[float, float]:
    """The guidance slider's range: ``GUIDANCE_SLIDER``, widened where needed to hold the pipeline's
    ``default_guidance_scale``, its initial value (so the page starts at the guidance the pipeline was assembled
    with, whatever it is)."""
    default = pipeline.default_guidance_scale
    return min(GUIDANCE_SLIDER[0], default), max(GUIDANCE_SLIDER[1], default)


def _sampler_controls(
    gr: Any, max_steps: int, token_limit: int, default_tokens: int, pipeline: Any
) -> tuple[Any, Any, Any, Any]:
    """The steps, guidance, tokens and seed controls of both pages, made in the caller's column."""
    steps = gr.Slider(
        1, max_steps, value=min(DEFAULT_STEPS, max_steps), step=1, label="Steps", elem_id="steps"
    )
    guidance = gr.Slider(
        *_guidance_range(pipeline),
        value=pipeline.default_guidance_scale,
        step=0.5,
        label="Guidance scale",
        elem_id="guidance",
    )
    tokens = gr.Slider(1, token_limit, value=default_tokens, step=1, label="Latent tokens", elem_id="tokens")
    seed = gr.Number(
        value=DEFAULT_SEED, precision=0, minimum=0, maximum=SEED_MAX, label="Seed", elem_id="seed"
    )
    return steps, guidance, tokens, seed


def _result_view(gr: Any) -> tuple[Any, Any]:
    """The right-hand column of both pages: the 3D viewer and the download button, made in the caller's row."""
    with gr.Column(scale=2):
        viewer = gr.Model3D(label="Result", clear_color=(1.0, 1.0, 1.0, 1.0), height=480, elem_id="viewer")
        download = gr.DownloadButton("Download .glb", elem_id="download")
    return viewer, download


def build_demo(
    pipeline: Any,
    output_dir: str | Path | None = None,
    mesh_resolution: int = 128,
    mesh_threshold: float = 0.5,
    max_steps: int = 100,
    max_tokens: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> Any:
    """The Gradio UI for ``pipeline`` (a DoraTextTo3DPipeline or DoraImageTo3DPipeline), not launched.

    Generated .glb files go to ``output_dir`` (default: a fresh folder in the system temp dir, which Gradio may
    serve; pass ``allowed_paths=[output_dir]`` to ``launch`` for a folder elsewhere). ``mesh_resolution`` and
    ``mesh_threshold`` are server-side extraction settings; the token slider goes up to ``max_tokens`` (default:
    the pipeline's ``token_limit``, else 4x its default token count). The guidance slider starts at the pipeline's
    ``default_guidance_scale``. At most ``max_queue`` requests wait while one generates.
    """
    import gradio as gr
    import torch

    from dora_shapegen.pipelines.mesh_post import export_mesh

    output_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="dora_demo_"))
    output_dir.mkdir(parents=True, exist_ok=True)
    takes_text_only = "image_encoder" not in getattr(pipeline, "components", {})
    token_limit = max_tokens or pipeline.token_limit or 4 * pipeline.default_num_tokens
    default_tokens = min(pipeline.default_num_tokens, token_limit)
    lock = threading.Lock()  # one generation at a time: the pipeline's scheduler holds per-call state
    counter = itertools.count()

    def number(value: Any, label: str, low: float, high: float, integer: bool) -> float:
        """A control's value, or a gr.Error naming the control and its range (requests need not come from the
        page, whose sliders cannot leave their range)."""
        kind = "a whole number" if integer else "a number"
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or not low <= number <= high or (integer and number != int(number)):
            raise gr.Error(f"{label} must be {kind} from {low:g} to {high:g}, got {value!r}.")
        return int(number) if integer else number

    def generate(
        prompt: Any, steps: Any, guidance: Any, tokens: Any, seed: Any, image: Any = None
    ) -> tuple[str, str]:
        if prompt is not None and not isinstance(prompt, str):
            raise gr.Error(f"The prompt must be text, got {type(prompt).__name__}.")
        prompt = (prompt or "").strip()
        if not prompt and image is None:
            raise gr.Error("Type a prompt first." if takes_text_only else "Upload an image first.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(
                f"The prompt has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted (the text "
                "encoder reads only its first few dozen words)."
            )
        problem = not_text_problem(prompt)
        if problem:
            raise gr.Error(f"The prompt: {problem}.")
        steps = number(steps, "Steps", 1, max_steps, integer=True)
        guidance = number(guidance, "Guidance scale", *_guidance_range(pipeline), integer=False)
        tokens = number(tokens, "Latent tokens", 1, token_limit, integer=True)
        seed = number(DEFAULT_SEED if seed is None else seed, "Seed", 0, SEED_MAX, integer=True)
        inputs = {"prompt": prompt} if takes_text_only else {"image": image, "prompt": prompt or None}
        with lock:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            try:
                result = pipeline(
                    **inputs,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    num_tokens=tokens,
                    generator=generator,
                    mesh_resolution=mesh_resolution,
                    mesh_threshold=mesh_threshold,
                )
            except ValueError as error:
                raise gr.Error(str(error)) from error
            mesh = result.meshes[0]
            if len(mesh.faces) == 0:
                raise gr.Error(
                    "The generated field has no surface at this threshold; try another seed or prompt."
                )
            path = output_dir / f"shape_{next(counter):05d}_seed{seed}.glb"
            export_mesh(mesh, path)
        return str(path), str(path)

    from dora_shapegen.pipelines.loading import is_image_pipeline, takes_prompts

    if is_image_pipeline(pipeline):
        demo = _image_demo(
            pipeline, generate, output_dir, max_steps, token_limit, default_tokens, takes_prompts(pipeline)
        )
        demo.queue(max_size=max_queue, default_concurrency_limit=1)
        return demo

    with gr.Blocks(title="Dora text-to-3D", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Dora text-to-3D\nType a description, press **Generate**, inspect and download the mesh."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder=EXAMPLE_PROMPTS[0], lines=2, elem_id="prompt")
                steps, guidance, tokens, seed = _sampler_controls(
                    gr, max_steps, token_limit, default_tokens, pipeline
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(EXAMPLE_PROMPTS, inputs=prompt)
            viewer, download = _result_view(gr)
        inputs = [prompt, steps, guidance, tokens, seed]
        # One generation at a time for both triggers (one concurrency id); the handler checks the raw values
        # itself (preprocess=False) so that an out-of-range value is named with its control and range.
        events = dict(
            inputs=inputs,
            outputs=[viewer, download],
            concurrency_limit=1,
            concurrency_id="generate",
            preprocess=False,
        )
        button.click(generate, api_name="generate", **events)
        prompt.submit(generate, **events)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


def _image_demo(
    pipeline: Any,
    generate: Any,
    output_dir: Path,
    max_steps: int,
    token_limit: int,
    default_tokens: int,
    with_prompt: bool,
) -> Any:
    """The image-to-3D page: an image upload (and a prompt box for a ``both`` model) -> viewer + download."""
    import gradio as gr

    def generate_from_image(
        image: Any, prompt: str, steps: float, guidance: float, tokens: float, seed: float | None
    ) -> tuple[str, str]:
        return generate(prompt, steps, guidance, tokens, seed, image=image)

    title = "Dora image-to-3D" + (" (and text)" if with_prompt else "")
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nUpload a picture of one object (a cut-out with transparency works best), press "
            "**Generate**, inspect and download the mesh."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="numpy", image_mode="RGBA", elem_id="image")
                prompt = gr.Textbox(label="Prompt (optional)", lines=2, elem_id="prompt", visible=with_prompt)
                steps, guidance, tokens, seed = _sampler_controls(
                    gr, max_steps, token_limit, default_tokens, pipeline
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            viewer, download = _result_view(gr)
        inputs = [image, prompt, steps, guidance, tokens, seed]
        # The image needs Gradio's preprocessing (upload -> array); the handler still checks every value.
        button.click(
            generate_from_image,
            inputs=inputs,
            outputs=[viewer, download],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="generate",
        )
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora demo", description="Gradio web demo for a saved text-to-3D or image-to-3D pipeline."
    )
    parser.add_argument("--pipeline", required=True, help="folder written by `dora assemble-pipeline`")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=cli_types.int_in(1, 65535), default=7860)
    parser.add_argument("--share", type=_str_to_bool, default=False, help="create a public gradio.live link")
    parser.add_argument(
        "--resolution",
        type=cli_types.resolution,
        default=128,
        help="mesh extraction resolution, in [16, 1024] (default 128)",
    )
    parser.add_argument(
        "--max-queue",
        type=cli_types.int_in(1, 1000),
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait while one generates; more are told the queue is full (default %(default)s)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a saved local pipeline needs nothing from the Hub
    if not (Path(args.pipeline) / "model_index.json").is_file():
        print(f"dora demo: {args.pipeline} is not a saved pipeline (no model_index.json)", file=sys.stderr)
        return 2
    import torch

    from dora_shapegen.pipelines.loading import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.pipeline, device)
    demo = build_demo(pipe, mesh_resolution=args.resolution, max_queue=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)  # build_demo set up the queue
    return 0


if __name__ == "__main__":
    sys.exit(main())

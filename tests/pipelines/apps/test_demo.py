"""The Gradio demo, for real: served on localhost, driven by headless Chromium through Playwright.

Types a prompt, presses Generate and checks that the browser is served a .glb model file (fetched by the 3D
viewer) that trimesh loads as a non-empty mesh, that the download button downloads the same file, and that the
page made no request outside localhost. Skips with the reason when Chromium or Playwright is
missing (`make browser` installs Debian's chromium).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
from typing import Any

import pytest
import torch
import trimesh

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")

from dora_shapegen.pipelines.apps.demo import DEFAULT_SEED, DEFAULT_STEPS, build_demo  # noqa: E402
from tests.pipelines._tiny_pipeline import center_surface_on, make_tiny_pipeline  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PROMPT = "a round table with one central leg"
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_build_demo_has_the_controls():
    import gradio as gr

    demo = build_demo(make_tiny_pipeline(), mesh_resolution=32)
    assert isinstance(demo, gr.Blocks)
    kinds = {type(block).__name__ for block in demo.blocks.values()}
    assert {"Textbox", "Slider", "Number", "Button", "Model3D", "DownloadButton"} <= kinds
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"Prompt", "Steps", "Guidance scale", "Latent tokens", "Seed"} <= labels


def _guidance_slider(demo: Any) -> Any:
    return next(block for block in demo.blocks.values() if getattr(block, "label", None) == "Guidance scale")


def test_the_guidance_slider_starts_at_the_pipelines_stored_guidance():
    import gradio as gr

    pipe = make_tiny_pipeline(default_guidance_scale=2.0)
    slider = _guidance_slider(build_demo(pipe, mesh_resolution=32))
    assert (slider.value, slider.minimum, slider.maximum) == (2.0, 1.0, 15.0)
    # As a folder saved before pipelines stored their guidance:
    pipe.register_to_config(default_guidance_scale=None)
    assert _guidance_slider(build_demo(pipe, mesh_resolution=32)).value == 5.0
    # A stored guidance outside the usual range widens the slider (and the handler's check) to hold it.
    pipe.register_to_config(default_guidance_scale=20.0)
    demo = build_demo(pipe, mesh_resolution=32)
    slider = _guidance_slider(demo)
    assert (slider.value, slider.minimum, slider.maximum) == (20.0, 1.0, 20.0)
    handler = next(function.fn for function in demo.fns.values() if function.api_name == "generate")
    with pytest.raises(gr.Error, match="Guidance scale must be a number from 1 to 20, got 21"):
        handler(PROMPT, 2, 21.0, pipe.default_num_tokens, 5)


def test_generate_handler_writes_a_glb_and_reports_bad_input(tmp_path):
    import gradio as gr

    pipe = make_tiny_pipeline()
    center_surface_on(
        pipe, PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)
    )
    demo = build_demo(pipe, output_dir=tmp_path, mesh_resolution=32)
    handler = next(function.fn for function in demo.fns.values() if function.api_name == "generate")
    viewer_path, download_path = handler(PROMPT, 2, 3.0, pipe.default_num_tokens, 5)
    assert viewer_path == download_path and viewer_path.endswith(".glb")
    mesh = trimesh.load(viewer_path, force="mesh")
    assert len(mesh.faces) > 0
    with pytest.raises(gr.Error, match="Type a prompt first"):
        handler("   ", 2, 3.0, pipe.default_num_tokens, 5)
    tokens = pipe.default_num_tokens
    misuse = [
        ((PROMPT, 2, 3.0, pipe.token_limit + 1, 5), rf"Latent tokens must be a whole number from 1 to {pipe.token_limit}"),
        (("x" * 100_000, 2, 3.0, tokens, 5), "The prompt has 100,000 characters; at most 2,000 are accepted"),
        ((PROMPT, 500, 3.0, tokens, 5), "Steps must be a whole number from 1 to 100, got 500"),
        ((PROMPT, 2.5, 3.0, tokens, 5), "Steps must be a whole number from 1 to 100, got 2.5"),
        ((PROMPT, 2, float("nan"), tokens, 5), "Guidance scale must be a number from 1 to 15, got nan"),
        ((PROMPT, 2, "lots", tokens, 5), "Guidance scale must be a number from 1 to 15, got 'lots'"),
        ((PROMPT, 2, 3.0, tokens, -1), "Seed must be a whole number from 0 to"),
        (("a \udcff chair", 2, 3.0, tokens, 5), r"not valid UTF-8 text \(byte 0xff"),
        ((["a", "list"], 2, 3.0, tokens, 5), "The prompt must be text, got list"),
    ]  # fmt: skip
    for arguments, message in misuse:
        with pytest.raises(gr.Error, match=message):
            handler(*arguments)


def test_demo_in_headless_chromium_serves_a_glb(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    chromium = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if chromium is None:
        pytest.skip(f"no Chromium at {CHROMIUM} or on PATH (run `make browser`: apt-get install chromium)")

    pipe = make_tiny_pipeline()
    # The demo's default controls (steps, guidance, seed) generate this shape; make its field cross 0.5.
    center_surface_on(
        pipe, PROMPT, num_inference_steps=DEFAULT_STEPS, guidance_scale=pipe.default_guidance_scale,
        generator=torch.Generator().manual_seed(DEFAULT_SEED),
    )  # fmt: skip
    demo = build_demo(pipe, output_dir=tmp_path / "generated", mesh_resolution=32)
    port = _free_port()
    active, most_at_once, decode = [0], [0], pipe.decode_latents

    def counting_decode(*args, **kwargs):  # how many generations run at the same time
        active[0] += 1
        most_at_once[0] = max(most_at_once[0], active[0])
        try:
            return decode(*args, **kwargs)
        finally:
            active[0] -= 1

    pipe.decode_latents = counting_decode
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                        quiet=True, allowed_paths=[str(tmp_path)])  # fmt: skip
    external_requests: list[str] = []
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.on(
                    "request",
                    lambda request: (
                        external_requests.append(request.url)
                        if request.url.startswith("http")
                        and not any(host in request.url.split("/")[2] for host in LOCAL_HOSTS)
                        else None
                    ),
                )
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=60_000)
                page.locator("#prompt textarea").fill(PROMPT)
                with page.expect_response(
                    lambda response: response.url.split("?")[0].endswith(".glb") and response.status == 200,
                    timeout=120_000,
                ) as served:
                    page.locator("#generate").click()
                model_bytes = served.value.body()
                # The download button hands the browser the same file.
                with page.expect_download(timeout=30_000) as downloading:
                    page.locator("#download").click()
                download_name = downloading.value.suggested_filename
                with open(downloading.value.path(), "rb") as handle:
                    download_bytes = handle.read()

                # Misuse. A 100k-character prompt, typed in the page: a message, not a crash.
                page.locator("#prompt textarea").fill("x" * 100_000)
                page.locator("#generate").click()
                page.get_by_text("The prompt has 100,000 characters").first.wait_for(timeout=60_000)
                # Requests from outside the page: concurrent ones are queued (one runs at a time, all are
                # answered); out-of-range values are named with their control and range.
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                guidance, tokens = pipe.default_guidance_scale, pipe.default_num_tokens
                arguments = (PROMPT, DEFAULT_STEPS, guidance, tokens, DEFAULT_SEED)
                jobs = [client.submit(*arguments, api_name="/generate") for _ in range(3)]
                concurrent = [job.result(timeout=300) for job in jobs]
                refused = []
                for bad in (
                    (PROMPT, 10_000, 5.0, 8, 0),
                    (PROMPT, 2, 40.0, 8, 0),
                    (PROMPT, 2, 5.0, 8, -7),
                ):
                    with pytest.raises(AppError) as caught:
                        client.predict(*bad, api_name="/generate")
                    refused.append(str(caught.value))
                # The server is still up: the page generates again.
                page.locator("#prompt textarea").fill(PROMPT)
                with page.expect_response(
                    lambda response: response.url.split("?")[0].endswith(".glb") and response.status == 200,
                    timeout=120_000,
                ):
                    page.locator("#generate").click()
            finally:
                browser.close()
    finally:
        demo.close()

    assert model_bytes[:4] == b"glTF"  # binary glTF magic
    mesh = trimesh.load(io.BytesIO(model_bytes), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0
    assert download_name.endswith(".glb") and download_bytes == model_bytes
    assert list((tmp_path / "generated").glob("*.glb"))
    assert not external_requests, f"the demo page tried to reach the internet: {external_requests}"
    assert len(concurrent) == 3 and all(str(viewer).endswith(".glb") for viewer, _ in concurrent)
    assert most_at_once[0] == 1  # the three concurrent requests ran one after the other
    assert "Steps must be a whole number from 1 to 100, got 10000" in refused[0]
    assert "Guidance scale must be a number from 1 to 15, got 40.0" in refused[1]
    assert "Seed must be a whole number from 0 to" in refused[2]


def test_image_demo_uploads_an_image_and_reports_bad_ones(tmp_path):
    import gradio as gr
    import numpy as np

    from tests.pipelines._tiny_pipeline import make_tiny_image_pipeline

    pipe = make_tiny_image_pipeline("image")
    picture = np.full((64, 64, 4), 255, np.uint8)  # an RGBA upload, as gr.Image(image_mode="RGBA") gives
    picture[16:48, 24:40, :3] = (180, 40, 40)
    center_surface_on(
        pipe, picture, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)
    )
    demo = build_demo(pipe, output_dir=tmp_path, mesh_resolution=32)
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"Image", "Steps", "Guidance scale", "Latent tokens", "Seed"} <= labels
    handler = next(function.fn for function in demo.fns.values() if function.api_name == "generate")
    viewer_path, download_path = handler(picture, "", 2, 3.0, pipe.default_num_tokens, 5)
    assert viewer_path == download_path and len(trimesh.load(viewer_path, force="mesh").faces) > 0
    with pytest.raises(gr.Error, match="Upload an image first"):
        handler(None, "", 2, 3.0, pipe.default_num_tokens, 5)
    with pytest.raises(gr.Error, match="too small"):
        handler(picture[:10, :10], "", 2, 3.0, pipe.default_num_tokens, 5)
    with pytest.raises(gr.Error, match="alpha channel hides the whole image"):
        handler(np.zeros((64, 64, 4), np.uint8), "", 2, 3.0, pipe.default_num_tokens, 5)

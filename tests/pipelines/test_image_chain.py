"""The image-to-3D chain through the `dora` commands, offline on the CPU: train-dit (condition image, the
RenderEncoder trained with the DiT) -> assemble-pipeline -> generate --image, with a bad image refused."""

from __future__ import annotations

import json

import numpy as np
import torch
import trimesh
from PIL import Image

from dora_shapegen.pipelines import DoraImageTo3DPipeline, load_pipeline
from dora_shapegen.pipelines.apps.cli import main as dora
from dora_shapegen.vae.modeling_dora_vae import DoraVAE
from tests.diffusion._image_cache import CHANNELS, render_block, write_image_cache
from tests.pipelines._tiny_pipeline import center_surface_on


def test_train_assemble_generate_from_an_image(tmp_path, capsys):
    shards = write_image_cache(tmp_path / "latents", with_renders=True)
    torch.manual_seed(0)
    DoraVAE(
        width=32, heads=2, num_encoder_layers=1, num_decoder_layers=1, latent_channels=CHANNELS, n_uniform=64,
        n_salient=16, output_type="tsdf",
    ).save_pretrained(tmp_path / "vae")  # fmt: skip
    assert dora([
        "train-dit", "--config", "configs/dit/image_tiny.yaml", "--shards", str(shards), "--output-dir",
        str(tmp_path / "dit"), "--max-steps", "2",
    ]) == 0  # fmt: skip
    assert dora([
        "assemble-pipeline", "--vae", str(tmp_path / "vae"), "--transformer", str(tmp_path / "dit" / "final"),
        "--manifest", str(shards / "manifest.json"), "--out", str(tmp_path / "pipeline"),
    ]) == 0, capsys.readouterr().err  # fmt: skip
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "DoraImageTo3DPipeline" and index["condition"] == "image"
    assert index["text_encoder"] == [None, None]

    photo = np.kron(render_block(1, 0), np.ones((4, 4, 1), np.uint8))  # a 128 px "photo" of a training render
    Image.fromarray(photo).save(tmp_path / "photo.png")
    pipe = load_pipeline(tmp_path / "pipeline", "cpu")
    assert isinstance(pipe, DoraImageTo3DPipeline)
    pipe.set_progress_bar_config(disable=True)
    # assemble-pipeline stored the DiT run's preview guidance (image_tiny.yaml's sampling.guidance_scale).
    assert pipe.default_guidance_scale == 4.0
    # `dora generate`'s defaults (the stored guidance, seed 0) draw this shape: make its random field cross 0.5.
    center_surface_on(
        pipe, str(tmp_path / "photo.png"), num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    pipe.vae.save_pretrained(tmp_path / "pipeline" / "vae")
    capsys.readouterr()
    code = dora([
        "generate", "--image", str(tmp_path / "photo.png"), "--pipeline", str(tmp_path / "pipeline"), "-o",
        str(tmp_path / "out" / "shape.glb"), "--steps", "3", "--resolution", "32",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(trimesh.load(tmp_path / "out" / "shape.glb", force="mesh").faces) > 0
    preview = np.asarray(Image.open(tmp_path / "out" / "shape.png").convert("RGB"))
    assert (preview[: preview.shape[0] // 2, : preview.shape[1] // 2] != 255).any()  # the input, top left

    (tmp_path / "bad.png").write_bytes(b"GIF89a not an image")
    assert dora(["generate", "--image", str(tmp_path / "bad.png"), "--pipeline", str(tmp_path / "pipeline"),
                 "-o", str(tmp_path / "bad.glb")]) == 2  # fmt: skip
    assert "bad.png" in capsys.readouterr().err
    assert dora(["generate", "a chair", "--image", str(tmp_path / "photo.png"), "--pipeline",
                 str(tmp_path / "pipeline"), "-o", str(tmp_path / "x.glb")]) == 2  # fmt: skip
    assert "trained on images only" in capsys.readouterr().err

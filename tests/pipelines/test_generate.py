"""`dora generate` on a tiny saved pipeline: mesh files trimesh reloads + a preview PNG beside them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from dora_shapegen.pipelines import DoraTextTo3DPipeline
from dora_shapegen.pipelines.generate import main as generate
from tests.pipelines._logs import foreign_warnings
from tests.pipelines._tiny_pipeline import MAX_TRAIN_TOKENS, center_surface_on, make_tiny_pipeline

PROMPT = "a round table with one central leg"
SEED = 3
STEPS = 2
GUIDANCE = 5.0  # `dora generate`'s guidance for a pipeline that stores none, as this one
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny pipeline whose VAE field has a surface for the shape (PROMPT, SEED, STEPS) generates."""
    pipe = make_tiny_pipeline()
    center_surface_on(
        pipe, PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("pipeline") / "tiny"
    pipe.save_pretrained(folder)
    return folder


def _is_rendered_png(path: Path) -> bool:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return image.format == "PNG" and pixels.std() > 1.0  # not a blank canvas


def test_generate_writes_glb_and_preview(pipeline_dir, tmp_path):
    # A fresh interpreter, as a user runs it: the saved pipeline must load without the test's imports.
    output = tmp_path / "out" / "table.glb"
    command = [sys.executable, "-m", "dora_shapegen.pipelines.apps.cli", "generate", PROMPT, "--pipeline", str(pipeline_dir),
               "-o", str(output), "--steps", str(STEPS), "--seed", str(SEED), "--resolution", "32"]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not foreign_warnings(done.stderr), done.stderr[-2000:]
    mesh = trimesh.load(output, force="mesh")
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) > 0
    assert np.abs(mesh.vertices).max() <= 1.05 + 1e-5
    assert _is_rendered_png(output.with_suffix(".png"))
    assert f"wrote {output}" in done.stdout


def test_generate_several_shapes_with_face_budget(pipeline_dir, tmp_path, capsys):
    output = tmp_path / "table.obj"
    code = generate([PROMPT, "--pipeline", str(pipeline_dir), "-o", str(output), "--steps", str(STEPS),
                     "--seed", str(SEED), "--resolution", "32", "--num", "2", "--faces", "200"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert not output.exists()  # several shapes are numbered
    written = [path for path in (tmp_path / "table_0.obj", tmp_path / "table_1.obj") if path.exists()]
    # The first shape is the calibrated one; an empty second shape is reported instead of written.
    assert tmp_path / "table_0.obj" in written
    for path in written:
        mesh = trimesh.load(path, force="mesh")
        assert 0 < len(mesh.faces) <= 200 * 1.1
        assert f"wrote {path}" in out
    assert _is_rendered_png(tmp_path / "table.png")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "shape.fbx"], "must end with one of"),
        (["-o", "shape.glb", "--tokens", "0"], "argument --tokens: must be an integer >= 1, got 0"),
        (["-o", "shape.glb", "--tokens", str(MAX_TRAIN_TOKENS + 8)], "beyond what the models support"),
        (["-o", "shape.glb", "--num", "0"], "argument --num: must be an integer in [1, 256], got 0"),
        (["-o", "shape.glb", "--steps", "0"], "argument --steps: must be an integer in [1, 1000], got 0"),
        (
            ["-o", "shape.glb", "--guidance", "nan"],
            "argument --guidance: must be a number in [0, 100], got nan",
        ),
        (
            ["-o", "shape.glb", "--guidance", "-2"],
            "argument --guidance: must be a number in [0, 100], got -2",
        ),
        (
            ["-o", "shape.glb", "--resolution", "3"],
            "argument --resolution: must be an integer in [16, 1024], got 3",
        ),
        (
            ["-o", "shape.glb", "--seed", "-1"],
            "argument --seed: must be an integer in [0, 18446744073709551615]",
        ),
        (["-o", "shape.glb", "--threshold", "1"], "argument --threshold: must be a number in (0, 1), got 1"),
        (["-o", "shape.glb", "--faces", "2"], "argument --faces: must be an integer >= 4 or 0, got 2"),
        (
            ["-o", "shape.glb", "--steps", "ten"],
            "argument --steps: must be an integer in [1, 1000], got 'ten'",
        ),
    ],
)
def test_generate_rejects_bad_arguments(pipeline_dir, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / value) if value.startswith("shape.") else value for value in extra]
    assert generate([PROMPT, "--pipeline", str(pipeline_dir), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("shape*"))


def test_without_guidance_generate_samples_at_the_pipelines_stored_guidance(
    pipeline_dir, tmp_path, monkeypatch, capsys
):
    stored = tmp_path / "stored"
    shutil.copytree(pipeline_dir, stored)
    index = json.loads((stored / "model_index.json").read_text())
    index["default_guidance_scale"] = 2.0  # what `dora assemble-pipeline` stores from the DiT run's record
    (stored / "model_index.json").write_text(json.dumps(index))
    used = []
    call = DoraTextTo3DPipeline.__call__

    def recording_call(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        used.append(self.guidance_scale)  # the guidance the denoising ran with
        return result

    monkeypatch.setattr(DoraTextTo3DPipeline, "__call__", recording_call)
    for folder, extra in ((stored, []), (stored, ["--guidance", "3"]), (pipeline_dir, [])):
        code = generate([PROMPT, "--pipeline", str(folder), "-o", str(tmp_path / "shape.glb"), "--steps", "1",
                         "--resolution", "16", *extra])  # fmt: skip
        assert code in (0, 1), capsys.readouterr().err  # 1: every mesh empty, which the tiny model may give
    assert used == [2.0, 3.0, GUIDANCE]


def test_generate_needs_a_saved_pipeline(tmp_path, capsys):
    assert generate([PROMPT, "--pipeline", str(tmp_path), "-o", str(tmp_path / "x.glb")]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_default_output_is_reduced_to_the_face_budget_and_faces_0_keeps_all(pipeline_dir, tmp_path, capsys):
    """At 64^3 the tiny pipeline's shape has more faces than the default budget: `dora generate` writes at most
    DEFAULT_MAX_FACES faces, and says so; `--faces 0` writes the extraction as it is."""
    from dora_shapegen.pipelines.limits import DEFAULT_MAX_FACES

    common = [PROMPT, "--pipeline", str(pipeline_dir), "--steps", str(STEPS), "--seed", str(SEED),
              "--resolution", "64"]  # fmt: skip
    assert generate([*common, "-o", str(tmp_path / "budget.glb")]) == 0
    assert generate([*common, "-o", str(tmp_path / "full.glb"), "--faces", "0"]) == 0
    out = capsys.readouterr().out
    budget = trimesh.load(tmp_path / "budget.glb", force="mesh")
    full = trimesh.load(tmp_path / "full.glb", force="mesh")
    assert len(full.faces) > DEFAULT_MAX_FACES >= len(budget.faces) > 0.9 * DEFAULT_MAX_FACES
    assert f"reduced from {len(full.faces)}" in out
    assert (tmp_path / "budget.glb").stat().st_size < (tmp_path / "full.glb").stat().st_size
    # The reduced mesh is the same shape: its surface stays within a few grid cells of the full one.
    distance = np.abs(trimesh.proximity.signed_distance(full, budget.sample(500, seed=0)))
    assert np.percentile(distance, 95) < 2 * 2.1 / 64


def test_prompt_that_is_not_utf8_is_refused_before_loading(tmp_path):
    """Bytes that are not UTF-8 on the command line (Python hands them over as lone surrogates)."""
    command = [os.fsencode(sys.executable), b"-m", b"dora_shapegen.pipelines.apps.cli", b"generate", b"a \xff chair",
               b"--pipeline", os.fsencode(tmp_path), b"-o", os.fsencode(tmp_path / "x.glb")]  # fmt: skip
    environment = {**os.environ, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=environment, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert b"the prompt: it is not valid UTF-8 text (byte 0xff at character 2)" in done.stderr
    assert not list(tmp_path.iterdir())


def test_empty_prompt_says_it_is_unconditional(pipeline_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dora_shapegen.pipelines.pipeline_text_to_3d"):
        code = generate(["", "--pipeline", str(pipeline_dir), "-o", str(tmp_path / "x.obj"),
                         "--steps", str(STEPS), "--resolution", "32"])  # fmt: skip
    assert code in (0, 1)  # the tiny model's unconditional field may have no surface: that is reported
    assert "the prompt is empty: generating an unconditional shape" in caplog.text

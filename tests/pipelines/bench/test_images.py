"""`dora bench-generation` with image prompts: renders of the held-out reference shapes, category accuracy against
the source's category, Chamfer / F-score to the source shape, the input | mesh contact sheet, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh

from dora_shapegen.data.procedural import write_dataset
from dora_shapegen.data.render_views import RenderConfig, render_dataset
from dora_shapegen.pipelines.bench.images import source_metrics, summarize_source
from dora_shapegen.pipelines.bench.metrics import normalize_cloud
from dora_shapegen.pipelines.bench.run import main, run_generation_bench
from tests.pipelines._tiny_pipeline import center_surface_on, make_tiny_image_pipeline, make_tiny_pipeline

POINTS = 256


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A prepared-like reference of 12 procedural shapes (3 categories): surface samples + meta, and renders."""
    root = tmp_path_factory.mktemp("image_bench")
    index = write_dataset(root / "meshes", 12, seed=0, categories=["chair", "mug", "car"])
    (root / "prepared" / "samples").mkdir(parents=True)
    for line in index.read_text().splitlines():
        row = json.loads(line)
        path = index.parent / row["path"]
        mesh = trimesh.load(path, force="mesh")
        points = np.asarray(mesh.sample(2000, seed=0), dtype=np.float32)  # (P, 3)
        meta = {
            "shape_id": path.stem,
            "category": row["category"],
            "caption": row["caption"],
            "source": str(path),
        }
        np.savez(
            root / "prepared" / "samples" / f"{path.stem}.npz",
            uniform_points=points,
            meta=np.array(json.dumps(meta)),
        )
    assert render_dataset(root / "prepared", RenderConfig(num_views=2, size=48))["done"] == 12
    return root / "prepared"


@pytest.fixture(scope="module")
def image_pipe():
    pipe = make_tiny_image_pipeline("image")
    picture = np.full((48, 48, 3), 255, np.uint8)
    picture[10:38, 16:32] = (90, 110, 160)
    center_surface_on(
        pipe, picture, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)
    )
    return pipe


def test_source_metrics_are_zero_for_the_shape_itself_and_count_failures():
    cloud = normalize_cloud(np.random.default_rng(0).normal(size=(500, 3)))
    same = source_metrics(cloud, cloud, [0.05, 0.1])
    assert same["source_cd"] == 0.0 and same["source_f@0.05"] == 1.0 and same["source_f@0.1"] == 1.0
    moved = source_metrics(cloud + 0.3, cloud, [0.05, 0.1])
    assert moved["source_cd"] > 0.01 and moved["source_f@0.05"] < 0.5
    failed = source_metrics(None, cloud, [0.05, 0.1])
    assert failed["source_cd"] is None and failed["source_f@0.1"] == 0.0
    summary = summarize_source([{"set": "r", **same}, {"set": "r", **failed}], [0.05, 0.1])
    assert summary["source_num_samples"] == 2 and summary["source_cd"] == 0.0  # CD over the non-empty sample
    assert summary["source_f@0.1"] == pytest.approx(0.5)  # the failed one counts F = 0


def test_image_bench_judges_renders_of_held_out_shapes(image_pipe, reference, tmp_path):
    results = run_generation_bench(
        image_pipe, tmp_path / "out", reference=str(reference), held_out_fraction=0.3, samples_per_prompt=1,
        steps=2, resolution=16, points=POINTS, emd_points=0, views_per_shape=2, batch_size=3,
    )  # fmt: skip
    assert results["settings"]["prompts"] == ["renders"]  # an image-only pipeline runs the image prompts
    overall = results["sets"]["renders"]["overall"]
    held_out = results["reference"]["num_shapes"]
    assert overall["num_samples"] == overall["source_num_samples"] == 2 * held_out
    assert 0.0 <= overall["source_f@0.05"] <= overall["source_f@0.1"] <= 1.0
    assert "text_accuracy_pct" in overall and "structure_single_component_pct" in overall
    rows = [row for row in results["samples"] if row["set"] == "renders"]
    assert {row["source"] for row in rows} == {row["prompt"].split(" view ")[0] for row in rows}
    assert all(row["category"] in ("chair", "mug", "car") for row in rows)
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## Image prompts: fidelity to the source shape" in report and "F@0.1" in report
    assert (tmp_path / "out" / "contact_sheet_renders.png").is_file()


def test_image_prompts_need_renders_and_an_image_pipeline(image_pipe, reference, tmp_path, capsys):
    bare = tmp_path / "bare"
    (bare / "samples").mkdir(parents=True)
    for path in sorted((reference / "samples").glob("*.npz")):
        (bare / "samples" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="run `dora render-views"):
        run_generation_bench(image_pipe, None, reference=str(bare), steps=1, points=POINTS, emd_points=0)
    with pytest.raises(ValueError, match="needs an image-conditioned pipeline"):
        run_generation_bench(make_tiny_pipeline(), None, reference=str(reference), prompts=["renders"])
    with pytest.raises(ValueError, match="trained on images only"):
        run_generation_bench(image_pipe, None, reference=str(reference), prompts=["captions"])
    image_pipe.save_pretrained(tmp_path / "pipe")
    assert (
        main(["--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "o"), "--reference", str(bare)])
        == 2
    )
    assert "render-views" in capsys.readouterr().err

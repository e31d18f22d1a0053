"""`dora bench` end to end on tiny random VAEs, failing shapes, complexity levels, --limit and --num-workers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from dora_shapegen.data.procedural import generate_shape
from dora_shapegen.data.processor import MeshProcessor
from dora_shapegen.vae import DoraVAE
from dora_shapegen.vae.bench.data import LevelConfig, collect_shapes, shape_level
from dora_shapegen.vae.bench.metrics import DEFAULT_SHARP_EDGE_COUNT_THRESHOLDS
from dora_shapegen.vae.bench.run import main

TINY = dict(
    width=32,
    heads=2,
    num_encoder_layers=1,
    num_decoder_layers=1,
    latent_channels=8,
    output_type="occupancy",
    default_num_tokens=16,
    max_train_tokens=32,
    n_uniform=256,
    n_salient=64,
    epsilon=0.03125,
)  # a coarse epsilon keeps the watertight ground truth fast
# Small sample counts and grids: seconds, not minutes; every code path still runs.
TINY_BENCH = {
    "tokens": [16, 32],
    "grow_points_for_tokens": False,
    "resolution": 16,
    "coarse_resolution": 8,
    "metrics": {"surface_points": 1500, "volume_points": 3000, "sharp_points": 300, "render_resolution": 64},
    "latent": {
        "noise_scales": [0.1, 0.5],
        "noise_samples": 1,
        "max_shapes": 1,
        "resolution": 12,
        "surface_points": 400,
        "volume_points": 800,
        "interpolation_pairs": 1,
        "interpolation_steps": 3,
    },
    "report": {"contact_sheet_shapes": 2, "contact_sheet_size": 48},
}


def save_tiny_vae(path, **overrides) -> str:
    torch.manual_seed(0)
    DoraVAE(**{**TINY, **overrides}).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """Two procedural shapes + one corrupt file, two models (Dora and the uniform-only baseline)."""
    root = tmp_path_factory.mktemp("bench")
    meshes = root / "meshes"
    meshes.mkdir()
    generate_shape("gear", 0, 0).mesh.export(meshes / "a_gear.ply")
    generate_shape("table", 0, 1).mesh.export(meshes / "b_table.ply")
    (meshes / "c_broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nthis is not a mesh\n")
    config = root / "bench.yaml"
    config.write_text(yaml.safe_dump(TINY_BENCH))
    dora = save_tiny_vae(root / "dora")
    uniform = save_tiny_vae(root / "uniform_only", use_salient=False)
    out = root / "out"
    argv = [
        "--vae",
        dora,
        uniform,
        "--names",
        "dora",
        "baseline",
        "--meshes",
        str(meshes),
        "--out",
        str(out),
        "--config",
        str(config),
        "--tokens",
        "16",
        "32",
        "1024",
    ]
    code = main(argv)
    return {"code": code, "out": out, "results": json.loads((out / "results.json").read_text())}


def test_end_to_end_writes_every_output(bench_run):
    assert bench_run["code"] == 0
    out = bench_run["out"]
    for name in (
        "results.json",
        "results.md",
        "contact_sheet.png",
        "plots/token_scaling.png",
        "plots/token_scaling_by_level.png",
        "plots/latent_smoothness.png",
    ):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            with Image.open(path) as image:
                assert image.size[0] > 32 and image.size[1] > 32
    with Image.open(out / "contact_sheet.png") as image:
        assert image.size[0] == 3 * TINY_BENCH["report"]["contact_sheet_size"]  # gt + two models


def test_per_shape_entries_and_metric_ranges(bench_run):
    results = bench_run["results"]
    ok = [s for s in results["shapes"] if s["status"] == "ok"]
    assert [s["shape_id"] for s in ok] == ["a_gear", "b_table"]
    assert [m["name"] for m in results["models"]] == ["dora", "baseline"]
    assert [m["use_salient"] for m in results["models"]] == [True, False]
    for shape in ok:
        for model in ("dora", "baseline"):
            for tokens in ("16", "32"):
                row = shape["results"][model][tokens]
                assert row["chamfer_l1"] >= 0 and row["chamfer_l2"] >= 0
                for tau in ("0.005", "0.01", "0.02"):
                    assert 0.0 <= row[f"f_score@{tau}"] <= 1.0
                assert 0.0 <= row["volume_iou"] <= 1.0 and 0.0 <= row["mesh_volume_iou"] <= 1.0
                assert 0.0 <= row["normal_consistency"] <= 1.0
                assert row["num_points"] == TINY_BENCH["metrics"]["surface_points"]
                # Both shapes have sharp edges: the rendered variant sits beside the geometric one.
                assert row["rendered_sharp_pixels"] > 0
                assert 0.0 <= row["rendered_sharp_normal_error_deg"] <= 180.0
                # Roughness of the reconstruction and of the ground truth through the same extraction.
                assert 0.0 <= row["roughness_deg"] <= 90.0 and 0.0 < row["gt_roughness_deg"] <= 90.0
            # 1024 tokens need 512 uniform points, the model samples 256: recorded per pair, the run goes on.
            assert "points" in shape["results"][model]["1024"]["error"]


def test_aggregates_are_means_over_shapes_per_level(bench_run):
    results = bench_run["results"]
    ok = [s for s in results["shapes"] if s["status"] == "ok"]
    for model in ("dora", "baseline"):
        overall = results["aggregates"][model]["32"]["overall"]
        assert overall["num_shapes"] == 2
        expected = np.mean([s["results"][model]["32"]["chamfer_l1"] for s in ok])
        assert overall["chamfer_l1"] == pytest.approx(expected)
        for shape in ok:
            group = results["aggregates"][model]["32"][f"L{shape['level']}"]
            assert group["num_shapes"] == sum(s["level"] == shape["level"] for s in ok)
        assert results["aggregates"][model]["1024"]["overall"]["num_errors"] == 2
    markdown = (bench_run["out"] / "results.md").read_text()
    assert "## Overall" in markdown and "geometric variant" in markdown and "## Token scaling" in markdown
    assert "rendered SNE deg" in markdown and "8 fixed orthographic views at 64 px" in markdown
    for model in ("dora", "baseline"):
        for shape in ok:  # per level, beside the geometric sharp-edge error
            group = results["aggregates"][model]["32"][f"L{shape['level']}"]
            same_level = [s["results"][model]["32"] for s in ok if s["level"] == shape["level"]]
            assert group["rendered_sharp_normal_error_deg"] == pytest.approx(
                np.mean([row["rendered_sharp_normal_error_deg"] for row in same_level])
            )
            assert math.isfinite(group["sharp_normal_error_deg"])
    assert f"## Level L{ok[0]['level']}" in markdown


def test_failing_shape_is_recorded_with_reason(bench_run):
    results = bench_run["results"]
    failed = [s for s in results["shapes"] if s["status"] == "failed"]
    assert [s["shape_id"] for s in failed] == ["c_broken"]
    assert "c_broken.ply" in failed[0]["reason"]
    assert results["num_failed"] == 1 and results["failures"][0]["shape_id"] == "c_broken"
    assert "c_broken" in (bench_run["out"] / "results.md").read_text()


def test_latent_quality_is_reported(bench_run):
    latent = bench_run["results"]["latent_quality"]["aggregates"]
    for model in ("dora", "baseline"):
        smooth = latent[model]["32"]["smoothness"]
        assert set(smooth) == {"clean", "0.1", "0.5"}
        assert 0.0 <= smooth["0.5"]["iou"] <= 1.0
        assert smooth["clean"]["latent_std"] > 0
        pairs = bench_run["results"]["latent_quality"]["interpolations"][model]["32"]
        assert [(p["shape_a"], p["shape_b"]) for p in pairs] == [("a_gear", "b_table")]
        assert len(pairs[0]["single_watertight"]) == TINY_BENCH["latent"]["interpolation_steps"]
        assert pairs[0]["distance_to_a"][0] == 0.0 and pairs[0]["distance_to_b"][-1] == 0.0
        assert 0.0 <= latent[model]["32"]["interpolation"]["single_watertight_fraction"] <= 1.0


def test_complexity_levels_of_cube_sphere_gear():
    processor = MeshProcessor()
    cube = processor.load_mesh(trimesh.creation.box())
    sphere = processor.load_mesh(trimesh.creation.icosphere(subdivisions=4))
    gear = processor.load_mesh(generate_shape("gear", 0, 0).mesh)
    defaults = LevelConfig()
    assert tuple(defaults.thresholds) == DEFAULT_SHARP_EDGE_COUNT_THRESHOLDS
    assert shape_level(sphere, defaults)[0] == 1
    assert shape_level(cube, defaults)[:2] == (2, 12)
    level, count, _ = shape_level(gear, defaults)
    assert level == 3 and count > 200
    # Thresholds come from the config: tighter ones move the same shapes up.
    assert shape_level(cube, LevelConfig(thresholds=[5, 10, 20]))[0] == 3
    assert shape_level(gear, LevelConfig(thresholds=[5, 10, 20]))[0] == 4
    by_length = LevelConfig(by="length", thresholds=[2.0, 30.0, 100.0])
    assert shape_level(cube, by_length)[0] == 2  # 12 edges of length 1.9: 22.8
    with pytest.raises(ValueError, match="levels.by"):
        shape_level(cube, LevelConfig(by="volume"))


def test_limit_and_workers(tmp_path):
    config = tmp_path / "bench.yaml"
    # 256 tokens, half salient, need 128 salient points: the bench samples them although the model has 64.
    config.write_text(yaml.safe_dump({**TINY_BENCH, "tokens": [16, 256], "grow_points_for_tokens": True}))
    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "out"
    argv = [
        "--vae",
        vae,
        "--meshes",
        "builtin:3",
        "--out",
        str(out),
        "--config",
        str(config),
        "--limit",
        "2",
        "--num-workers",
        "2",
        "--no-latent-quality",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["shape_id"] for s in results["shapes"]] == [
        item["shape_id"] for item in collect_shapes("builtin:3")
    ][:2]
    assert all(s["status"] == "ok" for s in results["shapes"])
    assert results["config"]["seed"] == 3 and results["latent_quality"]["aggregates"] == {}
    assert (results["models"][0]["sampled_n_uniform"], results["models"][0]["sampled_n_salient"]) == (
        256,
        128,
    )
    for tokens in ("16", "256"):
        assert results["aggregates"]["vae"][tokens]["overall"]["num_shapes"] == 2
        assert math.isfinite(results["aggregates"]["vae"][tokens]["overall"]["chamfer_l1"])


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    assert main(["--vae", str(tmp_path), "--meshes", "builtin:1", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_prepared_folder_stands_for_its_source_meshes(tmp_path):
    mesh_path = tmp_path / "cube.ply"
    trimesh.creation.box().export(mesh_path)
    samples = tmp_path / "prepared" / "samples"
    samples.mkdir(parents=True)
    meta = {"shape_id": "cube", "source": str(mesh_path), "category": "box", "caption": "a cube"}
    np.savez_compressed(
        samples / "cube.npz", uniform_points=np.zeros((4, 3), np.float32), meta=np.array(json.dumps(meta))
    )
    (samples / "zz_truncated.npz").write_bytes(b"PK\x03\x04 not a zip")
    items = collect_shapes(str(tmp_path / "prepared"))
    assert [(i["shape_id"], i["source"], i["category"]) for i in items[:1]] == [
        ("cube", str(mesh_path), "box")
    ]
    assert "error" not in items[0]
    assert "zz_truncated.npz" in items[1]["error"]  # becomes a recorded failure of the run, not a crash
    with pytest.raises(ValueError, match="no such folder"):
        collect_shapes(str(tmp_path / "missing"))


def test_uniform_only_ablation_config_differs_only_by_the_switch():
    from dora_shapegen.config import load_yaml

    salient, uniform = load_yaml("vae/small.yaml"), load_yaml("vae/small_uniform_only.yaml")
    assert salient["model"]["use_salient"] is True and uniform["model"]["use_salient"] is False
    uniform["model"]["use_salient"] = True
    assert uniform == salient

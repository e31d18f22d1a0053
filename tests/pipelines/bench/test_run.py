"""`dora bench-generation`: distribution metrics, the category judge, structure checks, bad input, end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from dora_shapegen.data.procedural import _PROMPTS, CATEGORIES, write_dataset
from dora_shapegen.metrics import chamfer_distance
from dora_shapegen.pipelines.bench.data import load_reference
from dora_shapegen.pipelines.bench.metrics import (
    CloudSet,
    balanced_one_nna,
    chamfer_matrix,
    coverage,
    distribution_metrics,
    emd_matrix,
    fit_judge,
    mesh_cloud,
    mesh_structure,
    minimum_matching_distance,
    normalize_cloud,
    summarize_structure,
)
from dora_shapegen.pipelines.bench.run import DEFAULT_PARAPHRASES, main, run_generation_bench
from tests.pipelines._tiny_pipeline import center_surface_on, make_tiny_pipeline

POINTS = 256


def _boxes(count: int, seed: int) -> list[np.ndarray]:
    """Boxes of random proportions (they differ after normalisation, unlike spheres)."""
    rng = np.random.default_rng(seed)
    return [
        mesh_cloud(trimesh.creation.box(extents=rng.uniform(0.2, 1.0, 3)), POINTS, seed * 1000 + i)
        for i in range(count)
    ]


def _matrices(generated: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, tuple]:
    g, r = CloudSet(generated), CloudSet(reference)
    return {
        "CD": (
            chamfer_matrix(g, g, symmetric=True),
            chamfer_matrix(g, r),
            chamfer_matrix(r, r, symmetric=True),
        )
    }


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    pipe = make_tiny_pipeline()
    center_surface_on(pipe, "a chair", num_inference_steps=2, guidance_scale=4.0)
    folder = tmp_path_factory.mktemp("bench_generation") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- metrics
def test_chamfer_matrix_is_the_one_chamfer_l2():
    clouds = [normalize_cloud(np.random.default_rng(i).normal(size=(200 + 50 * i, 3))) for i in range(3)]
    matrix = chamfer_matrix(CloudSet(clouds), CloudSet(clouds), symmetric=True)
    for i in range(3):
        for j in range(3):
            assert matrix[i, j] == pytest.approx(
                chamfer_distance(clouds[i], clouds[j])["chamfer_l2"], rel=1e-12
            )


def test_same_distribution_gives_one_nna_near_half():
    figures = distribution_metrics(_matrices(_boxes(40, seed=1), _boxes(40, seed=2)))
    assert 35.0 <= figures["1-NNA-CD"] <= 65.0
    assert figures["COV-CD"] >= 45.0


def test_identical_sets_cover_everything_and_copies_are_caught():
    clouds = _boxes(20, seed=3)
    figures = distribution_metrics(_matrices(clouds, clouds))
    assert figures["COV-CD"] == 100.0 and figures["MMD-CD"] == 0.0
    # Every copy's nearest neighbour is its original: leave-one-out 1-NN flags memorisation with ~0%, not 50%.
    assert figures["1-NNA-CD"] == 0.0


def test_spheres_against_boxes_are_told_apart():
    spheres = [
        mesh_cloud(trimesh.creation.icosphere(3, radius=r), POINTS, i)
        for i, r in enumerate(np.linspace(0.3, 1.0, 16))
    ]
    figures = distribution_metrics(_matrices(spheres, _boxes(16, seed=4)))
    assert figures["1-NNA-CD"] >= 97.0
    assert figures["COV-CD"] < 30.0  # every sphere is nearest to the same few boxes
    single = distribution_metrics(_matrices(spheres[:1], _boxes(3, seed=4)))
    assert single["1-NNA-CD"] is None and single["COV-CD"] == pytest.approx(
        100.0 / 3
    )  # no leave-one-out with 1


def test_unbalanced_one_nna_uses_equal_sized_subsets_and_emd_is_exact():
    big, small = _boxes(30, seed=5), _boxes(10, seed=6)
    ((gg, gr, rr),) = _matrices(big, small).values()
    assert 25.0 <= 100 * balanced_one_nna(gg, gr, rr) <= 75.0
    assert coverage(gr) <= 1.0 and minimum_matching_distance(gr) > 0
    # A cloud against a permutation of itself: the optimal bijection finds distance 0 (a greedy match need not).
    cloud = small[0]
    shuffled = cloud[np.random.default_rng(0).permutation(len(cloud))]
    assert emd_matrix(CloudSet([cloud]), CloudSet([shuffled]), num_points=len(cloud))[0, 0] == pytest.approx(
        0.0
    )
    assert emd_matrix(CloudSet([cloud]), CloudSet([small[1]]), num_points=64)[0, 0] > 0.01


# ---------------------------------------------------------------------------------------------- judge
def test_judge_reproduces_its_stated_accuracy_on_the_held_out_part():
    shapes = load_reference("builtin:56", POINTS, held_out_fraction=0.3, seed=0)
    train = [s for s in shapes if not s.held_out]
    held = [s for s in shapes if s.held_out]
    assert len(held) >= 8 and {s.category for s in shapes} == set(CATEGORIES)
    judge = fit_judge(
        [s.cloud for s in train],
        [s.category for s in train],
        [s.cloud for s in held],
        [s.category for s in held],
        k=1,
    )
    verdicts = judge.predict(CloudSet([s.cloud for s in held]))
    assert np.mean([v == s.category for v, s in zip(verdicts, held)]) == pytest.approx(judge.accuracy)
    assert judge.num_held_out == len(held)
    assert judge.accuracy >= 0.5  # far above chance (1/14): Chamfer separates the procedural categories


# ---------------------------------------------------------------------------------------------- structure
def test_diversity_compares_samples_of_a_prompt_with_real_shapes_of_its_category():
    from dora_shapegen.pipelines.bench.metrics import category_spread, mean_pairwise, prompt_diversity

    boxes = _boxes(3, seed=0)
    real = CloudSet(boxes + [boxes[0], boxes[0]])
    spread = category_spread(real, ["vase", "vase", "vase", "mug", "mug"])
    # Three real vases of different proportions differ; two identical mugs do not (no yardstick then).
    assert spread["vase"] > 0 and spread["mug"] == 0.0
    samples = CloudSet(
        [boxes[0], boxes[1], boxes[2], boxes[2]]
    )  # prompt A: two boxes; prompt B: one box twice
    distances = chamfer_matrix(samples, samples, symmetric=True)
    ratios = prompt_diversity(distances, ["A", "A", "B", "B"], ["vase", "mug", "vase", "vase"], spread)
    assert ratios[0] == pytest.approx(distances[0, 1] / spread["vase"]) and ratios[0] > 0
    assert ratios[1] is None  # its category has no spread to compare with
    assert ratios[2] == ratios[3] == 0.0  # the same shape whatever the seed
    assert prompt_diversity(distances[:1, :1], ["A"], ["vase"], spread) == [None]  # one sample: undefined
    assert np.isnan(mean_pairwise(np.zeros((1, 1))))


def test_fragmented_mesh_counts_as_several_components():
    body = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    floaters = [
        trimesh.creation.icosphere(2, radius=0.1).apply_translation((x, 2.0, 0.0)) for x in (-1.0, 1.0)
    ]
    fragmented = mesh_structure(trimesh.util.concatenate([body, *floaters]))
    assert fragmented["components"] == 3 and not fragmented["single_component"]
    assert fragmented["floater_measure"] == "volume"
    floater_volume = sum(f.volume for f in floaters)
    assert fragmented["floater_share"] == pytest.approx(floater_volume / (1.0 + floater_volume), rel=1e-6)

    clean = mesh_structure(body)
    assert clean["components"] == 1 and clean["single_component"] and clean["watertight"]
    assert clean["floater_share"] == 0.0 and clean["faces"] == 12

    open_box = body.copy()
    open_box.update_faces(np.arange(len(body.faces)) != 0)  # one triangle missing: no volume to measure
    opened = mesh_structure(trimesh.util.concatenate([open_box, floaters[0]]))
    assert opened["floater_measure"] == "area" and opened["components"] == 2 and not opened["watertight"]


def test_empty_sample_is_counted_not_crashed_on(pipeline_dir, tmp_path):
    assert mesh_structure(trimesh.Trimesh())["empty"] and mesh_cloud(trimesh.Trimesh(), 10, 0) is None
    summary = summarize_structure([mesh_structure(None), mesh_structure(trimesh.creation.box())])
    assert summary["empty_or_failed"] == 1 and summary["single_component_pct"] == 50.0

    from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline

    pipe = DoraTextTo3DPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.vae.output_proj.bias += 1e3  # the field is "inside" everywhere: no surface, every mesh empty
    prompts = tmp_path / "two.txt"
    prompts.write_text("a chair\n\na table\n")
    results = run_generation_bench(
        pipe,
        tmp_path / "out",
        reference="builtin:14",
        prompts=[str(prompts)],
        samples_per_prompt=2,
        steps=1,
        resolution=16,
        points=64,
        emd_points=8,
    )
    overall = results["sets"]["two"]["overall"]
    assert overall["num_samples"] == 4 and overall["structure_empty_or_failed"] == 4
    assert overall["num_generated"] == 0 and "1-NNA-CD" not in overall and "text_accuracy_pct" not in overall
    assert (tmp_path / "out" / "contact_sheet_two.png").is_file()


def test_guidance_defaults_to_the_pipelines_and_the_results_name_the_one_used(pipeline_dir, tmp_path):
    from dora_shapegen.pipelines.bench.run import GenerationBenchConfig
    from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline

    assert GenerationBenchConfig().guidance is None
    pipe = DoraTextTo3DPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(default_guidance_scale=2.0)  # as assembled from a DiT run that previewed at 2
    prompts = tmp_path / "one.txt"
    prompts.write_text("a chair\n")
    small = dict(reference="builtin:14", prompts=[str(prompts)], samples_per_prompt=1, steps=1, resolution=16,
                 points=64, emd_points=0)  # fmt: skip
    results = run_generation_bench(pipe, tmp_path / "out", **small)
    assert results["settings"]["guidance"] == 2.0 and pipe.guidance_scale == 2.0
    # The sampler is recorded beside the guidance: the pipeline's scheduler and its shift.
    assert results["scheduler"] == {
        "class": "FlowMatchEulerDiscreteScheduler",
        "shift": pipe.scheduler.config.shift,
    }
    assert (
        f"guidance 2.0, scheduler shift {pipe.scheduler.config.shift:g},"
        in (tmp_path / "out" / "results.md").read_text()
    )
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["guidance"] == 2.0
    chosen = run_generation_bench(pipe, None, guidance=3.0, **small)
    assert chosen["settings"]["guidance"] == 3.0 and pipe.guidance_scale == 3.0
    with pytest.raises(ValueError, match=r"`guidance` must be a number in \[0, 100\], got 200"):
        run_generation_bench(pipe, None, guidance=200.0, **small)


# ---------------------------------------------------------------------------------------------- inputs
def test_paraphrases_cover_every_category_and_share_no_caption_template():
    rows = [json.loads(line) for line in DEFAULT_PARAPHRASES.read_text().splitlines() if line.strip()]
    assert {row["category"] for row in rows} == set(CATEGORIES)
    plain = {prompt for prompts in _PROMPTS.values() for prompt in prompts}
    # data/procedural.py's caption templates: "a(n) <words>", "... with ...", "a 3d model of ...", "... that has ...".
    templates = [r"^an? [a-z -]+$", r"\bwith\b", r"^a 3d model of ", r"\bthat has\b", r"^an? "]
    for row in rows:
        assert row["prompt"] not in plain
        assert not any(re.search(pattern, row["prompt"]) for pattern in templates), row["prompt"]


def test_bad_arguments_name_the_item(pipeline_dir, tmp_path, capsys):
    out = str(tmp_path / "out")

    def run(pipeline, reference, *extra: str) -> int:
        return main(["--pipeline", str(pipeline), "--out", out, "--reference", str(reference), *extra])

    assert run(tmp_path / "nowhere", "builtin:14") == 2
    assert "nowhere" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# nothing here\n")
    assert run(pipeline_dir, "builtin:14", "--prompts", str(empty)) == 2
    assert "empty.jsonl" in capsys.readouterr().err

    meshes = tmp_path / "uncategorised"
    meshes.mkdir()
    for index in range(3):
        trimesh.creation.box(extents=(1.0, 0.5 + 0.2 * index, 0.7)).export(meshes / f"box{index}.ply")
    assert run(pipeline_dir, meshes, "--prompts", str(DEFAULT_PARAPHRASES)) == 2
    error = capsys.readouterr().err
    assert "uncategorised" in error and "categor" in error

    assert run(pipeline_dir, tmp_path / "missing") == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- end to end
def test_command_end_to_end_on_a_tiny_pipeline(pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "few.jsonl"
    prompts.write_text(
        '{"prompt": "seat for one person", "category": "chair"}\n'
        '{"prompt": "flat top on legs", "category": "table"}\n'
    )
    out = tmp_path / "bench"
    index = write_dataset(
        tmp_path / "dataset", 12, categories=["chair", "table", "stool", "gear"], progress=False
    )
    assert (
        main(
            [
                "--pipeline",
                str(pipeline_dir),
                "--out",
                str(out),
                "--reference",
                str(index),
                "--prompts",
                "captions",
                str(prompts),
                "--samples-per-prompt",
                "2",
                "--steps",
                "2",
                "--resolution",
                "16",
                "--points",
                "128",
                "--emd-points",
                "16",
                "--batch-size",
                "5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "captions:" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["sets"]) == {"captions", "few"}
    assert results["protocol"]["points_per_shape"] == 128 and "EMD" in results["protocol"]["distance"]
    rows = results["samples"]
    assert (
        len(rows) == 4 * 2 + 2 * 2
    )  # one caption for each of the 4 categories, 2 paraphrases, 2 samples each
    judge = results["judge"]
    assert judge["num_held_out"] >= 1 and 0.0 <= judge["accuracy_pct"] <= 100.0
    for name, figures in results["sets"].items():
        mine = [row for row in rows if row["set"] == name]
        overall = figures["overall"]
        assert (
            overall["num_samples"]
            == len(mine)
            == sum(c["num_samples"] for c in figures["per_category"].values())
        )
        right = sum(row["judged"] == row["category"] for row in mine)
        assert overall["text_accuracy_pct"] == pytest.approx(100.0 * right / len(mine))
        made = [row for row in mine if not row["empty"]]
        assert 0.0 <= overall.get("diversity_ratio", 0.0) < 10.0
        assert overall["num_generated"] == len(made) > 0
        assert 0.0 <= overall["1-NNA-CD"] <= 100.0 and 0.0 <= overall["COV-EMD"] <= 100.0
        assert overall["structure_single_component_pct"] == pytest.approx(
            100.0 * sum(row["single_component"] for row in mine) / len(mine)
        )
        sheet = Image.open(out / f"contact_sheet_{name}.png")
        assert sheet.width > 0 and sheet.height > 0
    # Per-sample seeds: the same prompt and sample index give the same shape whatever else runs in its batch.
    again = run_generation_bench(
        pipeline_dir,
        None,
        reference=str(index),
        prompts=[str(prompts)],
        samples_per_prompt=2,
        steps=2,
        resolution=16,
        points=128,
        emd_points=0,
        batch_size=3,
        device="cpu",
    )
    first = [(row["prompt"], row["faces"]) for row in rows if row["set"] == "few"]
    assert [(row["prompt"], row["faces"]) for row in again["samples"]] == first
    markdown = (out / "results.md").read_text()
    assert "## Protocol" in markdown and "Per category: few" in markdown and "1-NNA-CD" in markdown

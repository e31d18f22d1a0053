"""The built-in procedural dataset: categories, determinism, captions, writing to disk."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import trimesh

from dora_shapegen.data.procedural import (
    CATEGORIES,
    ProceduralDataset,
    captions_for_category,
    example_prompts,
    generate_shape,
    main,
    write_dataset,
)

# Caption nouns contain the category name ("bookshelf", "coffee table", "bar stool", "floor lamp", "sedan car").


def _same_shape(a, b) -> bool:
    return (
        a.shape_id == b.shape_id
        and a.caption == b.caption
        and a.params == b.params
        and np.array_equal(a.mesh.vertices, b.mesh.vertices)
        and np.array_equal(a.mesh.faces, b.mesh.faces)
    )


def test_at_least_twelve_categories_each_with_prompts():
    assert len(CATEGORIES) >= 12
    assert len(set(CATEGORIES)) == len(CATEGORIES)
    for category in CATEGORIES:
        prompts = captions_for_category(category)
        assert len(prompts) >= 2
        assert all(category in prompt for prompt in prompts)
    assert set(example_prompts(per_category=1)) == set(CATEGORIES)
    with pytest.raises(ValueError, match="unknown category"):
        captions_for_category("spaceship")


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_gives_valid_captioned_meshes(category):
    for index in range(2):
        shape = generate_shape(category, seed=0, index=index)
        mesh = shape.mesh
        assert shape.category == category
        assert shape.shape_id == f"{category}-{index:04d}"
        assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()
        assert mesh.is_watertight and mesh.volume > 0  # parts are unioned into one solid
        assert (mesh.extents > 0).all()
        assert category in shape.caption
        json.dumps(shape.params)  # parameters go into index.jsonl as they are


def test_same_seed_gives_identical_shapes_and_shape_i_stands_alone():
    first = ProceduralDataset(30, seed=7)
    second = ProceduralDataset(30, seed=7)
    for index in (0, 5, 13, 29):
        assert _same_shape(first[index], second[index])
    # Shape i does not depend on the shapes before it or on the dataset size.
    small = ProceduralDataset(6, seed=7)
    assert _same_shape(small[5], first[5])
    assert _same_shape(generate_shape(first.category_of(13), seed=7, index=13), first[13])


def test_different_seeds_give_different_shapes():
    for index, category in enumerate(CATEGORIES):
        a = generate_shape(category, seed=0, index=index)
        b = generate_shape(category, seed=1, index=index)
        assert a.params != b.params, category
        same_geometry = a.mesh.vertices.shape == b.mesh.vertices.shape and np.allclose(
            a.mesh.vertices, b.mesh.vertices
        )
        assert not same_geometry, category


def test_round_robin_is_balanced_and_categories_can_be_chosen():
    dataset = ProceduralDataset(2 * len(CATEGORIES), seed=0)
    counts = Counter(dataset.category_of(i) for i in range(len(dataset)))
    assert set(counts) == set(CATEGORIES) and set(counts.values()) == {2}
    subset = ProceduralDataset(5, seed=0, categories=["gear", "mug"])
    assert [subset[i].category for i in range(5)] == ["gear", "mug", "gear", "mug", "gear"]
    with pytest.raises(IndexError):
        subset[5]
    with pytest.raises(ValueError, match="unknown"):
        ProceduralDataset(5, categories=["chair", "dragon"])


def test_captions_follow_the_parameters_and_vary():
    dataset = ProceduralDataset(4 * len(CATEGORIES), seed=3)
    shapes = [dataset[i] for i in range(len(dataset))]
    assert len({shape.caption for shape in shapes}) > 0.8 * len(shapes)
    number_words = {3: "three", 4: "four", 5: "five"}
    for shape in shapes:
        p, caption = shape.params, shape.caption
        if shape.category == "chair":
            assert ("armrests" in caption) <= p["armrests"]
            assert ("high" in caption and "back" in caption) <= (p["back_height"] > 0.5)
        if shape.category == "stool" and "legs" in caption:
            assert f"{number_words[p['num_legs']]} splayed legs" in caption
        if shape.category == "shelf" and "shelves" in caption:
            assert f"{number_words[p['num_shelves']]} shelves" in caption
        if shape.category == "house" and "roof" in caption:
            assert f"{p['roof_type']} roof" in caption
        if shape.category == "rocket" and "boosters" in caption:
            assert p["num_boosters"] > 0


def test_each_shape_has_other_phrasings_that_stay_true():
    number_words = {3: "three", 4: "four", 5: "five"}
    dataset = ProceduralDataset(4 * len(CATEGORIES), seed=5)
    for shape in (dataset[i] for i in range(len(dataset))):
        assert shape.captions[0] == shape.caption and len(shape.captions) == 4
        assert len(set(shape.captions)) == 4, shape.captions  # four different sentences
        alternatives = " ".join(shape.captions[1:])
        # Not every caption may lean on the category's own noun: one says what the object is for.
        assert shape.category not in re.findall(r"\w+", shape.captions[3].split(",")[0]), shape.captions
        if shape.category == "chair":
            assert ("armrests" in alternatives) <= shape.params["armrests"]
        if shape.category == "shelf" and "shelves" in alternatives.replace("with shelves", ""):
            assert f"{number_words[shape.params['num_shelves']]} shelves" in alternatives
    # The extra captions never change the first caption or the mesh: they draw from a stream of their own.
    # (pinned from the dataset as it was before the extra captions were added)
    shape = generate_shape("gear", seed=1, index=7)
    assert shape.caption == "a gear with twenty-one teeth, a small central hole and six round holes"
    assert len(shape.mesh.faces) == 1172


def test_write_dataset_with_several_captions_per_shape(tmp_path):
    index_path = write_dataset(tmp_path / "many", num_shapes=3, seed=4, progress=False, captions_per_shape=4)
    dataset = ProceduralDataset(3, seed=4)
    rows = [json.loads(line) for line in index_path.read_text().splitlines()]
    assert [row["captions"] for row in rows] == [dataset[i].captions for i in range(3)]
    assert main(["--out", str(tmp_path / "cli"), "--num-shapes", "2", "--captions-per-shape", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cli" / "index.jsonl").read_text().splitlines()]
    assert [len(row["captions"]) for row in rows] == [3, 3]
    with pytest.raises(ValueError, match="captions_per_shape must be 1 to 4"):
        write_dataset(tmp_path / "bad", num_shapes=1, captions_per_shape=5)


def test_other_phrasings_keep_clear_of_the_benchmark_paraphrases():
    # The generation benchmark's paraphrase prompts test words the DiT never trained on: the extra captions may
    # share with them only the words the first captions already use (category nouns, attributes, articles).
    from pathlib import Path

    from dora_shapegen.data.procedural import _OTHER_NOUNS, _PURPOSES

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-zà-ÿ]+", text.lower()))

    file = Path(__file__).resolve().parents[2] / "configs" / "bench_generation" / "paraphrases.jsonl"
    benchmark = set().union(*(words(json.loads(line)["prompt"]) for line in file.read_text().splitlines()))
    dataset = ProceduralDataset(20 * len(CATEGORIES), seed=0)
    first_captions = set().union(*(words(dataset[i].caption) for i in range(len(dataset))))
    allowed = (
        first_captions
        | words(" ".join(CATEGORIES))
        | set("the of in to for on at or you from that by its".split())
    )
    for category in CATEGORIES:
        for phrase in (*_OTHER_NOUNS[category], *_PURPOSES[category]):
            assert not (words(phrase) & benchmark) - allowed, (category, phrase)


def test_categories_differ_in_shape():
    # Bounding-box proportions alone already separate several categories (flat gear, tall shelf, long car).
    def proportions(category: str) -> np.ndarray:
        extents = generate_shape(category, seed=0, index=0).mesh.extents  # x, y (up), z
        return extents / extents.max()

    assert proportions("gear")[1] < 0.5  # a flat disc lying down
    assert proportions("shelf")[1] == 1.0  # taller than wide or deep
    assert proportions("bottle")[1] == 1.0
    car = proportions("car")
    assert car[0] == 1.0 and car[1] < 0.6  # long and low


def test_write_dataset_writes_index_and_reloadable_meshes(tmp_path):
    index_path = write_dataset(tmp_path / "procedural", num_shapes=len(CATEGORIES), seed=2, progress=False)
    rows = [json.loads(line) for line in index_path.read_text().splitlines()]
    assert len(rows) == len(CATEGORIES)
    assert {row["category"] for row in rows} == set(CATEGORIES)
    dataset = ProceduralDataset(len(CATEGORIES), seed=2)
    for index, row in enumerate(rows):
        assert set(row) == {"id", "path", "caption", "captions", "category", "params"}
        assert row["caption"] == dataset[index].caption and row["id"] == dataset[index].shape_id
        assert row["captions"] == [dataset[index].caption]  # one caption unless asked for more
        mesh = trimesh.load(index_path.parent / row["path"], force="mesh")
        assert len(mesh.faces) == len(dataset[index].mesh.faces)
        assert np.allclose(mesh.bounds, dataset[index].mesh.bounds, atol=1e-5)
    assert not list(index_path.parent.glob("*.tmp"))
    with pytest.raises(ValueError, match="unsupported mesh format"):
        write_dataset(tmp_path / "bad", 1, file_format="fbx")


def test_build_dataset_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-shapes", "3", "--categories", "gear,mug", "--format", "obj"]) == 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["category"] for row in rows] == ["gear", "mug", "gear"]
    assert all((out / row["path"]).suffix == ".obj" and (out / row["path"]).is_file() for row in rows)
    assert "wrote 3 shapes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--categories", "dragon"])

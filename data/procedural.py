"""The built-in procedural, captioned dataset (`dora build-dataset`).

Fourteen categories of objects composed from primitives (geometry in data/procedural_shapes.py and
data/procedural_machines.py), each with
parametric variety, and captions written from the sampled parameters ("a tall chair with a high back and four
thin round legs"). Shape ``i`` is generated from its own generator seeded by ``(seed, i, category)``, so it is
the same whatever else is generated, a dataset can be produced in any order or in parallel, and the same seed
always gives identical meshes and captions. Meshes are Y-up (glTF convention), standing on y = 0.

    from dora_shapegen.data.procedural import ProceduralDataset, write_dataset
    dataset = ProceduralDataset(num_shapes=280, seed=0)      # round-robin over the categories
    item = dataset[14]                                       # ProceduralShape: shape_id "chair-0014", caption...
    write_dataset("runs/procedural", 280)                    # meshes/<id>.ply + index.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trimesh
from tqdm.auto import tqdm

from dora_shapegen import cli_types, seeding
from dora_shapegen.data.procedural_machines import MACHINES_AND_BUILDINGS
from dora_shapegen.data.procedural_shapes import FURNITURE_AND_VESSELS

logger = logging.getLogger(__name__)

BUILDERS = {**FURNITURE_AND_VESSELS, **MACHINES_AND_BUILDINGS}  # category -> builder, in round-robin order
CATEGORIES: tuple[str, ...] = tuple(BUILDERS)
MESH_FORMATS = ("ply", "obj", "stl", "glb", "off")

# Z-up (how the builders work) -> Y-up: (x, y, z) -> (x, z, -y), a proper rotation so windings stay outward.
_Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

# A few plain prompts per category, for evaluating a text-conditioned model on what it was trained on.
_PROMPTS: dict[str, tuple[str, ...]] = {
    "chair": ("a chair", "a chair with four legs and a high back", "a chair with armrests"),
    "table": ("a table", "a rectangular table with four legs", "a round table with a single central leg"),
    "stool": ("a stool", "a tall bar stool with three legs", "a short stool with four legs"),
    "shelf": ("a bookshelf", "a tall bookshelf with four shelves", "an open bookshelf with three shelves"),
    "bed": ("a bed", "a double bed with a tall headboard", "a single bed with one pillow"),
    "lamp": ("a lamp", "a tall floor lamp with a conical shade", "a small desk lamp with a drum shade"),
    "mug": ("a mug", "a mug with a round handle", "a tall mug with a square handle"),
    "bottle": ("a bottle", "a tall bottle with a long neck and a cap", "a short bottle with a short neck"),
    "vase": ("a vase", "a round vase with a wide belly", "a flared vase with a wide rim"),
    "gear": ("a gear", "a gear with twelve teeth", "a thick gear with four round holes"),
    "rocket": ("a rocket", "a tall rocket with four fins and a pointed nose", "a rocket with side boosters"),
    "car": ("a car", "a sedan car with four wheels", "a minivan car with a tall roof"),
    "airplane": (
        "an airplane",
        "an airplane with swept wings and two engines",
        "an airplane with straight wings",
    ),
    "house": ("a house", "a two-story house with a gabled roof", "a house with a flat roof"),
}

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()


def _number(count: int) -> str:
    if count < len(_NUMBER_WORDS):
        return _NUMBER_WORDS[count]
    tens, ones = divmod(count, 10)
    return f"twenty-{_NUMBER_WORDS[ones]}" if tens == 2 and ones else str(count)


@dataclass
class ProceduralShape:
    shape_id: str
    category: str
    caption: str
    params: dict[str, Any]
    mesh: trimesh.Trimesh
    captions: list[str] = field(default_factory=list)  # every caption of the shape; ``caption`` is the first


# ------------------------------------------------------------------------------------------------ captions
def _describe(category: str, p: dict[str, Any]) -> tuple[list[str], str, list[str]]:
    """(adjectives, noun, "with ..." features) of one shape, read off its parameters."""
    adjectives: list[str] = []
    features: list[str] = []
    if category == "chair":
        total = p["seat_height"] + p["back_height"]
        adjectives += ["tall"] if total > 1.05 else ["low"] if total < 0.8 else []
        back = "high" if p["back_height"] > 0.5 else "low"
        features += [
            f"a {back} {'slatted' if p['back_style'] == 'slatted' else 'solid'} back",
            f"four {'thin' if p['leg_thickness'] < 0.04 else 'thick'} {p['leg_shape']} legs",
        ]
        features += ["armrests"] if p["armrests"] else []
        noun = "chair"
    elif category == "table":
        adjectives += ["long"] if p["width"] / p["depth"] > 1.6 else []
        adjectives.append(p["top_shape"])
        features += [
            "a single central leg" if p["support"] == "pedestal" else "four legs",
            "a thick top" if p["top_thickness"] > 0.045 else "a thin top",
        ]
        noun = "coffee table" if p["style"] == "coffee" else "table"
    elif category == "stool":
        adjectives.append("tall" if p["height"] > 0.62 else "short")
        features += [f"{_number(p['num_legs'])} splayed legs", "a round seat"]
        features += ["a footrest ring"] if p["footrest"] else []
        noun = "bar stool" if p["height"] > 0.62 else "stool"
    elif category == "shelf":
        ratio = p["height"] / p["width"]
        adjectives += ["tall narrow"] if ratio > 1.8 else ["low wide"] if ratio < 1.0 else []
        features += [
            f"{_number(p['num_shelves'])} shelves",
            "a back panel" if p["back_panel"] else "an open back",
        ]
        noun = "bookshelf"
    elif category == "bed":
        adjectives.append(p["size"])
        features += ["a tall headboard" if p["headboard_height"] > 0.55 else "a low headboard"]
        features += ["a footboard"] if p["footboard"] else []
        features.append("one pillow" if p["num_pillows"] == 1 else f"{_number(p['num_pillows'])} pillows")
        noun = "bed"
    elif category == "lamp":
        adjectives.append("tall" if p["kind"] == "floor" else "small")
        features += [
            f"a {'conical' if p['shade_shape'] == 'cone' else 'drum'} shade",
            f"a {p['base_shape']} base",
            "a thin pole",
        ]
        noun = f"{p['kind']} lamp"
    elif category == "mug":
        ratio = p["height"] / (2 * p["radius"])
        adjectives += ["tall"] if ratio > 1.15 else ["wide"] if ratio < 0.9 else []
        features += [f"a {p['handle_shape']} handle", "thick walls" if p["wall"] > 0.007 else "thin walls"]
        noun = "mug"
    elif category == "bottle":
        ratio = p["height"] / (2 * p["radius"])
        adjectives += ["tall slender"] if ratio > 3.6 else ["short stout"] if ratio < 2.8 else []
        features += [
            "a long neck" if p["neck_length"] > 0.06 else "a short neck",
            "a cap" if p["cap"] else "no cap",
        ]
        noun = "bottle"
    elif category == "vase":
        ratio = p["height"] / (2 * p["max_radius"])
        adjectives += ["tall"] if ratio > 2.2 else ["squat"] if ratio < 1.2 else []
        adjectives.append(p["style"])
        features += {
            "round": ["a wide belly", "a narrow neck"],
            "slender": ["a narrow body", "a small opening"],
            "flared": ["a wide flared rim", "a narrow waist"],
        }[p["style"]]
        noun = "vase"
    elif category == "gear":
        adjectives += ["thick"] if p["thickness"] > 0.3 else ["thin"] if p["thickness"] < 0.22 else []
        features += [
            f"{_number(p['num_teeth'])} teeth",
            f"a {'large' if p['bore_radius'] > 0.19 else 'small'} central hole",
        ]
        features += [f"{_number(p['num_holes'])} round holes"] if p["num_holes"] else []
        features += ["a raised hub"] if p["hub"] else []
        noun = "gear"
    elif category == "rocket":
        adjectives += ["tall"] if p["body_length"] > 6.0 else ["stubby"] if p["body_length"] < 5.0 else []
        features += [f"{_number(p['num_fins'])} fins", f"a {p['nose_shape']} nose"]
        features += [f"{_number(p['num_boosters'])} side boosters"] if p["num_boosters"] else []
        noun = "rocket"
    elif category == "car":
        adjectives += ["long"] if p["length"] > 4.5 else []
        features += ["large wheels" if p["wheel_radius"] > 0.36 else "small wheels"]
        features += ["a rear spoiler"] if p["spoiler"] else []
        features += ["a tall roof"] if p["body_type"] == "van" else []
        noun = {"sedan": "sedan car", "hatchback": "hatchback car", "van": "minivan car"}[p["body_type"]]
    elif category == "airplane":
        adjectives += ["wide"] if p["wingspan"] > 1.0 else []
        engines = p["num_engines"]
        features += [f"{p['wing_style']} wings", f"{_number(engines)} engines" if engines else "no engines"]
        noun = "airplane"
    elif category == "house":
        adjectives.append("two-story" if p["stories"] == 2 else "one-story")
        features += [f"a {p['roof_type']} roof", f"{_number(p['num_windows'])} windows"]
        features += ["a chimney"] if p["chimney"] else []
        noun = "house"
    else:
        raise ValueError(f"no caption rules for category {category!r}")
    return adjectives, noun, features


def _with_article(phrase: str) -> str:
    vowel_sound = phrase[0] in "aeiou" and not phrase.startswith("one")  # "a one-story house"
    return ("an " if vowel_sound else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _some_features(features: list[str], rng: np.random.Generator, probability: float) -> list[str]:
    """With ``probability``, a random non-empty subset of ``features`` in their natural order; else all of them."""
    if features and rng.random() < probability:
        keep = np.sort(rng.choice(len(features), size=int(rng.integers(1, len(features) + 1)), replace=False))
        return [features[k] for k in keep]
    return features


def make_caption(category: str, params: dict[str, Any], rng: np.random.Generator) -> str:
    """One caption naming the category and some of its attributes; the template and subset come from ``rng``."""
    adjectives, noun, features = _describe(category, params)
    features = _some_features(features, rng, 0.4)
    described = " ".join([*adjectives, noun])
    template = int(rng.integers(0, 4))
    if template == 0 or not features:
        caption = _with_article(described) + (f" with {_join(features)}" if features else "")
    elif template == 1:
        caption = f"{_with_article(noun)} with {_join(features)}"
    elif template == 2:
        caption = f"a 3d model of {_with_article(described)} with {_join(features)}"
    else:
        caption = f"{_with_article(described)} that has {_join(features)}"
    return caption


# Other words people use for each category's object, and what the object is for. A dataset captioned with one
# template per shape teaches the DiT the template's words; recaptioned datasets (Cap3D, the captions behind
# Hunyuan3D and TRELLIS) give each shape several phrasings, so that a prompt in other words still lands on the
# shape. An alternative noun is used only where it is true of every shape of the category. These words are kept
# apart from the generation benchmark's paraphrase prompts (configs/bench_generation/paraphrases.jsonl; a test
# checks it), so that its paraphrase accuracy still measures prompts in words the DiT never trained on.
_OTHER_NOUNS: dict[str, tuple[str, ...]] = {
    "chair": ("desk chair", "kitchen chair"),
    "table": ("desk", "work table"),
    "stool": ("perch", "high stool"),
    "shelf": ("rack of shelves", "shelf", "étagère"),
    "bed": ("bedstead", "cot"),
    "lamp": ("lantern", "luminaire"),
    "mug": ("tankard", "teacup", "beaker"),
    "bottle": ("flask", "carafe"),
    "vase": ("urn", "amphora"),
    "gear": ("sprocket", "pinion"),
    "rocket": ("spaceship", "spacecraft", "missile"),
    "car": ("motorcar", "runabout"),
    "airplane": ("airliner", "aeroplane"),
    "house": ("cottage", "bungalow", "dwelling"),
}
_PURPOSES: dict[str, tuple[str, ...]] = {
    "chair": ("a thing to sit on", "somewhere to sit down"),
    "table": ("a place to eat or work at", "a raised surface for meals"),
    "stool": ("something to perch on", "a simple thing to sit on at a counter"),
    "shelf": ("a stand for novels and ornaments", "a tall rack for display"),
    "bed": ("a place to lie down at night", "somewhere to sleep"),
    "lamp": ("something that brightens a room", "a source of illumination at night"),
    "mug": ("a vessel to drink tea from", "crockery for hot beverages"),
    "bottle": ("a vessel for water or wine", "something to pour a drink from"),
    "vase": ("an ornament that holds a bouquet", "a vessel to display cut stems"),
    "gear": ("a machine part that transmits motion", "a part inside a transmission"),
    "rocket": ("a craft that flies to orbit", "a projectile propelled by an engine"),
    "car": ("something you drive on the road", "transport for a few people"),
    "airplane": ("a machine that flies", "an airliner for travel"),
    "house": ("a place where people reside", "a residence"),
}


def alternative_captions(category: str, params: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Three more captions of one shape: another noun, a plain name, and a description of what it is for.

    Each names only attributes the shape has (the same rules as :func:`make_caption`), in other sentence shapes.
    """
    adjectives, noun, features = _describe(category, params)
    features = _some_features(features, rng, 0.5)
    other = str(rng.choice(_OTHER_NOUNS[category]))
    purpose = str(rng.choice(_PURPOSES[category]))
    detail = _join(features) if features else ""
    synonym = _with_article(" ".join([*adjectives, other])) + (f" with {detail}" if detail else "")
    if rng.random() < 0.5 and detail:
        synonym = f"{detail}: {_with_article(other)}"
    plain = (
        _with_article(" ".join([*adjectives, noun]))
        if adjectives and rng.random() < 0.5
        else _with_article(noun)
    )
    described = purpose + (f", with {detail}" if detail else "")
    return [synonym, plain, described]


def captions_for_category(category: str) -> list[str]:
    """A few plain prompts for ``category`` (evaluation: does "a chair" give something nearest to chairs?)."""
    if category not in _PROMPTS:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    return list(_PROMPTS[category])


def example_prompts(per_category: int = 1, categories: Sequence[str] | None = None) -> dict[str, list[str]]:
    """{category: first ``per_category`` prompts}, e.g. for the quickstart's preview grid."""
    return {name: captions_for_category(name)[:per_category] for name in _check_categories(categories)}


# ------------------------------------------------------------------------------------------------ shapes
def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    chosen = tuple(categories)
    unknown = [name for name in chosen if name not in BUILDERS]
    if unknown or not chosen:
        raise ValueError(f"unknown or empty categories {unknown or chosen!r}; known: {', '.join(CATEGORIES)}")
    return chosen


def _round(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, (float, np.floating)) else value


def generate_shape(category: str, seed: int = 0, index: int = 0) -> ProceduralShape:
    """Shape number ``index`` of ``category``: a pure function of (category, seed, index)."""
    if category not in BUILDERS:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = seeding.rng(seed, index, category)
    solid, params = BUILDERS[category](rng)
    raw = solid.to_mesh()
    vertices = np.asarray(raw.vert_properties, dtype=np.float64)[:, :3] @ _Z_UP_TO_Y_UP.T  # (V, 3)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    vertices -= [(low[0] + high[0]) / 2, low[1], (low[2] + high[2]) / 2]  # centred, standing on y = 0
    mesh = trimesh.Trimesh(vertices=vertices, faces=np.asarray(raw.tri_verts, dtype=np.int64), process=False)
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all():
        raise RuntimeError(f"procedural {category} #{index} (seed {seed}) produced an invalid mesh")
    params = {key: _round(value) for key, value in params.items()}
    caption = make_caption(category, params, rng)
    # The alternatives draw from a stream of their own, so the first caption (and every mesh) stays what it was.
    extra_rng = seeding.rng(seed, index, category, 1)
    captions = [caption, *alternative_captions(category, params, extra_rng)]
    return ProceduralShape(f"{category}-{index:04d}", category, caption, params, mesh, captions)


class ProceduralDataset:
    """``num_shapes`` shapes, round-robin over ``categories`` (all by default), generated on access."""

    def __init__(self, num_shapes: int, seed: int = 0, categories: Sequence[str] | None = None) -> None:
        if num_shapes < 0:
            raise ValueError(f"num_shapes must be >= 0, got {num_shapes}")
        self.num_shapes, self.seed = int(num_shapes), int(seed)
        self.categories = _check_categories(categories)

    def __len__(self) -> int:
        return self.num_shapes

    def category_of(self, index: int) -> str:
        return self.categories[index % len(self.categories)]

    def __getitem__(self, index: int) -> ProceduralShape:
        if index < 0:
            index += self.num_shapes
        if not 0 <= index < self.num_shapes:
            raise IndexError(f"shape index {index} out of range for {self.num_shapes} shapes")
        return generate_shape(self.category_of(index), self.seed, index)


def write_dataset(
    out_dir: str | Path,
    num_shapes: int,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    file_format: str = "ply",
    progress: bool = True,
    captions_per_shape: int = 1,
) -> Path:
    """Write ``meshes/<id>.<format>`` and ``index.jsonl`` (rows: id, path, caption, captions, category, params).

    ``path`` is relative to the index file's folder, so the dataset can be moved as a whole. The index is
    written last and atomically: an index that exists is complete. ``captions`` holds the first
    ``captions_per_shape`` (1-4) of each shape's phrasings; 1 keeps the one-template dataset (docs/RESULTS.md,
    The quickstart, measures both).
    """
    if not 1 <= captions_per_shape <= 4:
        raise ValueError(f"captions_per_shape must be 1 to 4, got {captions_per_shape}")
    file_format = file_format.lower().lstrip(".")
    if file_format not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {file_format!r}; choose one of {', '.join(MESH_FORMATS)}")
    out_dir = Path(out_dir)
    (out_dir / "meshes").mkdir(parents=True, exist_ok=True)
    dataset = ProceduralDataset(num_shapes, seed=seed, categories=categories)
    rows = []
    for index in tqdm(range(len(dataset)), desc="procedural shapes", unit="shape", disable=not progress):
        try:
            item = dataset[index]
            relative = Path("meshes") / f"{item.shape_id}.{file_format}"
            item.mesh.export(out_dir / relative, file_type=file_format)
        except Exception as error:  # a batch job logs, skips and goes on
            logger.warning("skipping procedural shape %d (%s): %s", index, dataset.category_of(index), error)
            continue
        rows.append(
            {
                "id": item.shape_id,
                "path": relative.as_posix(),
                "caption": item.caption,
                "captions": item.captions[:captions_per_shape],
                "category": item.category,
                "params": item.params,
            }
        )
    index_path = out_dir / "index.jsonl"
    partial = index_path.with_suffix(".jsonl.tmp")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(partial, index_path)
    return index_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dora build-dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (meshes/ and index.jsonl)")
    parser.add_argument(
        "--num-shapes",
        type=cli_types.positive_int,
        default=20 * len(CATEGORIES),
        help="total number of shapes",
    )
    parser.add_argument("--seed", type=cli_types.seed, default=0)
    parser.add_argument(
        "--categories", default=None, help=f"comma-separated subset of: {','.join(CATEGORIES)} (default: all)"
    )
    parser.add_argument("--format", dest="file_format", default="ply", choices=MESH_FORMATS)
    parser.add_argument(
        "--captions-per-shape",
        type=cli_types.int_in(1, 4),
        default=1,
        help="1 = the template caption only; up to 4 adds another noun, the plain name and what "
        "the object is for (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    categories = (
        [name.strip() for name in args.categories.split(",") if name.strip()] if args.categories else None
    )
    try:
        index_path = write_dataset(
            args.out,
            args.num_shapes,
            args.seed,
            categories,
            args.file_format,
            captions_per_shape=args.captions_per_shape,
        )
    except ValueError as error:
        parser.error(str(error))
    counts = Counter(json.loads(line)["category"] for line in index_path.read_text().splitlines())
    print(f"wrote {sum(counts.values())} shapes to {index_path}")
    print(", ".join(f"{name}: {count}" for name, count in sorted(counts.items())))
    return 0

"""Inputs of `dora bench-generation`: the reference shapes (as normalised point clouds) and the prompt sets.

Reference sources: a `dora prepare` folder (its stored surface samples of the watertight remesh: the surface the VAE
learnt, no meshing needed), a folder of meshes or an index file (.jsonl/.csv rows with ``path``, ``category``,
``caption``; sampled here from the normalised input mesh), or ``builtin[:N]`` procedural shapes. Each reference shape
is split into "train" / "held-out" by the same shape-id hash the VAE's validation uses
(``dora_shapegen.seeding.split_indices``), so the default distribution reference is the held-out split of the
training data and the category judge is fitted on the other part.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dora_shapegen import seeding
from dora_shapegen.config import resolve_config_path
from dora_shapegen.pipelines.bench.metrics import normalize_cloud
from dora_shapegen.seeding import split_indices
from dora_shapegen.vae.bench.metrics import sample_surface

logger = logging.getLogger(__name__)

SPLITS = ("held-out", "train", "all")
CAPTIONS = "captions"  # prompt-set name: training-style captions of the reference shapes


@dataclass
class ReferenceShape:
    shape_id: str
    category: str
    caption: str
    cloud: np.ndarray  # (P, 3), normalised (bounding-box centre 0, largest half-extent 1)
    held_out: bool = False


@dataclass
class PromptItem:
    prompt: str  # the text; for an image prompt a label ("<shape id> view <v>")
    category: str | None  # None: no category known, so no text-following verdict
    image: np.ndarray | None = None  # (S, S, 3) uint8: an image prompt (pipelines/bench/images.py)
    source_index: int | None = None  # image prompts: the evaluated reference shape it was rendered from


def _subsample(points: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    # Stored samples are already area-uniform, so a random subset is too; with replacement only when too few.
    index = rng.choice(len(points), num_points, replace=len(points) < num_points)
    return points[index]


def _prepared_folder(path: Path) -> Path | None:
    folder = path / "samples" if (path / "samples").is_dir() else path
    return folder if path.is_dir() and any(folder.glob("*.npz")) else None


def _load_prepared(folder: Path, num_points: int, seed: int) -> list[ReferenceShape]:
    shapes = []
    for file in sorted(folder.glob("*.npz")):
        try:
            with np.load(file, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                points = np.asarray(archive["uniform_points"], dtype=np.float64)  # (N, 3)
        except Exception as error:  # a batch job logs, skips and goes on
            logger.warning(
                "skipping unreadable prepared sample %s (%s: %s)", file, type(error).__name__, error
            )
            continue
        rng = seeding.rng(seed, "bench-reference-cloud", len(shapes))
        shapes.append(
            ReferenceShape(
                str(meta.get("shape_id") or file.stem),
                str(meta.get("category") or ""),
                str(meta.get("caption") or ""),
                normalize_cloud(_subsample(points, num_points, rng)),
            )
        )
    return shapes


def _load_meshes(spec: str, num_points: int, seed: int) -> list[ReferenceShape]:
    from dora_shapegen.data.mesh_io import load_mesh
    from dora_shapegen.data.procedural import generate_shape
    from dora_shapegen.vae.bench.data import collect_shapes

    shapes = []
    for item in collect_shapes(spec, seed=seed):
        try:
            if item["kind"] == "builtin":
                procedural = generate_shape(item["category"], item["builtin_seed"], item["index"])
                mesh, item = procedural.mesh, {**item, "caption": procedural.caption}
            else:
                mesh = load_mesh(item["source"])
            points, _ = sample_surface(
                mesh, num_points, seeding.derive_seed(seed, "bench-reference-cloud", len(shapes))
            )
            if len(points) == 0:
                raise ValueError("the mesh has no faces")
        except Exception as error:  # a batch job logs, skips and goes on
            logger.warning(
                "skipping reference shape %s (%s: %s)", item["source"], type(error).__name__, error
            )
            continue
        shapes.append(
            ReferenceShape(
                item["shape_id"],
                item.get("category") or "",
                item.get("caption") or "",
                normalize_cloud(points),
            )
        )
    return shapes


def load_reference(
    spec: str, num_points: int, held_out_fraction: float = 0.1, seed: int = 0
) -> list[ReferenceShape]:
    """Every reference shape of ``spec`` as a normalised (num_points, 3) cloud, marked held out or not."""
    if num_points < 1:
        raise ValueError(f"points per shape must be positive, got {num_points}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {held_out_fraction}")
    path = Path(spec)
    is_builtin = spec == "builtin" or spec.startswith("builtin:")
    if not is_builtin and not path.exists():
        raise ValueError(f"reference set {spec}: no such prepared folder, mesh folder or index file")
    prepared = None if is_builtin else _prepared_folder(path)
    try:
        shapes = (
            _load_prepared(prepared, num_points, seed) if prepared else _load_meshes(spec, num_points, seed)
        )
    except ValueError as error:
        raise ValueError(f"reference set {spec}: {error}") from error
    if not shapes:
        raise ValueError(f"reference set {spec}: no usable shapes")
    _, held = split_indices([s.shape_id for s in shapes], held_out_fraction)
    for index in held:
        shapes[index].held_out = True
    return shapes


def select_split(shapes: Sequence[ReferenceShape], split: str) -> list[ReferenceShape]:
    """The shapes the generated set is compared with: the held-out part, the training part, or all."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(shapes)
    return [s for s in shapes if s.held_out == (split == "held-out")]


# ---------------------------------------------------------------------------------------------- prompts
def _caption_prompts(
    shapes: Sequence[ReferenceShape], evaluated: Sequence[ReferenceShape], per_category: int, source: str
) -> list[PromptItem]:
    """Up to ``per_category`` captions per category, from the evaluated split first (then the rest), by shape id."""
    evaluated_ids = {s.shape_id for s in evaluated}
    ordered = sorted(
        (s for s in shapes if s.caption), key=lambda s: (s.shape_id not in evaluated_ids, s.shape_id)
    )
    if not ordered:
        raise ValueError(f"prompt set '{CAPTIONS}': the reference set {source} has no captions")
    taken: dict[str, int] = {}
    items = []
    for shape in ordered:
        if taken.get(shape.category, 0) < per_category:
            taken[shape.category] = taken.get(shape.category, 0) + 1
            items.append(PromptItem(shape.caption, shape.category or None))
    return sorted(items, key=lambda item: item.category or "")


def _file_prompts(path: Path) -> list[PromptItem]:
    if not path.is_file():
        raise ValueError(f"prompt file {path}: not found")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"prompt file {path}:{number}: not valid JSON ({error})") from error
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt file {path}:{number}: a row needs a non-empty 'prompt' string")
            items.append(PromptItem(prompt.strip(), str(row["category"]) if row.get("category") else None))
        else:
            items.append(PromptItem(text, None))
    if not items:
        raise ValueError(f"prompt file {path}: no prompts in it")
    return items


def _limit_per_category(items: list[PromptItem], per_category: int) -> list[PromptItem]:
    counts: dict[str | None, int] = {}
    kept = []
    for item in items:
        if item.category is None or counts.get(item.category, 0) < per_category:
            counts[item.category] = counts.get(item.category, 0) + 1
            kept.append(item)
    return kept


def load_prompt_set(
    spec: str,
    shapes: Sequence[ReferenceShape],
    evaluated: Sequence[ReferenceShape],
    per_category: int,
    reference_source: str,
) -> tuple[str, list[PromptItem]]:
    """(set name, prompts) for ``captions`` (the reference's own captions) or a .txt / .jsonl prompt file.

    A prompt with a category asks for a text-following verdict, so its category must be one the reference set
    has (the judge can only name categories it has seen).
    """
    if per_category < 1:
        raise ValueError(f"prompts per category must be positive, got {per_category}")
    if spec == CAPTIONS:
        name, items = CAPTIONS, _caption_prompts(shapes, evaluated, per_category, reference_source)
    else:
        path = Path(spec)
        if (
            not path.exists()
        ):  # a shipped prompt file named as in the repository (configs/bench_generation/...)
            with contextlib.suppress(FileNotFoundError):
                path = resolve_config_path(spec)
        name, items = path.stem, _limit_per_category(_file_prompts(path), per_category)
    asked = sorted({item.category for item in items if item.category})
    known = {s.category for s in shapes if s.category}
    if asked and not known:
        raise ValueError(
            f"prompt set {spec} asks for category accuracy, but the reference set {reference_source} "
            "has no categories (give a prepared folder or an index with a 'category' column)"
        )
    unknown = [category for category in asked if category not in known]
    if unknown:
        raise ValueError(
            f"prompt set {spec}: categories {unknown} are not among the reference set's "
            f"({', '.join(sorted(known))})"
        )
    return name, items

"""Image prompts for `dora bench-generation`: renders of the held-out reference shapes, and fidelity to the source.

The prompt set ``renders`` turns every evaluated (by default held-out) reference shape into ``views_per_shape``
image prompts: its renders from `dora render-views` (``REFERENCE/renders/<shape_id>.npz``, views 0, 1, ...; the
held-out shapes of a DiT trained with ``data.held_out_fraction`` were never seen). Each sample is judged as image-to-3D
papers report it:

- category accuracy: the judge's category for the sample against the source shape's category (the same k-NN judge
  as text prompts, reported as ``text_accuracy_pct``);
- fidelity to the shape it was rendered from: Chamfer distance (CD-L2 as the distribution metrics, and CD-L1 = mean
  nearest-neighbour distance) and F-score at ``fscore_thresholds`` between the sample's and the source's surface
  samples, both normalised per shape (bounding-box centre at the origin, largest half-extent 1) in the canonical
  frame the models generate in; no alignment is searched. An empty or failed sample scores F = 0 and no CD;
- structure (one piece or not, floaters) as for text prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dora_shapegen.metrics import chamfer_distance
from dora_shapegen.pipelines.bench.data import PromptItem, ReferenceShape
from dora_shapegen.vae.bench.metrics import f_score

RENDERS = "renders"  # prompt-set name: renders of the evaluated reference shapes
DEFAULT_FSCORE_THRESHOLDS = (0.05, 0.1)  # in the normalised frame: 2.5% and 5% of the shape's largest extent


def load_render_prompts(
    reference_source: str, evaluated: Sequence[ReferenceShape], views_per_shape: int
) -> list[PromptItem]:
    """``views_per_shape`` image prompts per evaluated shape, from ``reference_source``'s renders folder.

    A ValueError naming what to do when the reference has no renders, or one shape lacks them or has too few."""
    from dora_shapegen.data.render_views import load_renders, renders_folder

    if views_per_shape < 1:
        raise ValueError(f"views_per_shape must be positive, got {views_per_shape}")
    folder = renders_folder(reference_source)
    if not Path(reference_source).is_dir() or not folder.is_dir():
        raise ValueError(
            f"prompt set '{RENDERS}' needs renders of the reference shapes: run `dora render-views "
            f"{reference_source}` (the reference must be a `dora prepare` folder)"
        )
    items = []
    for index, shape in enumerate(evaluated):
        path = folder / f"{shape.shape_id}.npz"
        if not path.is_file():
            raise ValueError(
                f"prompt set '{RENDERS}': reference shape {shape.shape_id} has no renders ({path})"
            )
        images = load_renders(path)["images"]  # (R, S, S, 3)
        if len(images) < views_per_shape:
            raise ValueError(
                f"prompt set '{RENDERS}': {path} holds {len(images)} renders, fewer than views_per_shape="
                f"{views_per_shape}"
            )
        for view in range(views_per_shape):
            items.append(
                PromptItem(
                    f"{shape.shape_id} view {view}",
                    shape.category or None,
                    image=images[view],
                    source_index=index,
                )
            )
    return items


def source_metrics(
    cloud: np.ndarray | None, source: np.ndarray, thresholds: Sequence[float]
) -> dict[str, Any]:
    """Fidelity of one sample (its normalised cloud, or None when empty/failed) to its source shape's cloud."""
    if cloud is None:
        return {"source_cd": None, "source_cd_l1": None} | {f"source_f@{tau:g}": 0.0 for tau in thresholds}
    distances = chamfer_distance(cloud, source)
    scores = f_score(cloud, source, thresholds)
    return {"source_cd": distances["chamfer_l2"], "source_cd_l1": distances["chamfer_l1"]} | {
        f"source_f@{tau:g}": scores[f"f_score@{tau:g}"] for tau in thresholds
    }


def summarize_source(rows: Sequence[dict[str, Any]], thresholds: Sequence[float]) -> dict[str, Any]:
    """Means over the samples of image prompts (CD over the non-empty ones; F-score over all, failures 0)."""
    rows = [row for row in rows if "source_cd" in row]
    if not rows:
        return {}
    made = [row["source_cd"] for row in rows if row["source_cd"] is not None]
    figures: dict[str, Any] = {
        "source_num_samples": len(rows),
        "source_cd": float(np.mean(made)) if made else None,
        "source_cd_l1": float(np.mean([r["source_cd_l1"] for r in rows if r["source_cd_l1"] is not None]))
        if made
        else None,
    }
    for tau in thresholds:
        figures[f"source_f@{tau:g}"] = float(np.mean([row[f"source_f@{tau:g}"] for row in rows]))
    return figures

"""A synthetic latent cache with condition images, for the image-conditioning tests: 8 shapes of 4 categories
whose latents scatter around a per-category vector and whose renders show a per-category block."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dora_shapegen.data.latent_shards import (
    LatentShardWriter,
    LatentSums,
    build_manifest,
    to_storage,
    write_manifest,
)

CATEGORIES = ("chair", "table", "lamp", "mug")
NUM_TOKENS, CHANNELS, SIZE, RENDERS = 32, 64, 32, 2


def render_block(category: int, view: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a dark block whose place and size say the category, shifted a little per view."""
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    top, left, side = 4 + 6 * (category % 2), 4 + 6 * (category // 2), 10 + 2 * category
    image[top + view : top + view + side, left : left + side] = (40 + 50 * category, 80, 120)
    return image


def write_image_cache(out: Path, with_renders: bool) -> Path:
    """8 synthetic shapes (latents scattered around a per-category vector) with or without 2 renders each."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 2.0, size=(len(CATEGORIES), CHANNELS))  # (K,C)
    sums = LatentSums()
    with LatentShardWriter(out, max_samples=4) as writer:
        for index in range(8):
            category = index % len(CATEGORIES)
            latents = centers[category] + 0.3 * rng.normal(size=(1, NUM_TOKENS, CHANNELS))  # (V,N,C)
            stored = to_storage(latents, "fp16")
            name = CATEGORIES[category]
            meta = {
                "shape_id": f"{name}-{index:04d}",
                "captions": [f"a {name}"],
                "category": name,
                "dtype": "fp16",
                "num_tokens": NUM_TOKENS,
                "latent_channels": CHANNELS,
            }
            renders = (
                np.stack([render_block(category, view) for view in range(RENDERS)]) if with_renders else None
            )
            writer.write(meta["shape_id"], stored, meta["captions"], "synthetic", meta, renders)
            sums.update(stored)
    fields = {"num_tokens": NUM_TOKENS, "latent_channels": CHANNELS, "num_views": 1, "dtype": "fp16"}
    if with_renders:
        fields["renders"] = {"num_views": RENDERS, "size": SIZE, "format": "png"}
    write_manifest(out, build_manifest(writer.records, sums, **fields))
    return out

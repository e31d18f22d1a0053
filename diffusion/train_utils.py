"""The data side of `dora train-dit`: latent batches and cached text embeddings, and a run's data built from its
config (``build_data``, ``batch_source``: what ``diffusion/train.py`` plugs into the loop, ``training/loop.py``).

Data comes from the latent cache (WebDataset shards + manifest.json written by ``dora cache-latents``) through
``data.latent_shards``, in one of two modes:

- ``in_memory`` (default; small caches such as the CPU quickstart's ~280 shapes): every rank reads the whole cache
  once into a tensor. Batches are then a pure function of (seed, micro-step, rank): a seeded per-epoch permutation
  of the shapes, cut into global batches of ``batch_size * num_processes`` of which rank r takes slice r. A resumed
  run therefore sees exactly the batches an uninterrupted run would, with no data-loader state to restore.
- streaming (``in_memory: false``; caches too big for RAM): ``latent_shard_pipeline(resampled=True)`` where every
  rank/worker draws shards with replacement (webdataset seeds the draw per rank and worker), read through a
  DataLoader with workers. Resumed runs re-seed the stream with the resume step instead of replaying it.

Images (``condition: image | both``): the cache's condition images (``render_<v>.png`` members) are read too; in
memory every shape's renders are kept as uint8 (S, R, H, W, 3) and each sample of a batch gets one, picked by the
batch generator after the existing draws (so text-only batches are unchanged); streaming reads one random render
per sample. ``held_out_fraction`` leaves out the shapes whose id hashes into the benchmark's held-out split
(``dora_shapegen.seeding.is_held_out``, the split `dora bench-generation` judges on), so they stay unseen.

Text: the text encoder is frozen and a dataset has few distinct captions, so each unique caption is encoded once
and its token states + pooled vector are kept in memory (:class:`CaptionEmbeddingCache`); a step then costs no
text-encoder forward. Caption dropout maps a caption to ``""``, whose embedding is cached the same way.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dora_shapegen.data.latent_shards import (
    LatentShardDataset,
    LatentStats,
    collate_latents,
    latent_shard_pipeline,
)
from dora_shapegen.diffusion.conditioning import uses_images
from dora_shapegen.diffusion.text_encoder import TextEmbeddings, TextEncoder
from dora_shapegen.errors import ConfigError
from dora_shapegen.seeding import derive_seed

if TYPE_CHECKING:
    from dora_shapegen.diffusion.train_config import DiTTrainConfig
    from dora_shapegen.training.loop import BatchSource
    from dora_shapegen.training.schedules import TokenSchedule

logger = logging.getLogger("dora.train_dit")


# ------------------------------------------------------------------------------------------------ text embeddings
class CaptionEmbeddingCache:
    """Frozen text-encoder outputs per unique caption: (token states (L, D), pooled (P,)) on ``device``.

    Each caption is encoded on its own padding-free slice (the mask selects its real tokens), so a cached entry
    equals what the encoder gives for that prompt at inference. ``max_entries`` bounds memory when streaming a
    cache with very many distinct captions (the cache is simply cleared when full).
    """

    def __init__(
        self,
        encoder: TextEncoder,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        max_entries: int = 200_000,
    ) -> None:
        self.encoder, self.device, self.dtype = encoder, torch.device(device), dtype
        self.batch_size, self.max_entries = batch_size, max_entries
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def precompute(self, captions: Iterable[str]) -> None:
        missing = sorted(set(captions) - set(self.entries))
        if len(self.entries) + len(missing) > self.max_entries:
            self.entries.clear()
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            hidden, mask, pooled = self.encoder.encode(chunk)  # (b,L,D), (b,L), (b,P)
            for index, caption in enumerate(chunk):
                keep = mask[index].bool()  # (L,)
                self.entries[caption] = (
                    hidden[index][keep].to(self.device, self.dtype),  # (l,D)
                    pooled[index].to(self.device, self.dtype),  # (P,)
                )

    def __call__(self, captions: list[str]) -> TextEmbeddings:
        """Embeddings of a batch of captions, zero-padded to the longest (padding is masked out)."""
        self.precompute(captions)
        items = [self.entries[caption] for caption in captions]
        length = max(hidden.shape[0] for hidden, _ in items)
        width = items[0][0].shape[1]
        hidden_states = torch.zeros(
            len(items), length, width, device=self.device, dtype=self.dtype
        )  # (B,L,D)
        attention_mask = torch.zeros(len(items), length, device=self.device, dtype=torch.long)  # (B,L)
        for index, (hidden, _) in enumerate(items):
            hidden_states[index, : hidden.shape[0]] = hidden
            attention_mask[index, : hidden.shape[0]] = 1
        pooled = torch.stack([pooled for _, pooled in items])  # (B,P)
        return TextEmbeddings(hidden_states, attention_mask, pooled)


# ---------------------------------------------------------------------------------------------------- latent data
@dataclass
class LatentTable:
    """The whole latent cache in memory: normalised latents (S, V, N, C) + per-shape captions and categories."""

    latents: torch.Tensor  # (S,V,N,C) normalised with the manifest's statistics
    captions: list[list[str]]
    shape_ids: list[str]
    categories: list[str | None]
    images: torch.Tensor | None = None  # (S,R,H,W,3) uint8 condition images, when read

    def __len__(self) -> int:
        return self.latents.shape[0]


def load_latent_table(
    source: str | Path,
    num_tokens: int,
    stats: LatentStats,
    with_images: bool = False,
    held_out_fraction: float = 0.0,
) -> LatentTable:
    """Read every sample of a latent cache (all views) through the real shard reader, sorted by shape id.

    ``with_images`` also reads every shape's condition images; ``held_out_fraction`` > 0 leaves out the shapes of
    the benchmark's held-out split."""
    from dora_shapegen.seeding import is_held_out

    views: dict[str, dict[int, torch.Tensor]] = {}
    metas: dict[str, dict[str, Any]] = {}
    renders: dict[str, torch.Tensor] = {}
    dataset = LatentShardDataset(
        source,
        num_tokens=num_tokens,
        stats=stats,
        shuffle_buffer=0,
        shardshuffle=False,
        split_by_node=False,
        view=0,
        images="all" if with_images else "none",
    )
    num_views = int((dataset.manifest or {}).get("num_views", 1) or 1)
    for view in range(num_views):
        dataset.view = view
        dataset.images = (
            "all" if with_images and view == 0 else "none"
        )  # renders belong to the shape, not a view
        for sample in dataset:
            if held_out_fraction > 0 and is_held_out(sample["shape_id"], held_out_fraction):
                continue
            views.setdefault(sample["shape_id"], {})[view] = sample["latents"]  # (N,C)
            metas[sample["shape_id"]] = sample["meta"]
            if "images" in sample:
                renders[sample["shape_id"]] = sample["images"]  # (R,H,W,3)
    if not views:
        raise ConfigError(f"latent cache {source} holds no samples")
    shape_ids = sorted(views)
    latents = torch.stack(
        [torch.stack([views[i][v] for v in range(num_views)]) for i in shape_ids]
    )  # (S,V,N,C)
    captions = []
    for shape_id in shape_ids:
        found = [c for c in (metas[shape_id].get("captions") or []) if isinstance(c, str) and c.strip()]
        if not found:
            logger.warning(
                "latent cache %s: shape %s has no caption; it trains as unconditional", source, shape_id
            )
        captions.append(found or [""])
    categories = [metas[shape_id].get("category") for shape_id in shape_ids]
    images = None
    if with_images:
        sizes = {tuple(renders[shape_id].shape) for shape_id in shape_ids}
        if len(sizes) != 1:
            raise ValueError(
                f"latent cache {source}: condition images of different counts/sizes {sorted(sizes)}"
            )
        images = torch.stack([renders[shape_id] for shape_id in shape_ids])  # (S,R,H,W,3)
    return LatentTable(latents, captions, shape_ids, categories, images)


class InMemoryBatches:
    """Deterministic batches from a :class:`LatentTable`: see the module docstring (resume-exact, rank-sliced)."""

    def __init__(self, table: LatentTable, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.table, self.batch_size, self.seed = table, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {
                epoch: torch.randperm(
                    len(self.table),
                    generator=torch.Generator().manual_seed(derive_seed(self.seed, "dit-epoch-order", epoch)),
                )
            }
        return self._orders[epoch]

    def epoch_of(self, micro_step: int) -> int:
        return (micro_step * self.batch_size * self.world_size) // len(self.table)

    def batch(self, micro_step: int, generator: torch.Generator) -> dict[str, Any]:
        """Micro-batch ``micro_step`` of this rank; ``generator`` picks a view and a caption per sample."""
        size = len(self.table)
        first = (micro_step * self.world_size + self.rank) * self.batch_size
        indices = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, size)
            indices.append(int(self._order(epoch)[offset]))
        num_views = self.table.latents.shape[1]
        view = torch.randint(num_views, (len(indices),), generator=generator).tolist()
        latents = torch.stack([self.table.latents[i, v] for i, v in zip(indices, view)])  # (B,N,C)
        picks = torch.rand(len(indices), generator=generator).tolist()
        captions = [
            self.table.captions[i][int(p * len(self.table.captions[i]))] for i, p in zip(indices, picks)
        ]
        batch = {
            "latents": latents,
            "caption": captions,
            "shape_id": [self.table.shape_ids[i] for i in indices],
        }
        if self.table.images is not None:  # drawn last: the draws above are those of a text-only table
            render = torch.randint(self.table.images.shape[1], (len(indices),), generator=generator).tolist()
            batch["image"] = torch.stack(
                [self.table.images[i, r] for i, r in zip(indices, render)]
            )  # (B,H,W,3)
        return batch


def streaming_batches(
    source: str | Path,
    num_tokens: int,
    stats: LatentStats,
    batch_size: int,
    seed: int,
    shuffle_buffer: int,
    num_workers: int,
    with_images: bool = False,
    held_out_fraction: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Endless batches from resampled shards (each rank/worker draws its own shards with replacement); with
    ``with_images`` each sample carries one random condition image."""
    pipeline = latent_shard_pipeline(
        source,
        num_tokens=num_tokens,
        stats=stats,
        shuffle_buffer=shuffle_buffer,
        resampled=True,
        seed=seed,
        images="one" if with_images else "none",
    )
    if held_out_fraction > 0:
        from dora_shapegen.seeding import is_held_out

        pipeline = pipeline.select(lambda sample: not is_held_out(sample["shape_id"], held_out_fraction))
    pipeline = pipeline.batched(batch_size, collation_fn=collate_latents, partial=False)
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    while True:
        yield from loader


def preview_renders(table: LatentTable, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first render of the first shape of up to ``count`` categories (sorted), for image-conditioned
    previews: ((P, H, W, 3) uint8, titles)."""
    if table.images is None:
        raise ValueError("preview_renders needs a table read with its condition images")
    chosen: dict[str, int] = {}
    for index, category in enumerate(table.categories):
        chosen.setdefault(category or table.shape_ids[index], index)
    picked = [chosen[key] for key in sorted(chosen)][:count]
    return table.images[picked, 0], [table.shape_ids[index] for index in picked]  # (P,H,W,3)


# --------------------------------------------------------------------------------------------------- a run's data
@dataclass
class DiTData:
    """The latents and captions of a run: the table and its batches when the cache fits in memory."""

    stats: Any  # LatentStats: the normalisation of the latents (the manifest's, or init_from's)
    captions: Any  # CaptionEmbeddingCache: every caption encoded once (None without text conditioning)
    num_shapes: int
    in_memory: Any | None  # InMemoryBatches, or None when streaming shards
    preview_renders: Any | None = (
        None  # image conditions in memory: (renders (P, H, W, 3), titles) for previews
    )


def build_data(
    config: DiTTrainConfig, manifest: dict[str, Any], schedule: TokenSchedule, text_encoder: Any, trainer: Any
) -> DiTData:
    """Every unique caption is encoded once, up front (in memory) or on first sight (streaming); image conditions
    also read the condition images."""
    dcfg, accelerator = config.data, trainer.accelerator
    stats = LatentStats.from_manifest(manifest)
    captions = CaptionEmbeddingCache(text_encoder, trainer.device) if text_encoder is not None else None
    if not dcfg.in_memory:
        if captions is not None:
            captions.precompute([""])
        return DiTData(stats, captions, int(manifest.get("num_samples", 0)), None)
    with_images = uses_images(config.condition)
    table = load_latent_table(dcfg.shards, schedule.max_tokens, stats, with_images, dcfg.held_out_fraction)
    batches = InMemoryBatches(
        table, dcfg.batch_size, config.training.seed, accelerator.process_index, accelerator.num_processes
    )
    if captions is not None:
        captions.precompute([c for shape in table.captions for c in shape] + [""])
    renders = preview_renders(table, config.sampling.num_prompts) if with_images else None
    return DiTData(stats, captions, len(table), batches, renders)


def batch_source(config: DiTTrainConfig, data: DiTData, schedule: TokenSchedule, trainer: Any) -> BatchSource:
    """(epoch, batch) from a micro-step on: in memory a function of the micro-step (its own generator picks views and
    captions); streaming re-seeds the resampled stream with the resume step instead of replaying it."""

    def batches(start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        if data.in_memory is not None:
            for micro in itertools.count(start):
                generator = torch.Generator().manual_seed(trainer.step_seed("dit-batch-picks", micro))
                yield data.in_memory.epoch_of(micro), data.in_memory.batch(micro, generator)
        else:
            dcfg = config.data
            seed = derive_seed(config.training.seed, "dit-stream", trainer.state["global_step"])
            for batch in streaming_batches(
                dcfg.shards,
                schedule.max_tokens,
                data.stats,
                dcfg.batch_size,
                seed,
                dcfg.shuffle_buffer,
                dcfg.num_workers,
                uses_images(config.condition),
                dcfg.held_out_fraction,
            ):
                yield 0, batch

    return batches

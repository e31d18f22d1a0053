"""The project's seed scheme and its held-out split: every derived seed and every split comes from here.

Seeds. A random draw that must not depend on order, process, worker or batch (a shape's procedural parameters,
a prompt's sample noise, a step's token count) takes its randomness from a tuple of keys:

    seed_sequence(run_seed, "chair", 3)   ->  numpy SeedSequence([run_seed, crc32("chair"), 3])
    rng(*keys)                            ->  numpy Generator over that SeedSequence
    derive_seed(*keys)                    ->  its first 32-bit word, for APIs that take one integer (torch)

Integer keys (>= 0) enter as they are; a string key enters as the CRC-32 of its UTF-8 bytes (stable across
processes, machines and Python versions, unlike ``hash()``). SeedSequence mixes the keys, so neighbouring keys give
unrelated streams, and ``rng(a, b)`` is ``numpy.random.default_rng([a, b])``.

This is the project's only way to derive a seed: no module adds to, multiplies or hashes a seed itself
(``tests/core/test_seeding.py`` reads the source for it). A derived draw names its purpose in the key after the
seed it derives from, ``derive_seed(run_seed, "shard-order", epoch)``, so two purposes never share a stream; a
purpose belongs to one module. Keys are mixed as 32-bit words and numpy pads a short key list with zeros, so
``(a, b)`` and ``(a, b, 0)`` are the same sequence, as are ``(a, 2**32)`` and ``(a, 0, 1)``: the purpose string
keeps purposes apart, and the keys after it always have the same count. The purposes:

    prepare           "prepare-shape", shape id          a shape's seed: its surface points use it as it is, its
                                                         supervision derives "supervision" from it
                      "watertight-band"                   surface samples marking the remesh's narrow band
    train-vae         "vae-epoch-order", epoch            the epoch's order of the training shapes (every rank)
                      "vae-item-draw", epoch, position    the seed of an item's random point subsets
    train-dit         "dit-epoch-order", epoch            the epoch's order of the cached shapes (every rank)
                      "dit-batch-picks", micro, rank      each sample's view, caption and render, in memory
                      "dit-stream", global step           the streamed shards' seed at a (re)start (every rank)
    both trainings    "train-step", micro, rank           a micro-step's noise, timesteps, dropout, posterior
    latent shards     "shard-order", epoch                the epoch's shard order (every rank)
                      "shard-samples", epoch, rank, worker    the shuffle buffer and each sample's picks
                      "shard-resample"                    webdataset's resampled shard draws (it adds rank, worker)
    cache-latents     "cache-uniform-points", "cache-salient-points", "cache-posterior"; shape id, view
    render-views      "render-views", shape id            a shape's condition-image viewpoints
    bench             "bench-volume-points", "bench-sharp-points" under a shape's "prepare-shape" seed
    bench-generation  "bench-reference-cloud", index; "bench-sample-cloud", index: the compared point clouds
    benchmark script  "category-accuracy-noise", batch start, seed (tests/benchmarks/bench_category_accuracy.py)

Four draws are older than the purpose keys and keep their layout, an integer or a prompt after the run seed:
a procedural shape's parameters ``(seed, index, category)`` (they define the built-in dataset), a step's token
count ``(seed, step)``, a prepared item's point subsets ``(seed, index, draw)`` and a generation-benchmark
sample's noise ``(seed, prompt, sample)``.

The split. A shape is held out when the first 8 bytes of the SHA-1 of its id, read as a big-endian fraction of
2^64, fall below the held-out fraction: the same shapes are held out in every run, on every rank and machine, and
a larger dataset holds out the same shapes of a smaller one. It is a property of the shape id, not a random draw.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np


def _key(value: int | str) -> int:
    if isinstance(value, str):
        return zlib.crc32(value.encode("utf-8"))
    value = int(value)
    if value < 0:
        raise ValueError(f"seed keys must be >= 0, got {value}")
    return value


def seed_sequence(*keys: int | str) -> np.random.SeedSequence:
    """numpy's SeedSequence over the keys (a string key as its CRC-32)."""
    return np.random.SeedSequence([_key(k) for k in keys])


def rng(*keys: int | str) -> np.random.Generator:
    """A numpy Generator seeded by the keys: ``numpy.random.default_rng`` of their ``seed_sequence``."""
    return np.random.default_rng(seed_sequence(*keys))


def derive_seed(*keys: int | str) -> int:
    """One 32-bit integer seed from the keys (the first word of their ``seed_sequence``), e.g. for torch."""
    return int(seed_sequence(*keys).generate_state(1)[0])


def is_held_out(shape_id: str, fraction: float) -> bool:
    """Whether ``shape_id`` is in the held-out split of size ``fraction`` (SHA-1 of the id, see above)."""
    digest = hashlib.sha1(shape_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_indices(shape_ids: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices); never leaves either side empty when there are >= 2 shapes."""
    held = [i for i, sid in enumerate(shape_ids) if is_held_out(sid, fraction)]
    train = [i for i, sid in enumerate(shape_ids) if not is_held_out(sid, fraction)]
    if fraction > 0 and not held and len(train) >= 2:
        held = [train.pop()]  # tiny sets (tests) may hash nothing into the split
    if not train and len(held) >= 2:
        train = [held.pop(0)]
    return train, held

"""The project's seed scheme and its held-out split: every derived seed and every split comes from here.

Seeds. A random draw that must not depend on order, process, worker or batch (a shape's procedural parameters,
a prompt's sample noise, a step's token count) takes its randomness from a tuple of keys:

    seed_sequence(run_seed, "chair", 3)   ->  numpy SeedSequence([run_seed, crc32("chair"), 3])
    rng(*keys)                            ->  numpy Generator over that SeedSequence
    derive_seed(*keys)                    ->  its first 32-bit word, for APIs that take one integer (torch)

Integer keys (>= 0) enter as they are; a string key enters as the CRC-32 of its UTF-8 bytes (stable across
processes, machines and Python versions, unlike ``hash()``). SeedSequence mixes the keys, so neighbouring keys give
unrelated streams, and ``rng(a, b)`` is ``numpy.random.default_rng([a, b])``.

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

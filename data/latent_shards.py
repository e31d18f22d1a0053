"""Cached VAE latents as WebDataset tar shards: shard writer, manifest, latent statistics and reader.

This module is format-only (it never imports ``vae``): ``vae/cache_latents.py`` encodes shapes and hands the
arrays to :class:`LatentShardWriter`; the diffusion stage reads them back with :func:`latent_shard_pipeline`.

The sample layout (keys inside the tar) is described in ``data/latent_format.py``.
``manifest.json`` beside the shards is described in :func:`build_manifest`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from dora_shapegen.data.latent_format import (  # noqa: F401  (re-exported: the format's public names live here too)
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_MODES,
    MANIFEST_NAME,
    OPTIONAL_SAMPLE_KEYS,
    SAMPLE_KEYS,
    TAR_BLOCK,
    LatentStats,
    LatentSums,
    collate_latents,
    decode_sample,
    encode_sample,
    from_storage,
    load_manifest,
    load_npy,
    sample_key,
    tar_members,
    to_storage,
)
from dora_shapegen.errors import DoraError, disk_full_names
from dora_shapegen.seeding import derive_seed

SHARD_NAME = re.compile(r"\d{5}-\d{6}\.tar")


class CorruptShardError(DoraError, RuntimeError):
    """A shard that cannot be read, is truncated or does not match the manifest's checksum / sample count."""


# ------------------------------------------------------------------------------------------------------- writer
class _HashingFile:
    """File wrapper hashing what tarfile writes, so a shard's sha256 costs no second read."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.sha256, self.num_bytes = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.handle.write(data)


@dataclass
class ShardRecord:
    """A finished, fsynced shard: what the progress log and the manifest record about it."""

    name: str
    num_samples: int
    sha256: str
    num_bytes: int
    shape_ids: list[str]
    sums: LatentSums = field(default_factory=LatentSums)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "sha256": self.sha256,
            "num_bytes": self.num_bytes,
            "shape_ids": self.shape_ids,
            "sums": self.sums.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ShardRecord:
        return cls(
            values["name"],
            int(values["num_samples"]),
            values["sha256"],
            int(values["num_bytes"]),
            list(values["shape_ids"]),
            LatentSums.from_dict(values["sums"]),
        )


def shard_name(rank: int, index: int) -> str:
    return f"{rank:05d}-{index:06d}.tar"


def fsync_dir(path: str | Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LatentShardWriter:
    """Writes size-bounded shards ``{rank:05d}-{index:06d}.tar`` atomically.

    webdataset's ``ShardWriter`` opens a shard before the first sample (an empty trailing shard), checks the bound
    only after overshooting, and closes the file without fsync; resumability needs each shard written to
    ``.tar.tmp``, fsynced, renamed and only then reported (``on_shard_closed``), so rotation is done here around
    webdataset's ``TarWriter``. A shard is closed when ``max_samples`` is reached or the next sample would push it
    past ``max_bytes`` (a single larger sample still gets a shard of its own).
    """

    def __init__(
        self,
        out_dir: str | Path,
        rank: int = 0,
        start_index: int = 0,
        max_samples: int = 1000,
        max_bytes: int = 512 * 2**20,
        on_shard_closed: Callable[[ShardRecord], None] | None = None,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples and max_bytes must be positive, got {max_samples}, {max_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.index = rank, start_index
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.on_shard_closed = on_shard_closed
        self.records: list[ShardRecord] = []
        self._tar: wds.TarWriter | None = None
        self._size = 0

    def _open(self) -> None:
        self._name = shard_name(self.rank, self.index)
        with disk_full_names(self.out_dir / self._name):
            self._handle = open(self.out_dir / (self._name + ".tmp"), "wb")
        self._hashing = _HashingFile(self._handle)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0)  # fixed mtime: reproducible bytes
        self._size, self._shape_ids, self._sums = 0, [], LatentSums()

    def write(
        self,
        shape_id: str,
        stored_latents: np.ndarray,
        captions: list[str],
        source: str,
        metadata: dict[str, Any],
        renders: np.ndarray | None = None,
    ) -> None:
        sample = encode_sample(shape_id, stored_latents, captions, source, metadata, renders)
        # exact tar size of the members: a 512-byte header each, data padded to 512 bytes
        size = sum(
            TAR_BLOCK + -(-len(value) // TAR_BLOCK) * TAR_BLOCK
            for key, value in sample.items()
            if not key.startswith("_")
        )
        # the file ends with two zero blocks and is padded to whole 10 KiB tar records
        projected = -(-(self._size + size + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        if self._tar is not None and (len(self._shape_ids) >= self.max_samples or projected > self.max_bytes):
            self.close_shard()
        if self._tar is None:
            self._open()
        with disk_full_names(self.out_dir / self._name):  # the context manager's exit then drops the shard
            self._tar.write(sample)
        self._size += size
        self._shape_ids.append(shape_id)
        self._sums.update(from_storage(stored_latents, metadata.get("dtype")))

    def close_shard(self) -> ShardRecord | None:
        """Finish the open shard: close, fsync, rename into place, then report it."""
        if self._tar is None:
            return None
        with disk_full_names(self.out_dir / self._name):
            self._tar.close()
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
            fsync_dir(self.out_dir)
        record = ShardRecord(
            self._name,
            len(self._shape_ids),
            self._hashing.sha256.hexdigest(),
            self._hashing.num_bytes,
            list(self._shape_ids),
            self._sums,
        )
        self._tar = None
        self.index += 1
        self.records.append(record)
        if self.on_shard_closed is not None:
            self.on_shard_closed(record)
        return record

    def abort(self) -> None:
        """Drop the open shard (used on errors): it was never reported, so a rerun redoes its shapes."""
        if self._tar is not None:
            # The tar stream keeps a buffer it would flush into the dropped file when collected (and fail again
            # on a full disk): mark it closed so that nothing more is written.
            stream = getattr(getattr(self._tar, "tarstream", None), "fileobj", None)
            if stream is not None and hasattr(stream, "closed"):
                stream.closed = True
            self._handle.close()
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
            self._tar = None

    def close(self) -> None:
        self.close_shard()

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        self.abort() if exc_type is not None else self.close()


# ----------------------------------------------------------------------------------------------------- manifest
def build_manifest(records: Iterable[ShardRecord], sums: LatentSums, **fields: Any) -> dict[str, Any]:
    """The manifest: format, ``fields`` (vae identity, epsilon, num_tokens, latent_channels, dtype, ...), the
    shard list (name, num_samples, sha256, num_bytes), the sample count and the latent statistics."""
    records = sorted(records, key=lambda record: record.name)
    shards = [
        {key: value for key, value in record.to_dict().items() if key not in ("shape_ids", "sums")}
        for record in records
    ]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **fields,
        "num_samples": sum(record.num_samples for record in records),
        "num_shards": len(shards),
        "shards": shards,
        "stats": LatentStats.from_sums(sums).to_dict(),
        "sample_keys": SAMPLE_KEYS | (OPTIONAL_SAMPLE_KEYS if fields.get("renders") else {}),
    }


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    temporary = path.with_suffix(".json.tmp")
    try:
        with disk_full_names(path):
            temporary.write_text(json.dumps(manifest, indent=2, default=str))
            os.replace(temporary, path)
    except Exception:
        temporary.unlink(missing_ok=True)  # the previous manifest, if any, stays in place
        raise
    return path


# ------------------------------------------------------------------------------------------------------- reader
def resolve_shards(source: Any) -> tuple[list[str], dict[str, Any] | None]:
    """A shard folder / manifest path or URL -> (shard URLs from the manifest, manifest); a list of URLs or a
    brace pattern (``pipe:``, http, s3 via pipe...) -> (those URLs, None)."""
    if isinstance(source, (str, Path)) and (Path(source).is_dir() or str(source).endswith(".json")):
        manifest = load_manifest(source)
        return [f"{manifest['base_url']}/{shard['name']}" for shard in manifest["shards"]], manifest
    if isinstance(source, str):
        return wds.shardlists.expand_urls(source), None
    return [str(url) for url in source], None


def _tar_samples(fileobj: Any, url: str) -> Iterator[dict[str, Any]]:
    """Group tar members into samples by key (members of one sample are adjacent, as TarWriter writes them)."""
    current: dict[str, Any] | None = None
    for name, data in tar_members(fileobj):
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        if current is not None and current["__key__"] != prefix:
            yield _complete(current)
            current = None
        current = current or {"__key__": prefix, "__url__": url}
        current[suffix.lower()] = data
    if current is not None:
        yield _complete(current)


def _complete(sample: dict[str, Any]) -> dict[str, Any]:
    missing = sorted(set(SAMPLE_KEYS) - set(sample))
    if missing:
        raise ValueError(f"sample {sample['__key__']!r} lacks {missing}")
    return sample


def read_shard(
    url: str, expected: dict[str, Any] | None = None, verify: bool = False
) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard; any damage raises :class:`CorruptShardError` naming the shard.

    ``expected`` is the manifest's entry for the shard: its sample count is always checked (a tar cut at a member
    boundary reads as a valid shorter tar), its sha256 when ``verify`` (the shard is then read whole and checked
    before any sample is yielded, so a skipped corrupt shard contributes nothing).
    """
    try:
        stream = wds.gopen(url, "rb")
    except Exception as error:
        raise CorruptShardError(f"latent shard {url}: cannot open: {error}") from error
    count = 0
    try:
        if verify:
            if expected is None:
                raise ValueError(f"verify=True needs a manifest with the checksum of {url}")
            data = stream.read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected["sha256"]:
                raise CorruptShardError(
                    f"latent shard {url}: sha256 {digest} does not match the manifest ({expected['sha256']})"
                )
            stream.close()
            stream = io.BytesIO(data)
        try:
            for sample in _tar_samples(stream, url):
                count += 1
                yield sample
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise CorruptShardError(
                f"latent shard {url} is corrupt (after {count} samples): {error}"
            ) from error
    finally:
        stream.close()
    if expected is not None and count != expected["num_samples"]:
        raise CorruptShardError(
            f"latent shard {url} is truncated: {count} samples, the manifest says {expected['num_samples']}"
        )


def _worker_seed(seed: int, epoch: int) -> int:
    """The seed of this rank's and data-loader worker's sample shuffle and per-sample picks in ``epoch``."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return derive_seed(seed, "shard-samples", epoch, rank, worker)


class LatentShardDataset(wds.DataPipeline, wds.FluidInterface):
    """Latent shards as a webdataset pipeline yielding {latents (N, C) float32, caption, shape_id, meta}.

    Built from webdataset's stages (shard lists, ``split_by_node`` / ``split_by_worker``, ``ResampledShards``,
    ``shuffle``, ``gopen``) and with the same base classes as ``webdataset.WebDataset`` (so ``.batched``,
    ``.with_epoch``, ``WebLoader`` etc. work); only the tar-reading stage is ours, because WebDataset's cannot
    check a shard against the manifest's checksum and sample count nor name the shard in its errors.

    Without ``resampled``, shards are split across ranks (``split_by_node``) and then data-loader workers, so an
    epoch sees every sample exactly once (given at least ranks x workers shards); the shard order is shuffled with
    (``seed``, epoch), identical on all ranks (call ``set_epoch`` each epoch when workers are not persistent).
    With ``resampled`` (multi-node), every rank/worker draws shards with replacement forever: bound an epoch with
    ``.with_epoch(n)``. Corrupt shards raise :class:`CorruptShardError`, or are skipped with a warning when
    ``skip_corrupt`` (without ``verify``, samples read before the damage have already been yielded).
    ``images="one"`` adds a random condition image per sample (``image``), ``"all"`` all of them (``images``).
    """

    def __init__(
        self,
        source: Any,
        num_tokens: int | None = None,
        normalize: bool = True,
        stats: LatentStats | None = None,
        shuffle_buffer: int = 1000,
        shardshuffle: bool = True,
        resampled: bool = False,
        split_by_node: bool = True,
        handler: Callable = wds.reraise_exception,
        skip_corrupt: bool = False,
        verify: bool = False,
        seed: int = 0,
        view: int | None = None,
        manifest: dict[str, Any] | str | None = None,
        images: str = "none",
    ) -> None:
        super().__init__()
        self.urls, found = resolve_shards(source)
        self.manifest = load_manifest(manifest) if isinstance(manifest, (str, Path)) else (manifest or found)
        if not self.urls:
            raise ValueError(f"no latent shards found in {source!r}")
        if normalize and stats is None:
            if self.manifest is None:
                raise ValueError(
                    "normalize=True needs the manifest's statistics: pass a folder/manifest or stats="
                )
            stats = LatentStats.from_manifest(self.manifest)
        self.stats = stats if normalize else None
        self.expected = {shard["name"]: shard for shard in (self.manifest or {}).get("shards", [])}
        self.num_tokens, self.view, self.seed, self.epoch = num_tokens, view, seed, -1
        self.shuffle_buffer, self.shardshuffle, self.handler = shuffle_buffer, shardshuffle, handler
        self.skip_corrupt, self.verify = skip_corrupt, verify
        self.images = images
        if resampled:
            self.append(
                wds.ResampledShards(self.urls, seed=derive_seed(seed, "shard-resample"), deterministic=True)
            )
        else:
            self.append(self._shard_urls)
            if split_by_node:
                self.append(wds.split_by_node)
            self.append(wds.split_by_worker)
        self.append(self._read)
        self.append(self._shuffle_and_decode)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch - 1  # the next iteration starts `epoch`

    def _shard_urls(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        urls = list(self.urls)
        if self.shardshuffle:
            random.Random(derive_seed(self.seed, "shard-order", self.epoch)).shuffle(
                urls
            )  # same order on every rank
        for url in urls:
            yield {"url": url}

    def _read(self, source: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for item in source:
            url = item["url"]
            try:
                name = SHARD_NAME.search(url)  # also inside "pipe:aws s3 cp s3://.../00000-000001.tar -"
                yield from read_shard(url, self.expected.get(name.group(0) if name else url), self.verify)
            except CorruptShardError as error:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping corrupt shard: {error}", stacklevel=2)

    def _shuffle_and_decode(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # self.epoch is still the previous one here (-1 before the first): _shard_urls advances it once this
        # stage pulls its first sample.
        rng = random.Random(_worker_seed(self.seed, self.epoch + 1))
        if self.shuffle_buffer > 1:  # shuffle raw bytes (fp16 is half the size of the decoded float32)
            source = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(source)
        for raw in source:
            try:
                yield decode_sample(raw, self.num_tokens, self.stats, self.view, rng, self.images)
            except Exception as error:
                error.args = (*error.args, raw.get("__url__"), raw.get("__key__"))
                if self.handler(error):
                    continue
                break


def latent_shard_pipeline(
    source: Any,
    num_tokens: int | None = None,
    normalize: bool = True,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    split_by_node: bool = True,
    handler: Callable = wds.reraise_exception,
    skip_corrupt: bool = False,
    verify: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> LatentShardDataset:
    """Functional form of :class:`LatentShardDataset` (see there for the arguments)."""
    return LatentShardDataset(
        source,
        num_tokens=num_tokens,
        normalize=normalize,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        split_by_node=split_by_node,
        handler=handler,
        skip_corrupt=skip_corrupt,
        verify=verify,
        seed=seed,
        **kwargs,
    )

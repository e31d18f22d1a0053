"""The latent sample format of the WebDataset shards: encoding, decoding, latent statistics, tar reading.

Used by ``data/latent_shards.py`` (writer, manifest, reader), which builds on this module and never the other way
round; format-only, it imports nothing of ``vae``. Reading ``manifest.json`` is here too (the latent statistics
are read from it); writing it is in ``latent_shards.py``.

Sample layout (one sample per shape; member names inside the tar are ``<key>.<suffix>``):

- ``latents.npy``  -- array ``(V, N, C)``: V views (independent encodings of different random point subsets of
  the same shape; V = 1 unless ``--num-views``), N tokens in farthest-point-sampling order (any prefix
  ``[:, :k]`` is a coarse cover of the shape, so training at fewer tokens needs no re-caching), C latent channels.
  Stored as float16 / float32, or for bf16 as ``uint16`` holding the raw bfloat16 bits (npy has no bfloat16);
  the ``dtype`` field of ``json`` and of the manifest says which.
- ``caption.txt``  -- the first caption (UTF-8); all captions are in ``json["captions"]``.
- ``shape_id.txt`` -- the shape id (the tar key is a sanitised form of it, since webdataset splits keys at dots).
- ``source.txt``   -- the source mesh path recorded by ``dora prepare`` (else the prepared sample's path).
- ``json``         -- metadata: shape_id, captions, category, source, prepared_path, num_tokens, num_views,
  latent_channels, dtype, token_order, and ``meta`` (the prepared sample's own metadata).
- ``render_<v>.png`` -- optional, v = 0 .. R-1: the shape's condition images (``dora render-views``: shaded
  renders from random views, recentred as inference images are), 8-bit RGB PNG; ``json["renders"]`` holds their
  count, size and cameras, and the manifest's ``renders`` entry says the whole cache has them. Shards without them
  (text-only caches, older caches) read as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "dora-latent-shards"
FORMAT_VERSION = 1
DTYPES = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}  # numpy storage type per --dtype
TAR_BLOCK = 512
SAMPLE_KEYS = {
    "latents.npy": "(V, N, C) latents; tokens in FPS order; fp16/fp32, or uint16 = raw bf16 bits",
    "caption.txt": "first caption (UTF-8)",
    "shape_id.txt": "shape id",
    "source.txt": "source mesh path (or prepared sample path)",
    "json": "metadata: shape_id, captions, category, source, prepared_path, num_tokens, num_views, "
    "latent_channels, dtype, token_order, meta (prepared sample metadata)",
}
RENDER_MEMBER = "render_{view}.png"  # optional members: one 8-bit RGB PNG per condition image
IMAGE_MODES = ("none", "one", "all")  # what decode_sample reads of the condition images
OPTIONAL_SAMPLE_KEYS = {RENDER_MEMBER.format(view="<v>"): "condition image v (8-bit RGB PNG), when rendered"}


@dataclass
class LatentSums:
    """Per-channel count / sum / sum of squares in float64: one streaming pass, mergeable across shards/ranks."""

    count: int = 0
    total: np.ndarray | None = None  # (C,) float64
    total_sq: np.ndarray | None = None  # (C,) float64

    def update(self, latents: np.ndarray) -> None:
        values = np.asarray(latents, dtype=np.float64).reshape(-1, latents.shape[-1])  # (V*N, C)
        if self.total is None:
            self.total = np.zeros(values.shape[1])
            self.total_sq = np.zeros(values.shape[1])
        self.count += values.shape[0]
        self.total += values.sum(axis=0)
        self.total_sq += np.square(values).sum(axis=0)

    def merge(self, other: LatentSums) -> LatentSums:
        if other.total is None:
            return self
        if self.total is None:
            return LatentSums(other.count, other.total.copy(), other.total_sq.copy())
        return LatentSums(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": [float(v) for v in self.total],
            "sum_sq": [float(v) for v in self.total_sq],
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LatentSums:
        return cls(
            int(values["count"]),
            np.asarray(values["sum"], np.float64),
            np.asarray(values["sum_sq"], np.float64),
        )


@dataclass
class LatentStats:
    """Per-channel mean / std of the cached latents; ``normalize`` maps them to ~zero mean, unit variance."""

    mean: np.ndarray  # (C,) float64
    std: np.ndarray  # (C,) float64
    count: int = 0
    min_std: float = 1e-6  # a dead channel must not blow up to inf

    @classmethod
    def from_sums(cls, sums: LatentSums) -> LatentStats:
        if sums.count == 0 or sums.total is None:
            raise ValueError("cannot compute latent statistics from zero values")
        mean = sums.total / sums.count
        variance = np.maximum(sums.total_sq / sums.count - np.square(mean), 0.0)  # population variance
        return cls(mean=mean, std=np.sqrt(variance), count=sums.count)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | str | Path) -> LatentStats:
        """From a manifest dict, or a shard folder / manifest path or URL."""
        if not isinstance(manifest, dict):
            manifest = load_manifest(manifest)
        return cls.from_dict(manifest["stats"])

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LatentStats:
        return cls(
            np.asarray(values["mean"], np.float64),
            np.asarray(values["std"], np.float64),
            int(values["count"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "count": self.count}

    def _params(self, latents: Any) -> tuple[Any, Any]:
        std = np.maximum(self.std, self.min_std)
        if isinstance(latents, torch.Tensor):  # cached: the reader normalises every sample
            key = (latents.dtype, latents.device)
            cache = self.__dict__.setdefault("_tensors", {})
            if key not in cache:
                cache[key] = (
                    torch.as_tensor(self.mean, dtype=key[0], device=key[1]),
                    torch.as_tensor(std, dtype=key[0], device=key[1]),
                )
            return cache[key]
        return self.mean.astype(latents.dtype), std.astype(latents.dtype)

    def normalize(self, latents: Any) -> Any:
        """(..., C) tensor or array -> (latents - mean) / std, same type, dtype and device."""
        mean, std = self._params(latents)
        return (latents - mean) / std

    def denormalize(self, latents: Any) -> Any:
        """Inverse of :meth:`normalize`: what the diffusion model produces -> what the VAE decodes."""
        mean, std = self._params(latents)
        return latents * std + mean


def to_storage(latents: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Float latents -> the stored numpy array (bf16 as uint16 bits, rounded to nearest even by torch)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown latent dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    tensor = torch.as_tensor(latents).detach().cpu().float()
    if dtype == "bf16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy().astype(DTYPES[dtype])


def from_storage(array: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """Stored array -> float32 (uint16 arrays are bf16 bits: shift into the high half of a float32)."""
    if dtype == "bf16" or array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def sample_key(shape_id: str) -> str:
    """A tar key for a shape id: webdataset splits member names at the first dot, so no dots or slashes."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", shape_id)
    if key != shape_id:
        key += "_" + hashlib.sha1(shape_id.encode()).hexdigest()[:8]  # keep sanitised ids unique
    return key


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless; renders on white compress ~10x)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8; a ValueError naming ``where`` when they are not an RGB image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    except Exception as error:
        raise ValueError(f"{where}: unreadable condition image ({type(error).__name__}: {error})") from error
    return array  # (H, W, 3)


def encode_sample(
    shape_id: str,
    stored_latents: np.ndarray,
    captions: list[str],
    source: str,
    metadata: dict[str, Any],
    renders: np.ndarray | None = None,
) -> dict[str, Any]:
    """One shape -> a webdataset sample dict of bytes (see the module docstring for the keys); ``renders``
    (R, H, W, 3) uint8 adds one PNG member per condition image."""
    buffer = io.BytesIO()
    np.save(buffer, stored_latents, allow_pickle=False)
    sample = {
        "__key__": sample_key(shape_id),
        "latents.npy": buffer.getvalue(),
        "caption.txt": (captions[0] if captions else "").encode("utf-8"),
        "shape_id.txt": shape_id.encode("utf-8"),
        "source.txt": source.encode("utf-8"),
        "json": json.dumps(metadata, default=str).encode("utf-8"),
    }
    for view, image in enumerate(renders if renders is not None else []):
        sample[RENDER_MEMBER.format(view=view)] = encode_png(image)
    return sample


def render_members(raw: dict[str, Any]) -> list[str]:
    """The sample's condition-image member names in view order (none for a text-only cache)."""
    found = [key for key in raw if key.startswith("render_") and key.endswith(".png")]
    return sorted(found, key=lambda key: int(key[len("render_") : -len(".png")]))


def decode_renders(raw: dict[str, Any]) -> np.ndarray:
    """Every condition image of a raw sample, (R, H, W, 3) uint8; a ValueError naming the sample if it has none."""
    members = render_members(raw)
    where = f"sample {raw.get('__key__')} ({raw.get('__url__', 'shard')})"
    if not members:
        raise ValueError(
            f"{where} has no condition images: the cache was made without renders; run `dora render-views "
            "PREPARED`, then `dora cache-latents` into a new folder"
        )
    return np.stack([decode_png(raw[key], f"{where} {key}") for key in members])  # (R, H, W, 3)


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """np.load of npy bytes, remembering parsed headers: numpy parses each header with ast.literal_eval
    (~50 us), and all samples of a cache share one header."""
    header_end = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else 0
    known = _NPY_HEADERS.get(data[:header_end]) if header_end else None
    if known is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if header_end and array.flags.c_contiguous and len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[data[:header_end]] = (array.dtype, array.shape, header_end)
        return array
    dtype, shape, offset = known
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def decode_sample(
    raw: dict[str, Any],
    num_tokens: int | None = None,
    stats: LatentStats | None = None,
    view: int | None = None,
    rng: random.Random | None = None,
    images: str = "none",
) -> dict[str, Any]:
    """Raw tar sample -> {latents (N, C) float32 tensor, caption, shape_id, meta} (+ ``image``).

    One view is taken (``view``, else a random one when V > 1), truncated to the first ``num_tokens`` tokens
    (a valid coarse cover: FPS order) and normalised with ``stats`` when given. A random caption is chosen when a
    shape has several. ``images``: ``"none"``; ``"one"`` adds ``image``, a random condition image (H, W, 3) uint8
    tensor; ``"all"`` adds ``images``, all of them (R, H, W, 3). A sample cached without renders is then a
    ValueError naming it.
    """
    meta = json.loads(raw["json"])
    stored = load_npy(raw["latents.npy"])  # (V, N, C)
    rng = rng or random
    index = view if view is not None else (rng.randrange(stored.shape[0]) if stored.shape[0] > 1 else 0)
    if num_tokens is not None and num_tokens > stored.shape[1]:
        raise ValueError(
            f"sample {meta.get('shape_id')}: asked for {num_tokens} tokens, cached {stored.shape[1]}"
        )
    latents = torch.from_numpy(from_storage(stored[index, :num_tokens], meta.get("dtype")))  # (N, C)
    if stats is not None:
        latents = stats.normalize(latents)
    captions = meta.get("captions") or [raw["caption.txt"].decode("utf-8")]
    meta["view"] = index
    sample = {"latents": latents, "caption": rng.choice(captions), "shape_id": meta["shape_id"], "meta": meta}
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    if images == "all":
        sample["images"] = torch.from_numpy(decode_renders(raw))  # (R, H, W, 3)
    elif images == "one":  # drawn after the caption, so text-only reading consumes the generator as before
        members = render_members(raw)
        if not members:
            decode_renders(raw)  # raises, naming the sample
        key = members[rng.randrange(len(members))]
        sample["image"] = torch.from_numpy(
            decode_png(raw[key], f"sample {meta['shape_id']} {key}")
        )  # (H, W, 3)
    return sample


def collate_latents(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate: stack latents (B, N, C) and condition images (B, H, W, 3) when read; captions / shape
    ids / metas stay lists."""
    collated = {
        "latents": torch.stack([item["latents"] for item in batch]),  # (B, N, C)
        "caption": [item["caption"] for item in batch],
        "shape_id": [item["shape_id"] for item in batch],
        "meta": [item["meta"] for item in batch],
    }
    if "image" in batch[0]:
        collated["image"] = torch.stack([item["image"] for item in batch])  # (B, H, W, 3)
    return collated


def tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream.

    Python's tarfile parses each header generically (~100 us per member, most of the read time for 64 KB
    samples); this reads the USTAR headers our TarWriter writes (plus pax / GNU long names from other tools)
    directly, ~15x faster. It is strict where tarfile is lenient: a bad header checksum, a short member and a
    missing end-of-archive marker (a file cut at a member boundary) are errors.
    """
    long_name = None
    while True:
        header = stream.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            raise EOFError(
                "unexpected end of data (no end-of-archive marker)" if not header else "short header"
            )
        if header == bytes(TAR_BLOCK):
            return
        checksum = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as 8 spaces
            raise ValueError("bad tar header checksum")
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(f"unexpected end of data in member {header[:100].rstrip(bytes(1)).decode()!r}")
        stream.read(-size % TAR_BLOCK)
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode()
        elif kind in (b"x", b"g"):  # pax header: only the path matters here
            for line in data.decode().splitlines():
                if "path=" in line:
                    long_name = line.split("path=", 1)[1]
        elif kind in (b"0", b"\0"):
            prefix = header[345:500].rstrip(b"\0").decode()
            name = long_name or (prefix + "/" if prefix else "") + header[:100].rstrip(b"\0").decode()
            long_name = None
            yield name, data
        else:
            long_name = None


def _manifest_location(source: str | Path) -> str:
    text = str(source)
    if text.endswith(".json"):
        return text
    return text.rstrip("/") + "/" + MANIFEST_NAME


def load_manifest(source: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` from a shard folder, a manifest path, or any URL webdataset's gopen opens."""
    location = _manifest_location(source)
    try:
        with wds.gopen(location, "rb") as handle:
            manifest = json.loads(handle.read())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot read latent-shard manifest {location}: {error}") from error
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{location} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    manifest["base_url"] = location.rsplit("/", 1)[0] if "/" in location else "."
    return manifest

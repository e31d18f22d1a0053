"""`dora cache-latents`: a frozen DoraVAE encodes every prepared shape once into WebDataset latent shards.

Run with any number of processes (``accelerate launch [--cpu] --num_processes N -m dora_shapegen.vae.cache_latents ...`` or
torchrun): each rank encodes a disjoint part of the shapes and writes its own shards ``{rank:05d}-{index:06d}.tar``;
the latent statistics are all-reduced (float64 sums) and rank 0 writes ``manifest.json``. The output folder must
be shared by all ranks (one filesystem), since the progress log there is what makes a run resumable:

- a shard is written to ``.tar.tmp``, fsynced and renamed, and only then recorded in ``progress/rank-RRRRR.jsonl``
  (its name, sample count, sha256, shape ids and per-channel sums); that append is the commit point;
- on (re)start, rank 0 deletes every shard file not recorded (a half-written or unrecorded shard) and drops a torn
  last line of each log; recorded shapes are never encoded again, all the others are;
- partition: all shape ids sorted, rank r takes every W-th from r (stable for the same world size W). When the log
  holds shards from a run with another world size, the not-yet-done shapes are divided the same way instead, so
  the new ranks stay balanced; each rank continues its shard numbering after the highest index recorded for it.

A prepared sample that cannot be read or encoded is logged to ``progress/failures-RRRRR.jsonl`` (and listed in the
manifest) and skipped; a rerun tries it again. Text embeddings are not cached (the text encoder runs at training
time; it is small next to the VAE encoder).

Condition images: when ``PREPARED/renders`` holds the renders of `dora render-views` (``renders: auto``, or
``on`` to require them), every sample also stores its renders as ``render_<v>.png`` members (the image encoder runs
at training time, as the text encoder does: the CPU default trains with the DiT, so features could not be cached)
and the manifest records the render settings under ``renders``; a shape without renders is then a logged failure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from dora_shapegen import cli_types
from dora_shapegen.config import load_config, to_dict
from dora_shapegen.data.latent_shards import (
    LatentShardWriter,
    LatentSums,
    ShardRecord,
    build_manifest,
    to_storage,
    write_manifest,
)
from dora_shapegen.data.prepare import load_prepared
from dora_shapegen.errors import disk_full_names
from dora_shapegen.seeding import derive_seed

PROGRESS_DIR = "progress"
CONTENT_KEYS = ("num_tokens", "num_views", "dtype", "sample_posterior", "seed")


@dataclass
class CacheConfig:
    num_tokens: int = 2048  # maximum token count cached; any prefix can be used later (FPS order)
    num_views: int = 1  # encodings per shape from different random point subsets, stored as a (V, N, C) axis
    batch_size: int = 8  # shapes per encoder call (x num_views rows)
    dtype: str = "fp16"  # fp16 | bf16 | fp32
    max_samples: int = 1000  # per shard
    max_bytes: int = 512 * 2**20  # per shard
    sample_posterior: bool = False  # False: posterior mean (deterministic)
    seed: int = 0  # point subsets and posterior samples are seeded per (seed, shape id, view)
    num_workers: int = 1  # DataLoader workers reading prepared samples
    n_uniform: int | None = None  # points per stream fed to the encoder; None = the VAE config's
    n_salient: int | None = None
    # Condition images (`dora render-views`) beside the latents: "auto" when PREPARED/renders holds any, "on"
    # (required: a shape without renders fails), "off".
    renders: str = "auto"


RENDER_MODES = ("auto", "on", "off")
RENDER_KEYS = ("num_views", "size", "border_ratio", "elevation_range", "seed", "supersample", "render_scale")


def render_settings(prepared_dir: Path, mode: str) -> dict[str, Any] | None:
    """What the cache records about its condition images (the render config), or None when it holds none."""
    from dora_shapegen.data.render_views import renders_folder

    if mode not in RENDER_MODES:
        raise ValueError(f"renders must be one of {RENDER_MODES}, got {mode!r}")
    folder = renders_folder(prepared_dir)
    present = folder.is_dir() and any(folder.glob("*.npz"))
    if mode == "off" or (mode == "auto" and not present):
        return None
    if not present or not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder}: no renders; run `dora render-views {prepared_dir}` first")
    import yaml

    recorded = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return {key: recorded.get(key) for key in RENDER_KEYS} | {"folder": str(folder), "format": "png"}


def view_points(
    points: np.ndarray, normals: np.ndarray, count: int, seed: int, keep_all: bool
) -> torch.Tensor:
    """(P, 3) points + normals -> (count, 6): all in order when ``keep_all`` and P == count, else a seeded random
    subset (with replacement only if P < count)."""
    cloud = torch.from_numpy(np.concatenate([points, normals], axis=1).astype(np.float32))  # (P, 6)
    if keep_all and len(cloud) == count:
        return cloud
    generator = torch.Generator().manual_seed(seed)
    if len(cloud) >= count:
        return cloud[torch.randperm(len(cloud), generator=generator)[:count]]  # (count, 6)
    return cloud[torch.randint(len(cloud), (count,), generator=generator)]  # (count, 6)


class PreparedViews(torch.utils.data.Dataset):
    """Prepared sample -> its V views of (uniform (V, n_u, 6), salient (V, n_s, 6)); errors are returned, not
    raised, so one corrupt file is logged and skipped instead of killing a worker."""

    def __init__(
        self,
        items: list[tuple[str, Path]],
        n_uniform: int,
        n_salient: int,
        num_views: int,
        seed: int,
        renders: dict[str, Any] | None = None,
    ):
        self.items, self.n_uniform, self.n_salient = items, n_uniform, n_salient
        self.num_views, self.seed, self.renders = num_views, seed, renders

    def _renders(self, shape_id: str) -> dict[str, Any]:
        """The shape's condition images, checked against the cache's render settings."""
        from dora_shapegen.data.render_views import load_renders

        path = Path(self.renders["folder"]) / f"{shape_id}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"shape {shape_id} has no renders ({path}); run `dora render-views`")
        renders = load_renders(path)
        count, size = self.renders["num_views"], self.renders["size"]
        if renders["images"].shape[:3] != (count, size, size):
            raise ValueError(
                f"{path}: {renders['images'].shape[0]} renders of {renders['images'].shape[1]} px, the render "
                f"config says {count} of {size} px; render again with --overwrite"
            )
        return renders

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shape_id, path = self.items[index]
        try:
            sample = load_prepared(path)  # clear error naming the file when corrupt
            keep_all = self.num_views == 1
            views = [
                (
                    view_points(
                        sample["uniform_points"],
                        sample["uniform_normals"],
                        self.n_uniform,
                        derive_seed(self.seed, "cache-uniform-points", shape_id, view),
                        keep_all,
                    ),
                    view_points(
                        sample["salient_points"],
                        sample["salient_normals"],
                        self.n_salient,
                        derive_seed(self.seed, "cache-salient-points", shape_id, view),
                        keep_all,
                    ),
                )
                for view in range(self.num_views)
            ]
            renders = self._renders(shape_id) if self.renders else None
        except Exception as error:  # a batch job logs, skips and goes on
            return {"shape_id": shape_id, "path": str(path), "error": f"{type(error).__name__}: {error}"}
        item = {
            "shape_id": shape_id,
            "path": str(path),
            "meta": sample["meta"],
            "uniform": torch.stack([u for u, _ in views]),
            "salient": torch.stack([s for _, s in views]),
        }
        if renders is not None:
            item["renders"] = renders
        return item


def vae_identity(vae_dir: Path, model: torch.nn.Module) -> dict[str, Any]:
    """The VAE's config and the sha256 of its weight file(s): what the manifest pins the latents to."""
    from dora_shapegen.provenance import weight_hashes

    return {
        "path": str(vae_dir),
        "class": type(model).__name__,
        "config": dict(model.config),
        "weights_sha256": weight_hashes(vae_dir),
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (killed mid-append) was never committed and is dropped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record durably. A full disk raises DiskFullError naming the log; a line torn by it is dropped
    on the next start (``read_jsonl``), so the shard it would have committed is redone, never duplicated."""
    with disk_full_names(path), open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def recover(out_dir: Path) -> None:
    """Rank 0 before anyone starts: rewrite each log without a torn line and delete unrecorded shard files."""
    progress = out_dir / PROGRESS_DIR
    recorded = set()
    for log in sorted(progress.glob("*.jsonl")):
        records = read_jsonl(log)
        recorded |= {record["name"] for record in records if "name" in record}
        temporary = log.with_suffix(".tmp")
        with disk_full_names(log):
            temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
            os.replace(temporary, log)
    for path in list(out_dir.glob("*.tar")) + list(out_dir.glob("*.tar.tmp")):
        if path.name not in recorded:
            path.unlink()


def my_shapes(
    all_ids: list[str], done: set[str], world_sizes: set[int], rank: int, world_size: int
) -> list[str]:
    """This rank's shapes: every W-th of all ids (stable for one world size), minus those already done; after a
    world-size change, every W-th of the not-yet-done ids (balanced for the new ranks)."""
    if world_sizes <= {world_size}:
        return [shape for shape in all_ids[rank::world_size] if shape not in done]
    return [shape for shape in all_ids if shape not in done][rank::world_size]


def check_settings(out_dir: Path, settings: dict[str, Any], write: bool = True) -> None:
    """Refuse to extend shards made with other settings or another VAE (they would mix in one manifest)."""
    path = out_dir / PROGRESS_DIR / "settings.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(settings, default=str)):
            changed = sorted(
                key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key)
            )
            raise ValueError(
                f"{out_dir} holds shards cached with other settings ({changed}); use a new --out"
            )
    elif write:
        path.with_suffix(".tmp").write_text(json.dumps(settings, indent=2, default=str))
        os.replace(path.with_suffix(".tmp"), path)


def encode_batch(model: Any, batch: list[dict[str, Any]], config: CacheConfig) -> torch.Tensor:
    """Shapes x views -> (B, V, N, C) latents in one encoder call (rows = B*V). The prepared epsilon is passed
    on so that the VAE warns when the data was prepared at another scale than it was trained at."""
    epsilon = batch[0]["meta"].get("epsilon")
    uniform = torch.cat([item["uniform"] for item in batch])  # (B*V, n_u, 6)
    salient = torch.cat([item["salient"] for item in batch])  # (B*V, n_s, 6)
    generator = None
    if (
        config.sample_posterior
    ):  # one generator per row (diffusers' randn_tensor takes a list): batching-proof
        generator = [
            torch.Generator().manual_seed(derive_seed(config.seed, "cache-posterior", item["shape_id"], view))
            for item in batch
            for view in range(config.num_views)
        ]
    with torch.no_grad():
        latents = model.encode(
            {"uniform": uniform, "salient": salient, "epsilon": epsilon},
            num_tokens=config.num_tokens,
            sample_posterior=config.sample_posterior,
            generator=generator,
        )  # (B*V, N, C)
    return latents.reshape(len(batch), config.num_views, *latents.shape[1:])  # (B, V, N, C)


def cache_latents(
    vae_dir: str | Path,
    prepared_dir: str | Path,
    out_dir: str | Path,
    config: CacheConfig,
    limit: int | None = None,
) -> dict[str, Any] | None:
    """Encode every prepared shape not yet cached into ``out_dir``; returns the manifest on rank 0."""
    from dora_shapegen.training.loop import check_cpu_launch
    from dora_shapegen.vae import DoraVAE

    check_cpu_launch()
    # cpu=True lets accelerate set up gloo for a CPU-only torchrun / `accelerate launch --multi_gpu` run
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world_size = state.process_index, state.num_processes
    vae_dir, out_dir, prepared_dir = Path(vae_dir), Path(out_dir), Path(prepared_dir)
    samples_dir = prepared_dir / "samples" if (prepared_dir / "samples").is_dir() else prepared_dir
    files = {path.stem: path for path in sorted(samples_dir.glob("*.npz"))}
    if not files:
        raise FileNotFoundError(f"no prepared samples (*.npz) in {samples_dir}")
    all_ids = sorted(files)[:limit]

    model = DoraVAE.from_pretrained(vae_dir).to(state.device).eval().requires_grad_(False)
    n_uniform = config.n_uniform or int(model.config.n_uniform)
    n_salient = config.n_salient or int(model.config.n_salient)
    uniform_tokens, salient_tokens = model.token_split(config.num_tokens)
    if uniform_tokens > n_uniform or (model.config.use_salient and salient_tokens > n_salient):
        raise ValueError(
            f"num_tokens={config.num_tokens} needs {uniform_tokens} uniform / {salient_tokens} salient "
            f"points per view, but n_uniform={n_uniform}, n_salient={n_salient}"
        )
    identity = vae_identity(vae_dir, model)
    # what decides the latents' content and layout; batch size, workers and shard bounds may change on resume
    settings = {key: value for key, value in to_dict(config).items() if key in CONTENT_KEYS}
    settings.update(n_uniform=n_uniform, n_salient=n_salient, vae=identity["weights_sha256"])
    renders = render_settings(prepared_dir, config.renders)
    if renders is not None:  # only then: a text-only cache made before keeps its recorded settings
        settings["renders"] = {key: renders[key] for key in RENDER_KEYS}
    progress = out_dir / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, settings, write=state.is_main_process)  # every rank fails alike on a mismatch
    if state.is_main_process:
        recover(out_dir)
    state.wait_for_everyone()

    records = [record for log in sorted(progress.glob("rank-*.jsonl")) for record in read_jsonl(log)]
    done = {shape for record in records for shape in record["shape_ids"]}
    mine = my_shapes(all_ids, done, {record["world_size"] for record in records}, rank, world_size)
    prefix = f"{rank:05d}-"
    start = 1 + max([int(r["name"][6:12]) for r in records if r["name"].startswith(prefix)], default=-1)
    log_path, failure_path = progress / f"rank-{rank:05d}.jsonl", progress / f"failures-{rank:05d}.jsonl"

    def commit(record: ShardRecord) -> None:
        append_jsonl(
            log_path, {**record.to_dict(), "rank": rank, "world_size": world_size, "time": time.time()}
        )

    def fail(item: dict[str, Any], error: str) -> None:
        append_jsonl(failure_path, {"shape_id": item["shape_id"], "path": item["path"], "error": error})

    dataset = PreparedViews(
        [(shape, files[shape]) for shape in mine],
        n_uniform,
        n_salient,
        config.num_views,
        config.seed,
        renders,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        collate_fn=list,
        num_workers=config.num_workers if len(mine) > config.batch_size else 0,
    )
    start_time, encoded = time.perf_counter(), 0
    bar = tqdm(
        total=len(mine),
        unit="shape",
        desc=f"caching latents (rank {rank}/{world_size})",
        disable=not state.is_local_main_process,
    )
    with LatentShardWriter(out_dir, rank, start, config.max_samples, config.max_bytes, commit) as writer:
        for batch in loader:
            good = []
            for item in batch:
                if "error" in item:
                    fail(item, item["error"])
                else:
                    good.append(item)
            latents = None
            if good:
                try:
                    latents = encode_batch(model, good, config)  # (B, V, N, C)
                except Exception:  # find the bad shape(s): encode one by one
                    kept = []
                    for item in good:
                        try:
                            kept.append((item, encode_batch(model, [item], config)[0]))
                        except Exception as error:
                            fail(item, f"encode failed: {type(error).__name__}: {error}")
                    good, latents = [item for item, _ in kept], [lat for _, lat in kept]
            for item, shape_latents in zip(good, latents if latents is not None else []):
                meta = item["meta"]
                captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
                if isinstance(captions, str):
                    captions = [captions]
                metadata = {
                    "shape_id": item["shape_id"],
                    "captions": captions,
                    "category": meta.get("category"),
                    "source": meta.get("source"),
                    "prepared_path": item["path"],
                    "num_tokens": config.num_tokens,
                    "num_views": config.num_views,
                    "latent_channels": int(shape_latents.shape[-1]),
                    "dtype": config.dtype,
                    "token_order": "fps",
                    "meta": meta,
                }
                images = None
                if "renders" in item:
                    images = item["renders"]["images"]  # (R, S, S, 3)
                    metadata["renders"] = {
                        "num_views": int(images.shape[0]),
                        "size": int(images.shape[1]),
                        "cameras": item["renders"]["cameras"].tolist(),  # (elevation, azimuth) degrees
                    }
                writer.write(
                    item["shape_id"],
                    to_storage(shape_latents, config.dtype),
                    captions,
                    str(meta.get("source") or item["path"]),
                    metadata,
                    images,
                )
                encoded += 1
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start_time
    state.wait_for_everyone()
    run = {"world_size": world_size, "shapes_encoded": encoded, "seconds": seconds}
    return finish(out_dir, state, identity, config, settings, int(model.config.latent_channels), all_ids, run)


def finish(
    out_dir: Path,
    state: PartialState,
    identity: dict[str, Any],
    config: CacheConfig,
    settings: dict[str, Any],
    channels: int,
    all_ids: list[str],
    run: dict[str, Any],
) -> dict[str, Any] | None:
    """Reduce the statistics across ranks and write the manifest once (rank 0)."""
    progress = out_dir / PROGRESS_DIR
    rank, world_size = state.process_index, state.num_processes
    # Each rank adds up the shards logged under its rank (from this and earlier runs); rank 0 also takes logs of
    # ranks beyond the current world size. The per-shard sums make the statistics exact across resumes.
    owned = [
        log
        for log in sorted(progress.glob("rank-*.jsonl"))
        if int(log.stem[5:]) == rank or (rank == 0 and int(log.stem[5:]) >= world_size)
    ]
    sums = LatentSums(0, np.zeros(channels), np.zeros(channels))
    for log in owned:
        for record in read_jsonl(log):
            sums = sums.merge(LatentSums.from_dict(record["sums"]))
    packed = torch.tensor([sums.count, *sums.total, *sums.total_sq], dtype=torch.float64)  # (1 + 2C,)
    encoded, seconds = torch.tensor([float(run["shapes_encoded"])]), torch.tensor([run["seconds"]])
    if world_size > 1:
        torch.distributed.all_reduce(packed)  # gloo on CPU, float64 sums
        torch.distributed.all_reduce(encoded)
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)  # the slowest rank
    run.update(shapes_encoded=int(encoded.item()), seconds=round(float(seconds.item()), 4))
    run["shapes_per_second"] = round(run["shapes_encoded"] / max(run["seconds"], 1e-9), 3)
    if not state.is_main_process:
        return None
    total = LatentSums(
        int(packed[0].item()), packed[1 : 1 + channels].numpy(), packed[1 + channels :].numpy()
    )
    records = [
        ShardRecord.from_dict(r) for log in sorted(progress.glob("rank-*.jsonl")) for r in read_jsonl(log)
    ]
    cached = [shape for record in records for shape in record.shape_ids]
    if len(cached) != len(set(cached)):
        raise RuntimeError(
            f"{out_dir}: a shape is recorded in two shards; the progress logs are inconsistent"
        )
    failures = {
        r["shape_id"]: r for log in sorted(progress.glob("failures-*.jsonl")) for r in read_jsonl(log)
    }
    failures = [failure for shape, failure in sorted(failures.items()) if shape not in set(cached)]
    manifest = build_manifest(
        records,
        total,
        vae=identity,
        epsilon=identity["config"].get("epsilon"),
        num_tokens=config.num_tokens,
        token_order="fps: tokens are farthest-point-sampling ordered (uniform/salient interleaved); any prefix "
        "latents[:, :k] is a coarse cover, so train on fewer tokens by truncating",
        latent_channels=channels,
        num_views=config.num_views,
        dtype=config.dtype,
        storage_dtype="uint16 (raw bfloat16 bits)" if config.dtype == "bf16" else config.dtype,
        latent_shape=["num_views", "num_tokens", "latent_channels"],
        cache_config=to_dict(config),
        settings=settings,
        renders=settings.get("renders"),
        world_size=world_size,
        last_run=run,
        num_input_shapes=len(all_ids),
        num_failures=len(failures),
        failures=failures,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    assert manifest["num_samples"] == len(cached) and total.count == sum(r.sums.count for r in records)
    write_manifest(out_dir, manifest)
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dora cache-latents", description=__doc__.split("\n")[0])
    parser.add_argument("--vae", required=True, help="VAE folder written by save_pretrained")
    parser.add_argument("--data", required=True, help="prepared dataset root (PREPARED, with samples/*.npz)")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument(
        "--config", default="cache/default.yaml", help="YAML (CacheConfig); flags override it"
    )
    parser.add_argument(
        "--limit", type=cli_types.positive_int, default=None, help="only the first N shapes (sorted by id)"
    )
    positive = cli_types.positive_int
    for name, kind in [
        ("num-tokens", positive),
        ("num-views", positive),
        ("batch-size", positive),
        ("max-samples", positive),
        ("max-bytes", positive),
        ("seed", cli_types.seed),
        ("num-workers", cli_types.non_negative_int),  # 0: read in the main process
        ("n-uniform", positive),
        ("n-salient", positive),
    ]:
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument(
        "--renders",
        choices=RENDER_MODES,
        default=None,
        help="store the condition images of `dora render-views` beside the latents: auto (when PREPARED/renders "
        "exists), on (required), off",
    )
    parser.add_argument("--sample-posterior", action="store_true", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key not in {"vae", "data", "out", "config", "limit"} and value is not None
    }
    config = load_config(CacheConfig, args.config, overrides)
    try:
        manifest = cache_latents(args.vae, args.data, args.out, config, limit=args.limit)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other ranks wait while rank 0 writes the manifest
    finally:
        # Tear the process group down explicitly: a rank that exits with gloo's threads alive can abort in C++
        # ("terminate called without an active exception"), which torchrun reports as a failed run.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if manifest is not None:
        print(
            f"cached {manifest['num_samples']} shapes in {manifest['num_shards']} shards -> {args.out} "
            f"({manifest['num_failures']} failures)"
        )
    return 0


if __name__ == "__main__":  # torchrun / accelerate launch -m dora_shapegen.vae.cache_latents: an entry point
    from dora_shapegen.runtime import flush_denormals

    flush_denormals()  # denormals slow the CPU several-fold (see core/runtime.py)
    from dora_shapegen.errors import run_reporting_errors

    raise SystemExit(run_reporting_errors(main))  # one-line errors, as `dora` prints them

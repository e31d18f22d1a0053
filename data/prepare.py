"""`dora prepare`: meshes -> watertight -> surface/sharp samples + occupancy/TSDF supervision, at dataset scale.

Input: a folder of meshes, an index file (JSONL or CSV rows: ``path``, ``caption``, optional ``category``/``id``),
or ``--builtin N`` (the procedural dataset). Output under ``PREPARED/``:
``samples/<shape_id>.npz`` (one npz per shape, uncompressed unless ``storage: npz_compressed``), ``failures.jsonl``,
``summary.json``, ``config.yaml``. ``--ray [ADDRESS]`` runs the same per-shape work on a Ray cluster
(``data/prepare_ray.py``).

Why one npz per shape rather than WebDataset shards: resume is "skip the file if it exists", a killed run loses
only the shape in flight (each file is written to a temporary name and renamed atomically), ``--num-shards`` /
``--shard-index`` jobs never contend for an output file, and VAE training needs random access with a fresh random
subset of points per epoch, which a map-style dataset over files gives directly. Prepared samples are small
(2.4 MB uncompressed at Dora's point counts); the latent cache (a later stage, streamed sequentially) is where tar
shards pay off.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dora_shapegen import cli_types, seeding
from dora_shapegen.config import load_config, save_yaml, to_dict
from dora_shapegen.data.mesh_io import MESH_INPUT_SUFFIXES
from dora_shapegen.data.prepare_worker import PrepareConfig, check_storage, init_worker, process_item
from dora_shapegen.errors import DiskFullError, DoraError, disk_full_names

ARRAY_KEYS = ("uniform_points", "uniform_normals", "salient_points", "salient_normals")
SUPERVISION_KEYS = ("sup_points", "sup_occupancy", "sup_tsdf", "sup_group")
DEFAULT_CONFIG = "prepare/default.yaml"


class PreparedSampleError(DoraError, ValueError):
    """A prepared npz that cannot be read (truncated, corrupt, missing keys); the message names the file."""


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "shape"


def read_index(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL or CSV index: ``path`` (relative to the index's folder), ``caption``, ``captions``, ``category``, ``id``."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            rows = [dict(row) for row in csv.DictReader(handle)]
    else:
        with open(path) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
    items = []
    for number, row in enumerate(rows, 1):
        if not row.get("path"):
            raise ValueError(f"{path}: row {number} has no 'path'")
        mesh_path = Path(row["path"])
        if not mesh_path.is_absolute():
            mesh_path = path.parent / mesh_path
        shape_id = _safe_id(str(row.get("id") or row.get("shape_id") or mesh_path.stem))
        items.append(
            {
                "path": str(mesh_path),
                "shape_id": shape_id,
                "caption": str(row.get("caption") or ""),
                "captions": _captions(row, f"{path}: row {number}"),
                "category": str(row.get("category") or ""),
            }
        )
    return _check_unique(items, str(path))


def _captions(row: dict[str, Any], where: str) -> list[str]:
    """Every caption of an index row: ``captions`` (a JSON list, or ``|``-separated in a CSV) and/or ``caption``."""
    captions = row.get("captions") or []
    if isinstance(captions, str):
        captions = captions.split("|")
    if not isinstance(captions, list) or not all(isinstance(text, str) for text in captions):
        raise ValueError(f"{where}: 'captions' must be a list of strings, got {captions!r}")
    first = str(row.get("caption") or "")
    found = [text.strip() for text in ([first] if first else []) + captions if text.strip()]
    return list(dict.fromkeys(found))  # the first caption first, no repeats


def scan_folder(folder: str | Path) -> list[dict[str, Any]]:
    """Every mesh file under ``folder`` (recursive); the id is the relative path without suffix."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MESH_INPUT_SUFFIXES)
    items = [
        {
            "path": str(p),
            "shape_id": _safe_id(str(p.relative_to(folder).with_suffix("")).replace(os.sep, "__")),
            "caption": "",
            "captions": [],
            "category": p.parent.name if p.parent != folder else "",
        }
        for p in files
    ]
    return _check_unique(items, str(folder))


def _check_unique(items: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    seen: dict[str, str] = {}
    for item in items:
        if item["shape_id"] in seen:
            raise ValueError(
                f"{where}: duplicate shape id {item['shape_id']!r} ({seen[item['shape_id']]}, {item['path']})"
            )
        seen[item["shape_id"]] = item["path"]
    return items


def load_prepared(path: str | Path) -> dict[str, Any]:
    """One prepared sample: arrays (numpy) + ``meta`` (dict). Raises :class:`PreparedSampleError` naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in (*ARRAY_KEYS, *SUPERVISION_KEYS, "meta") if key not in archive.files]
            if missing:
                raise PreparedSampleError(f"{path}: not a prepared sample, missing key(s) {missing}")
            sample: dict[str, Any] = {key: archive[key] for key in (*ARRAY_KEYS, *SUPERVISION_KEYS)}
            sample["meta"] = json.loads(str(archive["meta"]))
    except PreparedSampleError:
        raise
    except Exception as error:  # zipfile.BadZipFile, EOFError, ValueError, OSError, JSONDecodeError ...
        raise PreparedSampleError(
            f"{path}: corrupt or unreadable prepared sample ({type(error).__name__}: {error})"
        ) from error
    return sample


class PreparedDataset(torch.utils.data.Dataset):
    """Prepared samples as tensors: ``uniform`` (N_u, 6), ``salient`` (N_s, 6), ``sup_points`` (M, 3),
    ``sup_occupancy`` / ``sup_tsdf`` (M,), ``sup_group`` (M,) long, and ``meta`` (dict).

    With counts given, each call draws a fresh random subset (different every epoch; DataLoader workers differ
    because the draw is seeded from torch's per-worker RNG, itself seeded by ``torch.manual_seed``).
    ``cache_in_memory`` keeps every decoded sample after its first read (each DataLoader worker holds its own
    copy): for data sets that fit in RAM it removes the npz decompression from every step, which at CPU scale is
    a large share of the step time.
    """

    def __init__(
        self,
        root: str | Path,
        n_uniform: int | None = None,
        n_salient: int | None = None,
        n_supervision: int | None = None,
        seed: int = 0,
        cache_in_memory: bool = False,
    ) -> None:
        root = Path(root)
        folder = root / "samples" if (root / "samples").is_dir() else root
        self.files = sorted(folder.glob("*.npz"))
        if not self.files:
            raise FileNotFoundError(f"no prepared samples (*.npz) in {folder}")
        self.n_uniform, self.n_salient, self.n_supervision = n_uniform, n_salient, n_supervision
        self.seed = seed
        self.cache_in_memory = cache_in_memory
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _pick(rng: np.random.Generator, total: int, count: int | None) -> np.ndarray | slice:
        if count is None or count >= total:
            return slice(None)
        return rng.choice(total, size=count, replace=False)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self._cache.get(index) if self.cache_in_memory else None
        if sample is None:
            sample = load_prepared(self.files[index])
            if self.cache_in_memory:
                self._cache[index] = sample
        draw = int(torch.randint(0, 2**31 - 1, (1,)).item())
        rng = seeding.rng(self.seed, index, draw)
        pick_u = self._pick(rng, len(sample["uniform_points"]), self.n_uniform)
        pick_s = self._pick(rng, len(sample["salient_points"]), self.n_salient)
        pick_q = self._pick(rng, len(sample["sup_points"]), self.n_supervision)
        copy_q = isinstance(pick_q, slice)
        uniform = np.concatenate(
            [sample["uniform_points"][pick_u], sample["uniform_normals"][pick_u]], axis=1
        )
        salient = np.concatenate(
            [sample["salient_points"][pick_s], sample["salient_normals"][pick_s]], axis=1
        )
        return {
            # No second copy of arrays that concatenation or fancy indexing just made (at Dora's sizes every copy
            # costs a DataLoader worker several % of its rate); a slice is a view of the (maybe cached) sample, so
            # it is still copied.
            "uniform": torch.from_numpy(uniform.astype(np.float32, copy=False)),  # (N_u, 6)
            "salient": torch.from_numpy(salient.astype(np.float32, copy=False)),  # (N_s, 6)
            "sup_points": torch.from_numpy(
                sample["sup_points"][pick_q].astype(np.float32, copy=copy_q)
            ),  # (M, 3)
            "sup_occupancy": torch.from_numpy(
                sample["sup_occupancy"][pick_q].astype(np.float32, copy=copy_q)
            ),  # (M,)
            "sup_tsdf": torch.from_numpy(sample["sup_tsdf"][pick_q].astype(np.float32, copy=copy_q)),  # (M,)
            "sup_group": torch.from_numpy(sample["sup_group"][pick_q].astype(np.int64)),  # (M,)
            "meta": sample["meta"],
        }


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="folder of meshes, or an index file (.jsonl / .csv)")
    parser.add_argument(
        "--builtin",
        type=cli_types.positive_int,
        metavar="N",
        help="prepare N shapes of the built-in procedural dataset",
    )
    parser.add_argument("--out", required=True, help="output folder PREPARED/")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--workers", type=cli_types.positive_int, help="worker processes (>= 1)")
    parser.add_argument("--seed", type=cli_types.seed)
    parser.add_argument(
        "--epsilon",
        type=cli_types.EPSILON,
        help="voxel size of the watertight remesh, in (0, 0.25] (units of [-1, 1])",
    )
    parser.add_argument("--n-uniform", type=cli_types.positive_int)
    parser.add_argument("--n-salient", type=cli_types.positive_int)
    parser.add_argument("--n-volume", type=cli_types.positive_int)
    parser.add_argument("--n-near", type=cli_types.positive_int)
    parser.add_argument("--n-sharp", type=cli_types.positive_int)
    parser.add_argument(
        "--sharp-angle-deg",
        type=cli_types.float_in(0.0, 180.0, low_open=True, high_open=True),
        help="dihedral angle above which an edge is sharp, in (0, 180) degrees",
    )
    parser.add_argument(
        "--storage", choices=("npz", "npz_compressed"), help="sample file format (config: storage)"
    )
    parser.add_argument(
        "--num-shards", type=cli_types.positive_int, default=1, help="split the input into this many shards"
    )
    parser.add_argument(
        "--shard-index", type=cli_types.non_negative_int, default=0, help="the shard this job runs (0-based)"
    )
    parser.add_argument(
        "--limit", type=cli_types.positive_int, help="only the first N shapes (after sharding)"
    )
    parser.add_argument("--overwrite", action="store_true", help="redo shapes whose npz exists")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the shapes as Ray tasks: ADDRESS auto, host:port or ray://host:port; alone, a local "
        "Ray instance with --workers CPUs (pip install -e '.[ray]'). Put SOURCE before --ray",
    )
    parser.add_argument(
        "--ray-max-retries",
        type=cli_types.non_negative_int,
        default=3,
        help="reruns of a task whose worker died, before the shape is recorded as failed",
    )
    return parser


def _collect_items(args: argparse.Namespace, config: PrepareConfig, out: Path) -> list[dict[str, Any]]:
    if args.builtin is not None:
        from dora_shapegen.data.procedural import write_dataset

        return read_index(write_dataset(out / "builtin_meshes", args.builtin, config.seed))
    if not args.source:
        raise ValueError("give a folder or index file, or --builtin N")
    source = Path(args.source)
    if source.is_dir():
        return scan_folder(source)
    if source.is_file():
        return read_index(source)
    raise ValueError(f"{source}: no such folder or index file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in ("workers", "seed", "epsilon", "n_uniform", "n_salient", "n_volume", "n_near", "n_sharp")
        + ("sharp_angle_deg", "storage")
        if getattr(args, key) is not None
    }
    try:
        config = load_config(PrepareConfig, args.config, overrides)
        check_storage(config.storage)
    except ValueError as error:
        print(f"dora prepare: {args.config}: {error}", file=sys.stderr)
        return 2
    if not 0 <= args.shard_index < args.num_shards:
        print(f"dora prepare: --shard-index must be in [0, {args.num_shards})", file=sys.stderr)
        return 2
    if args.ray is not None:
        from dora_shapegen.data.prepare_ray import check_address

        try:
            check_address(args.ray)
        except ValueError as error:
            print(f"dora prepare: {error}", file=sys.stderr)
            return 2
    out = Path(args.out)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    try:
        items = _collect_items(args, config, out)
    except (ValueError, OSError) as error:
        print(f"dora prepare: {error}", file=sys.stderr)
        return 2
    items = items[args.shard_index :: args.num_shards]
    if args.limit is not None:
        items = items[: args.limit]
    suffix = f".shard{args.shard_index:04d}-of-{args.num_shards:04d}" if args.num_shards > 1 else ""
    save_yaml({"config": to_dict(config), "args": vars(args)}, out / f"config{suffix}.yaml")

    todo, skipped = [], 0
    for item in items:
        target = samples / f"{item['shape_id']}.npz"
        if target.exists() and not args.overwrite:
            skipped += 1
        else:
            todo.append((item, str(target)))

    start = time.perf_counter()
    done, failed, disk_full = 0, 0, None
    failures_path = out / f"failures{suffix}.jsonl"
    with disk_full_names(failures_path):
        _forget_retried_failures(failures_path, {item["shape_id"] for item, _ in todo})
    if args.ray is not None:
        from dora_shapegen.data.prepare_ray import run_ray

        results = run_ray(todo, config, args.ray, overwrite=args.overwrite, max_retries=args.ray_max_retries)
    else:
        results = _run(todo, config)
    stream = _progress(results, len(todo))
    try:
        with disk_full_names(failures_path), open(failures_path, "a") as failures:
            for result in stream:
                if result["status"] == "done":
                    done += 1
                elif result["status"] == "disk_full":
                    disk_full = result  # stop: every next shape would fail alike; nothing is recorded for it
                    break
                else:
                    failed += 1
                    failures.write(json.dumps({k: result[k] for k in ("shape_id", "path", "reason")}) + "\n")
                    failures.flush()
    finally:
        stream.close()
        if hasattr(results, "close"):
            results.close()  # a process pool is terminated here, its shapes in flight dropped
        _remove_stale_temporaries(todo)
    if disk_full is not None:  # the samples written so far stay; a rerun skips them
        raise DiskFullError(disk_full["path"])
    elapsed = time.perf_counter() - start
    summary = {
        "total": len(items),
        "done": done,
        "skipped": skipped,
        "failed": failed,
        "seconds": round(elapsed, 3),
        "shapes_per_second": round(done / elapsed, 4) if elapsed > 0 and done else 0.0,
        "workers": config.workers,
        "runner": f"ray:{args.ray}" if args.ray is not None else "pool",
        "shard_index": args.shard_index,
        "num_shards": args.num_shards,
        "failures": str(failures_path),
    }
    summary_path = out / f"summary{suffix}.json"
    with disk_full_names(summary_path):
        temporary = summary_path.with_name(f".{summary_path.name}.tmp")
        temporary.write_text(json.dumps(summary, indent=2))
        os.replace(temporary, summary_path)
    print(
        f"dora prepare: {done} done, {skipped} skipped, {failed} failed in {elapsed:.1f}s "
        f"({summary['shapes_per_second']} shapes/s); failures in {failures_path}"
    )
    return 0


def _forget_retried_failures(path: Path, retried: set[str]) -> None:
    """Drop the failures of shapes this run tries again (they are recorded anew if they fail again), so a rerun
    never lists a shape twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("shape_id") in retried:
                continue
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        kept.append(line + "\n")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def _progress(results: Iterator[dict[str, Any]], total: int) -> Iterator[dict[str, Any]]:
    progress = tqdm(total=total, desc="prepare", unit="shape", dynamic_ncols=True)
    try:
        for result in results:
            yield result
            progress.update()
    finally:
        progress.close()


def _remove_stale_temporaries(todo: list[tuple[dict[str, Any], str]]) -> None:
    """A worker killed mid-write leaves ``.<name>.<host>.<pid>.tmp`` beside the sample; the shape itself was redone
    (or recorded as failed), so the partial file is garbage. Only this job's shapes: shards never share one."""
    for _, target in todo:
        target_path = Path(target)
        for stale in target_path.parent.glob(f".{glob.escape(target_path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def _run(todo: list[tuple[dict[str, Any], str]], config: PrepareConfig) -> Iterator[dict[str, Any]]:
    """Yield one result per job, in-process for one worker, else from a process pool (unordered)."""
    values = dataclasses.asdict(config)
    if config.workers <= 1 or len(todo) <= 1:
        init_worker(values)
        for job in todo:
            yield process_item(job)
        return
    context = multiprocessing.get_context(config.start_method)
    with context.Pool(config.workers, initializer=init_worker, initargs=(values,)) as pool:
        yield from pool.imap_unordered(process_item, todo, chunksize=1)


if __name__ == "__main__":
    sys.exit(main())

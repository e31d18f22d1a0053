"""`dora convert-prepared PREPARED [--storage npz|npz_compressed]`: rewrite prepared samples in another storage format.

Prepared folders written before uncompressed samples became the default hold zlib-compressed npz files. Those stay
readable as they are (``load_prepared`` opens both); this command rewrites them, one file at a time and atomically
(a killed run leaves every file whole, in one format or the other, and a rerun finishes the job), so VAE DataLoader
workers stop paying the decompression (see ``tests/benchmarks/bench_vae_loading.py``). The arrays are copied
bit for bit; only the container changes. Unreadable files are reported and skipped, never deleted.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dora_shapegen.data.prepare_worker import STORAGE_FORMATS, write_npz_atomic


def storage_of(path: Path) -> str:
    """``npz_compressed`` when any member of the archive is deflated, else ``npz``."""
    with zipfile.ZipFile(path) as archive:
        compressed = any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    return "npz_compressed" if compressed else "npz"


def convert_folder(root: str | Path, storage: str = "npz") -> dict[str, Any]:
    """Rewrite every ``samples/*.npz`` under ``root`` in ``storage``; returns counts and the files that failed."""
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"--storage must be one of {STORAGE_FORMATS}, got {storage!r}")
    root = Path(root)
    folder = root / "samples" if (root / "samples").is_dir() else root
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no prepared samples (*.npz) in {folder}")
    report: dict[str, Any] = {
        "converted": 0,
        "unchanged": 0,
        "failed": [],
        "bytes_before": 0,
        "bytes_after": 0,
    }
    for path in files:
        size = path.stat().st_size
        try:
            if storage_of(path) == storage:
                report["unchanged"] += 1
                report["bytes_before"] += size
                report["bytes_after"] += size
                continue
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}  # every key, extra ones included
            write_npz_atomic(path, arrays, storage)
        except Exception as error:  # a corrupt file must not stop the folder: name it and go on
            report["failed"].append({"path": str(path), "reason": f"{type(error).__name__}: {error}"})
            continue
        report["converted"] += 1
        report["bytes_before"] += size
        report["bytes_after"] += path.stat().st_size
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dora convert-prepared", description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", help="a `dora prepare` output folder (or its samples/ folder)")
    parser.add_argument(
        "--storage", default="npz", choices=STORAGE_FORMATS, help="target format (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        report = convert_folder(args.prepared, args.storage)
    except (ValueError, OSError) as error:
        print(f"dora convert-prepared: {error}", file=sys.stderr)
        return 2
    for failure in report["failed"]:
        print(f"dora convert-prepared: skipped {failure['path']}: {failure['reason']}", file=sys.stderr)
    print(
        f"dora convert-prepared: {report['converted']} converted to {args.storage}, {report['unchanged']} already "
        f"in it, {len(report['failed'])} unreadable; {report['bytes_before'] / 1e6:.1f} MB -> "
        f"{report['bytes_after'] / 1e6:.1f} MB"
    )
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

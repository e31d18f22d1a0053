"""`dora prepare --ray [ADDRESS]`: the per-shape work of ``data/prepare_worker.py`` as Ray tasks.

Same inputs, outputs, resume and ``failures.jsonl`` as the local process pool (``data/prepare.py`` drives both and
writes every record); only where ``process_item`` runs changes. ADDRESS is ``auto`` (the cluster this machine
joined with ``ray start``), ``host:port`` / ``ray://host:port``, or nothing / ``local`` (a Ray instance on this
machine with ``--workers`` CPUs).

Failure handling, the reason this module exists beside the pool:
- a task whose worker process dies (OOM killer, segfault in a geometry library, a lost node) is rerun by Ray up to
  ``max_retries`` times, then recorded in ``failures.jsonl`` with the reason; the batch goes on;
- a shape is never lost or written twice: the sample is written to a temporary name and renamed atomically, and a
  task skips a shape whose sample already exists unless ``--overwrite`` asked for it, so a retry of a task that
  died after its rename (but before Ray saw the result) does not write again. Per-shape seeds derive from the
  shape id, so any rerun would produce the same bytes anyway.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dora_shapegen.data.prepare_worker import PrepareConfig

# Ray titles a worker process ``ray::<task name>`` while it runs a task, and lists tasks by name: with the shape id
# in the name an operator sees which shape a stuck or dying worker holds (and the worker-kill test can aim).
RAY_TASK_NAME = "dora_prepare_shape"
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


def check_address(address: str | None) -> str | None:
    """``None`` / ``local`` (start a local instance), ``auto`` or ``[ray://]host:port``; anything else is an error
    naming the value (``dora prepare --ray SOURCE`` would otherwise take the source for an address)."""
    if address is None or address == "local":
        return None
    if not _ADDRESS.match(address):
        raise ValueError(
            f"--ray {address!r}: not a Ray address (expected auto, host:port or ray://host:port); "
            f"give the mesh folder or index before --ray, e.g. `dora prepare INDEX --out OUT --ray`"
        )
    return address


def task_name(shape_id: str) -> str:
    return f"{RAY_TASK_NAME}:{shape_id}"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise RuntimeError(
            'dora prepare --ray needs the `ray` package: pip install -e ".[ray]" (or pip install ray)'
        ) from error
    return ray


def prepare_shape(
    config_values: dict[str, Any], job: tuple[dict[str, Any], str], skip_existing: bool
) -> dict[str, Any]:
    """One shape inside a Ray worker. Ray reuses worker processes, so the MeshProcessor is built once per process
    (and again only if a later run ships another config)."""
    from dora_shapegen.data import prepare_worker

    current = prepare_worker._CONFIG
    if current is None or dataclasses.asdict(current) != config_values:
        prepare_worker.init_worker(config_values)
    item, out_path = job
    if skip_existing and Path(out_path).exists():  # a retry after the rename: the sample is already complete
        return {"status": "done", "shape_id": item["shape_id"], "seconds": 0.0, "existing": True}
    return prepare_worker.process_item(job)


def _connect(ray: Any, address: str | None, workers: int) -> bool:
    """Join or start Ray unless this process already did; True when we started it (and so shut it down)."""
    if ray.is_initialized():
        return False
    if address is None:
        # A private local instance: --workers CPUs (all of them when --workers is 1, the pool's default), no
        # dashboard, and a small object store (tasks return small dicts; samples go straight to disk).
        ray.init(
            num_cpus=workers if workers > 1 else None,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
        )
    else:
        ray.init(address=address)
    return True


def run_ray(
    todo: list[tuple[dict[str, Any], str]],
    config: PrepareConfig,
    address: str | None = None,
    overwrite: bool = False,
    max_retries: int = 3,
) -> Iterator[dict[str, Any]]:
    """Yield one result per job (unordered), like ``data.prepare._run``: ``done`` or ``failed`` with a reason."""
    ray = import_ray()
    started = _connect(ray, check_address(address), config.workers)
    try:
        values = ray.put(dataclasses.asdict(config))  # shipped once, not once per task
        task = ray.remote(num_cpus=1, max_retries=max_retries)(prepare_shape)
        # A bounded window of tasks in flight: a 500k-shape index must not become 500k pending tasks at once.
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, dict[str, Any]] = {}
        jobs = iter(todo)
        while True:
            for job in jobs:
                named = task.options(name=task_name(job[0]["shape_id"]))
                pending[named.remote(values, job, not overwrite)] = job[0]
                if len(pending) >= window:
                    break
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ready[0])
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayError as error:
                # The worker died max_retries + 1 times, or the task could not run at all (e.g. an import error on
                # a node without the project installed): record the shape and go on.
                summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
                reason = f"Ray task failed after {max_retries} retries: {type(error).__name__}: {summary}"
                yield {
                    "status": "failed",
                    "shape_id": item["shape_id"],
                    "path": item["path"],
                    "reason": reason,
                }
    finally:
        if started:
            ray.shutdown()

"""`dora prepare --ray`: same outputs as the local pool; a killed worker is retried, a shape whose worker keeps
dying is recorded as failed, and every shape is prepared exactly once. A local Ray instance with 2 CPUs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh

ray = pytest.importorskip("ray")

from dora_shapegen.data.prepare import load_prepared, main  # noqa: E402
from dora_shapegen.data.prepare_ray import RAY_TASK_NAME, check_address, prepare_shape, task_name  # noqa: E402
from tests.data.test_prepare import write_mesh_index  # noqa: E402

# Coarse epsilon and few points: each shape takes a fraction of a second.
SMALL = ["--epsilon", str(8 / 256), "--n-uniform", "256", "--n-salient", "64"]
SMALL += ["--n-volume", "64", "--n-near", "64", "--n-sharp", "32"]
ARRAY_KEYS = (
    "uniform_points",
    "uniform_normals",
    "salient_points",
    "salient_normals",
    "sup_points",
    "sup_occupancy",
    "sup_tsdf",
    "sup_group",
)


@pytest.fixture(scope="module")
def ray_instance():
    """One local instance for the module (starting Ray costs seconds); `dora prepare --ray` joins it."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture()
def index_file(tmp_path: Path) -> Path:
    return write_mesh_index(
        tmp_path,
        {
            "box": trimesh.creation.box(extents=(1, 0.5, 0.3)),
            "ball": trimesh.creation.icosphere(2),
            "can": trimesh.creation.cylinder(radius=0.3, height=1.0),
            "cone": trimesh.creation.cone(radius=0.4, height=0.9),
            "ring": trimesh.creation.annulus(r_min=0.2, r_max=0.5, height=0.2),
        },
    )


def _failures(out: Path) -> dict[str, str]:
    lines = (out / "failures.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["shape_id"] for r in records}) == len(records), "a shape recorded as failed twice"
    return {r["shape_id"]: r["reason"] for r in records}


def test_ray_output_equals_the_local_pool(ray_instance, index_file, tmp_path):
    pool, on_ray = tmp_path / "pool", tmp_path / "ray"
    assert main([str(index_file), "--out", str(pool), *SMALL, "--workers", "2"]) == 0
    assert main([str(index_file), "--out", str(on_ray), *SMALL, "--ray"]) == 0
    names = sorted(p.name for p in (pool / "samples").glob("*.npz"))
    assert names == ["ball.npz", "box.npz", "can.npz", "cone.npz", "ring.npz"]
    assert sorted(p.name for p in (on_ray / "samples").iterdir()) == names  # nothing else (no temporaries)
    for name in names:
        expected, got = load_prepared(pool / "samples" / name), load_prepared(on_ray / "samples" / name)
        for key in ARRAY_KEYS:
            assert np.array_equal(expected[key], got[key]), (name, key)
        assert expected["meta"] == got["meta"]
    assert _failures(on_ray) == _failures(pool) and set(_failures(on_ray)) == {"broken"}
    summary = json.loads((on_ray / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"], summary["runner"]) == (
        5,
        0,
        1,
        "ray:local",
    )
    # Resume through Ray: finished shapes are skipped, the failed one is retried (and fails again).
    assert main([str(index_file), "--out", str(on_ray), *SMALL, "--ray"]) == 0
    summary = json.loads((on_ray / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 5, 1)


def _ray_worker_pids(shape_id: str) -> list[int]:
    """Processes whose title says they are running the task of ``shape_id`` right now."""
    title = f"ray::{task_name(shape_id)}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:  # the process ended while we looked
                continue
            if command.split(b"\0")[0] == title:
                pids.append(int(entry.name))
    return pids


class WorkerKiller(threading.Thread):
    """SIGKILLs the worker running a shape's task, up to ``times`` times per shape, while the run goes on."""

    def __init__(self, times: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.times, self.killed = dict(times), {shape: 0 for shape in times}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for shape, times in self.times.items():
                if self.killed[shape] < times:
                    for pid in _ray_worker_pids(shape):
                        os.kill(pid, signal.SIGKILL)
                        self.killed[shape] += 1
                        time.sleep(0.2)  # let Ray see the death before we look for the retry
            time.sleep(0.002)


def test_killed_workers_are_retried_and_every_shape_is_prepared_once(ray_instance, index_file, tmp_path):
    out = tmp_path / "ray"
    # `box` loses its worker once (retried, then prepared); `can` loses it on every try (1 retry): recorded failed.
    killer = WorkerKiller({"box": 1, "can": 2})
    killer.start()
    try:
        # --epsilon finer than SMALL: tasks long enough (~0.5 s) for the killer to catch them mid-run.
        code = main(
            [
                str(index_file),
                "--out",
                str(out),
                *SMALL,
                "--epsilon",
                str(2 / 256),
                "--ray",
                "--ray-max-retries",
                "1",
            ]
        )
    finally:
        killer.stop.set()
        killer.join()
    assert code == 0
    assert killer.killed == {"box": 1, "can": 2}, "the killer never caught the tasks mid-run"
    failures = _failures(out)
    assert set(failures) == {"broken", "can"}
    assert "after 1 retries" in failures["can"] and "Worker" in failures["can"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["done"], summary["failed"]) == (6, 4, 2)  # each shape reported once
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["ball.npz", "box.npz", "cone.npz", "ring.npz"]  # no duplicate, no leftover temporary
    assert load_prepared(out / "samples" / "box.npz")["meta"]["shape_id"] == "box"
    # The lost shape comes back on the next run (the resume path), with nothing to kill it this time.
    assert main([str(index_file), "--out", str(out), *SMALL, "--epsilon", str(2 / 256), "--ray"]) == 0
    assert (out / "samples" / "can.npz").is_file()


def test_a_retried_task_does_not_write_a_finished_shape_again(index_file, tmp_path):
    """What keeps a retry idempotent: a task (run here in-process, as Ray would in a worker) whose sample already
    exists returns without writing, unless the run asked to overwrite."""
    from dataclasses import asdict

    from dora_shapegen.data.prepare_worker import PrepareConfig

    config = asdict(
        PrepareConfig(epsilon=8 / 256, n_uniform=64, n_salient=16, n_volume=16, n_near=16, n_sharp=8)
    )
    item = {
        "path": str(index_file.parent / "meshes" / "box.obj"),
        "shape_id": "box",
        "caption": "",
        "category": "",
    }
    target = tmp_path / "box.npz"
    first = prepare_shape(config, (item, str(target)), skip_existing=True)
    assert first["status"] == "done" and "existing" not in first
    stamp = target.stat().st_mtime_ns
    again = prepare_shape(config, (item, str(target)), skip_existing=True)
    assert again["existing"] and target.stat().st_mtime_ns == stamp
    redone = prepare_shape(config, (item, str(target)), skip_existing=False)
    assert redone["status"] == "done" and target.stat().st_mtime_ns != stamp


def test_addresses_are_checked(capsys, tmp_path):
    assert check_address(None) is None and check_address("local") is None
    assert check_address("auto") == "auto" and check_address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert check_address("ray://head:10001") == "ray://head:10001"
    with pytest.raises(ValueError, match="meshes/index.jsonl"):
        check_address("meshes/index.jsonl")
    # The usual slip, `--ray SOURCE`: a clear error naming the value, not a connection attempt.
    assert main(["--ray", "meshes/index.jsonl", "--out", str(tmp_path / "out")]) == 2
    assert "give the mesh folder or index before --ray" in capsys.readouterr().err
    assert RAY_TASK_NAME in task_name("box")

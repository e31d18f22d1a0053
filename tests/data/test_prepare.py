"""`dora prepare`: outputs, determinism, resume, sharding, failures log, the PreparedDataset."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from dora_shapegen.data.prepare import PreparedDataset, PreparedSampleError, load_prepared, main, read_index
from dora_shapegen.data.prepare_worker import shape_seed
from dora_shapegen.data.processor import MeshProcessor
from dora_shapegen.data.supervision import sample_supervision

SMALL = ["--epsilon", str(8 / 256), "--n-uniform", "256", "--n-salient", "64"]
SMALL += ["--n-volume", "64", "--n-near", "64", "--n-sharp", "32"]


def write_mesh_index(tmp_path, shapes: dict[str, trimesh.Trimesh]):
    """An index of ``shapes`` (captioned, one category each) plus one unreadable file; returns its path."""
    folder = tmp_path / "meshes"
    folder.mkdir()
    rows = []
    for name, mesh in shapes.items():
        mesh.export(folder / f"{name}.obj")
        rows.append({"path": f"meshes/{name}.obj", "caption": f"a {name}", "category": name})
    (folder / "broken.obj").write_text("this is not a mesh\n")
    rows.append({"path": "meshes/broken.obj", "caption": "broken"})
    index = tmp_path / "index.jsonl"
    index.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return index


@pytest.fixture()
def index_file(tmp_path):
    return write_mesh_index(
        tmp_path,
        {
            "box": trimesh.creation.box(extents=(1, 0.5, 0.3)),
            "ball": trimesh.creation.icosphere(2),
            "can": trimesh.creation.cylinder(radius=0.3, height=1.0),
        },
    )


def test_prepare_writes_samples_failures_and_summary(index_file, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main([str(index_file), "--out", str(out), *SMALL]) == 0
    files = sorted(p.name for p in (out / "samples").glob("*.npz"))
    assert files == ["ball.npz", "box.npz", "can.npz"]
    sample = load_prepared(out / "samples" / "box.npz")
    assert sample["uniform_points"].shape == (256, 3) and sample["salient_normals"].shape == (64, 3)
    assert sample["sup_points"].shape == (160, 3) and sample["sup_group"].dtype == np.int8
    assert sample["meta"]["caption"] == "a box" and sample["meta"]["category"] == "box"
    assert sample["meta"]["epsilon"] == pytest.approx(8 / 256)
    assert sample["meta"]["num_sharp_edges"] == 12
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["shape_id"] == "broken"
    assert "broken.obj" in failures[0]["reason"] and failures[0]["path"].endswith("broken.obj")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 1)
    assert (out / "config.yaml").exists()
    assert "3 done, 0 skipped, 1 failed" in capsys.readouterr().out


def test_resume_skips_finished_and_is_deterministic(index_file, tmp_path):
    out = tmp_path / "prepared"
    assert main([str(index_file), "--out", str(out), *SMALL, "--limit", "2"]) == 0
    first = load_prepared(out / "samples" / "box.npz")
    mtime = (out / "samples" / "box.npz").stat().st_mtime_ns
    assert main([str(index_file), "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 2, 1)
    assert (out / "samples" / "box.npz").stat().st_mtime_ns == mtime  # not rewritten
    # Redoing a shape (other run, other order) gives the same arrays: seeds derive from the shape id.
    other = tmp_path / "again"
    assert (
        main([str(index_file), "--out", str(other), *SMALL, "--num-shards", "2", "--shard-index", "0"]) == 0
    )
    again = load_prepared(other / "samples" / "box.npz")
    for key in ("uniform_points", "salient_points", "sup_points", "sup_tsdf"):
        assert np.array_equal(first[key], again[key])


def test_shards_partition_the_input(index_file, tmp_path):
    out = tmp_path / "prepared"
    for shard in range(2):
        assert (
            main(
                [str(index_file), "--out", str(out), *SMALL, "--num-shards", "2", "--shard-index", str(shard)]
            )
            == 0
        )
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("summary.shard*.json"))]
    assert [s["total"] for s in summaries] == [2, 2]
    assert len(list((out / "samples").glob("*.npz"))) == 3
    assert main([str(index_file), "--out", str(out), "--num-shards", "2", "--shard-index", "2"]) == 2


def test_folder_input_with_two_workers(tmp_path):
    folder = tmp_path / "meshes" / "boxes"
    folder.mkdir(parents=True)
    for size in (1, 2):
        trimesh.creation.box(extents=(size, 1, 1)).export(folder / f"box{size}.ply")
    out = tmp_path / "prepared"
    assert main([str(tmp_path / "meshes"), "--out", str(out), *SMALL, "--workers", "2"]) == 0
    names = sorted(p.name for p in (out / "samples").glob("*.npz"))
    assert names == ["boxes__box1.npz", "boxes__box2.npz"]
    assert load_prepared(out / "samples" / names[0])["meta"]["category"] == "boxes"


def test_prepared_dataset_subsamples(index_file, tmp_path):
    out = tmp_path / "prepared"
    main([str(index_file), "--out", str(out), *SMALL])
    dataset = PreparedDataset(out, n_uniform=100, n_salient=20, n_supervision=50)
    assert len(dataset) == 3
    item = dataset[0]
    assert item["uniform"].shape == (100, 6) and item["salient"].shape == (20, 6)
    assert item["sup_points"].shape == (50, 3) and item["sup_tsdf"].dtype == torch.float32
    assert item["meta"]["shape_id"] == "ball"
    assert not torch.equal(dataset[0]["uniform"], dataset[0]["uniform"])  # a fresh subset per call
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["uniform"].shape == (3, 100, 6) and len(batch["meta"]["caption"]) == 3
    full = PreparedDataset(out)[1]
    assert full["uniform"].shape == (256, 6)


def test_prepared_dataset_cache_in_memory(index_file, tmp_path):
    out = tmp_path / "prepared"
    main([str(index_file), "--out", str(out), *SMALL])
    cached, uncached = PreparedDataset(out, cache_in_memory=True), PreparedDataset(out)
    first = cached[0]
    cached.files[0].unlink()  # a second read must come from memory, not from disk
    again = cached[0]
    for key in ("uniform", "salient", "sup_points", "sup_occupancy"):
        assert torch.equal(first[key], again[key])
    with pytest.raises(PreparedSampleError):
        uncached[0]  # without the cache the file is read every time


def test_corrupt_sample_is_named(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PreparedSampleError, match="bad.npz"):
        load_prepared(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(PreparedSampleError, match="missing key"):
        load_prepared(tmp_path / "other.npz")


def test_csv_index(tmp_path):
    trimesh.creation.box().export(tmp_path / "a.stl")
    (tmp_path / "index.csv").write_text("path,caption,category,id\na.stl,a cube,box,cube_1\n")
    assert read_index(tmp_path / "index.csv") == [
        {
            "path": str(tmp_path / "a.stl"),
            "shape_id": "cube_1",
            "caption": "a cube",
            "captions": ["a cube"],
            "category": "box",
        }
    ]
    # Several captions per shape: '|'-separated in a CSV, the ``caption`` column first, repeats dropped.
    (tmp_path / "many.csv").write_text("path,caption,captions\na.stl,a cube,a box|a cube| a block \n")
    assert read_index(tmp_path / "many.csv")[0]["captions"] == ["a cube", "a box", "a block"]


def test_index_captions_reach_the_prepared_meta(tmp_path):
    trimesh.creation.box().export(tmp_path / "a.stl")
    row = {"path": "a.stl", "caption": "a cube", "captions": ["a box", "a square block"], "category": "box"}
    (tmp_path / "index.jsonl").write_text(json.dumps(row) + "\n")
    assert main([str(tmp_path / "index.jsonl"), "--out", str(tmp_path / "prepared"), *SMALL]) == 0
    meta = load_prepared(tmp_path / "prepared" / "samples" / "a.npz")["meta"]
    assert meta["caption"] == "a cube" and meta["captions"] == ["a cube", "a box", "a square block"]
    # A malformed list is named with its row.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a.stl", "captions": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: 'captions' must be a list of strings"):
        read_index(tmp_path / "bad.jsonl")


def test_rerun_lists_each_failure_once(index_file, tmp_path):
    out = tmp_path / "prepared"
    assert main([str(index_file), "--out", str(out), *SMALL]) == 0
    assert main([str(index_file), "--out", str(out), *SMALL]) == 0  # retries the broken file, fails again
    failures = [json.loads(line)["shape_id"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == ["broken"]


def test_full_disk_stops_keeps_what_was_written_and_a_rerun_finishes(
    index_file, tmp_path, monkeypatch, capsys
):
    """ENOSPC while the second sample is written (part of it already on disk): the run stops with an error naming
    that sample's path and saying the disk is full; the first sample stays readable, no partial file is left and
    nothing is recorded as a failure; after space is freed the same command finishes the rest, each shape once."""
    from dora_shapegen.pipelines.apps.cli import main as dora

    savez, calls = np.savez, []

    def fill_the_disk(handle, **arrays):
        calls.append(handle.name)
        if len(calls) == 2:
            handle.write(b"PK\x03\x04" + b"\0" * 512)  # what fit before the disk was full
            raise OSError(errno.ENOSPC, "No space left on device")
        return savez(handle, **arrays)

    monkeypatch.setattr(np, "savez", fill_the_disk)
    out = tmp_path / "prepared"
    assert dora(["prepare", str(index_file), "--out", str(out), *SMALL]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    second = out / "samples" / Path(calls[1]).name.split(".npz")[0].lstrip(".")
    assert error.startswith(f"error: disk full: no space left to write {second}.npz")
    written = sorted(out.glob("samples/*"))
    assert len(written) == 1 and written[0].suffix == ".npz"  # the first sample, and no temporary file
    load_prepared(written[0])
    assert not (out / "failures.jsonl").exists() or not (out / "failures.jsonl").read_text()

    monkeypatch.setattr(np, "savez", savez)  # space freed
    assert dora(["prepare", str(index_file), "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 1, 1)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["ball.npz", "box.npz", "can.npz"]
    failures = [json.loads(line)["shape_id"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == ["broken"]


def test_a_shapes_seed_is_a_function_of_the_run_seed_and_its_id_only():
    # The same on every worker and in any order; another shape or run seed, another seed.
    assert shape_seed(0, "chair-0001") == shape_seed(0, "chair-0001")
    assert len({shape_seed(run, f"chair-{i:04d}") for run in range(3) for i in range(200)}) == 600


def test_supervision_and_surface_points_draw_from_their_own_streams():
    processor, mesh = MeshProcessor(epsilon=8 / 256), trimesh.creation.icosphere(2)
    points = processor.sample_points(mesh, n_uniform=256, n_salient=64, seed=5)
    labels = processor.sample_supervision(mesh, points, n_volume=64, n_near=64, n_sharp=32, seed=5)
    again = processor.sample_supervision(mesh, points, n_volume=64, n_near=64, n_sharp=32, seed=5)
    assert np.array_equal(labels.points, again.points)
    other = processor.sample_supervision(mesh, points, n_volume=64, n_near=64, n_sharp=32, seed=6)
    assert not np.array_equal(labels.points, other.points)
    # Before, supervision drew from the stream `seed + 1`, the one the next shape seed's surface points draw from.
    next_stream = sample_supervision(mesh, points, n_volume=64, n_near=64, n_sharp=32, seed=6)
    assert not np.array_equal(labels.points, next_stream.points)

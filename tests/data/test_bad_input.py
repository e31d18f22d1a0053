"""Bad input: each case is processed correctly or rejected with a clear error naming the file and the cause."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from dora_shapegen.data import MeshProcessor
from dora_shapegen.data.mesh_io import MeshError, load_mesh
from dora_shapegen.data.prepare import main
from dora_shapegen.data.supervision import label_points

SMALL = dict(n_uniform=128, n_salient=32, n_volume=32, n_near=32, n_sharp=16)


def _write_off(path, vertices, faces):
    lines = ["OFF", f"{len(vertices)} {len(faces)} 0"]
    lines += [" ".join(str(c) for c in v) for v in vertices]
    lines += ["3 " + " ".join(str(i) for i in f) for f in faces]
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare_folder(folder, out):
    """`dora prepare FOLDER --out OUT` at a coarse voxel size and few points; its exit code."""
    argv = [str(folder), "--out", str(out), "--epsilon", str(8 / 256), "--n-uniform", "64"]
    argv += ["--n-salient", "16", "--n-volume", "16", "--n-near", "16", "--n-sharp", "8"]
    return main(argv)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.obj"
    path.write_bytes(b"")
    with pytest.raises(MeshError, match=r"empty\.obj: empty file"):
        load_mesh(path)


def test_unparseable_file(tmp_path):
    path = tmp_path / "garbage.glb"
    path.write_bytes(b"\x00\x01 definitely not a glTF binary" * 10)
    with pytest.raises(MeshError, match=r"garbage\.glb: could not parse"):
        load_mesh(path)


def test_zero_faces(tmp_path):
    path = _write_off(tmp_path / "nofaces.off", [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [])
    with pytest.raises(MeshError, match=r"nofaces\.off: .*(zero faces|point cloud)"):
        load_mesh(path)


def test_point_cloud_without_faces(tmp_path):
    path = tmp_path / "cloud.ply"
    trimesh.PointCloud(np.random.default_rng(0).normal(size=(50, 3))).export(path)
    with pytest.raises(MeshError, match=r"cloud\.ply: point cloud without faces"):
        load_mesh(path)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_inf_vertices(tmp_path, bad):
    box = trimesh.creation.box()
    vertices = box.vertices.astype(object)
    vertices[3, 1] = bad
    path = _write_off(tmp_path / f"{bad}.off", vertices.tolist(), box.faces.tolist())
    with pytest.raises(MeshError, match=rf"{bad}\.off: 1 vertices have NaN/inf"):
        load_mesh(path)


def test_degenerate_faces_are_dropped(tmp_path):
    box = trimesh.creation.box()
    extra = [[0, 0, 1], [2, 2, 2], [0, 1, 1]]  # repeated indices: zero area
    collinear_vertices = np.concatenate([box.vertices, [[2, 0, 0], [3, 0, 0], [4, 0, 0]]])
    faces = np.concatenate([box.faces, extra, [[8, 9, 10]]])  # + a collinear (zero-area) triangle
    path = _write_off(tmp_path / "degenerate.off", collinear_vertices.tolist(), faces.tolist())
    mesh = load_mesh(path)
    assert len(mesh.faces) == 12 and len(mesh.vertices) == 8
    assert mesh.is_watertight


def test_all_faces_degenerate(tmp_path):
    path = _write_off(tmp_path / "flat.off", [[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2], [0, 0, 1]])
    with pytest.raises(MeshError, match=r"flat\.off: all 2 faces are degenerate"):
        load_mesh(path)


def test_non_manifold_mesh_is_remeshed():
    # Three fins sharing one edge (an edge with three faces) plus a box touching another at a single vertex.
    fins = trimesh.Trimesh(
        [[0, 0, 0], [0, 0, 1], [1, 0, 0.5], [-1, 0.2, 0.5], [0, -1, 0.5]], [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    )
    assert not fins.is_watertight
    processor = MeshProcessor(epsilon=8 / 256)
    prepared = processor.process(fins, **SMALL)
    assert np.isfinite(prepared["sup_tsdf"]).all()
    watertight = processor.make_watertight(processor.load_mesh(fins))
    assert watertight.is_watertight


def test_open_mesh_is_processed(tmp_path):
    # A hole narrower than 2 * epsilon is closed: the inside stays inside.
    sphere = trimesh.creation.icosphere(4)
    sphere.update_faces(np.arange(len(sphere.faces)) != 0)
    path = tmp_path / "pinhole.ply"
    sphere.export(path)
    processor = MeshProcessor(epsilon=8 / 256)
    prepared = processor.process(path, **SMALL)
    depth = 0.95 - np.linalg.norm(prepared["sup_points"], axis=1)
    assert np.array_equal(prepared["sup_occupancy"][np.abs(depth) > 0.05], (depth[np.abs(depth) > 0.05] > 0))


def test_widely_open_mesh_becomes_a_thin_shell():
    # A wide opening (a bowl): the remesh is a closed shell of thickness ~2 * epsilon around the surface,
    # as in Dora; the bowl's wall is inside, its hollow is outside.
    sphere = trimesh.creation.icosphere(3)
    sphere.update_faces(sphere.vertices[sphere.faces].mean(axis=1)[:, 2] < 0.5)
    processor = MeshProcessor(epsilon=8 / 256)
    mesh = processor.load_mesh(sphere)
    watertight = processor.make_watertight(mesh)
    assert watertight.is_watertight
    norm = mesh.metadata["normalization"]
    hollow = (np.zeros(3) - norm["center"]) * norm["scale"]  # the sphere's centre
    wall = mesh.vertices[np.argmin(mesh.vertices[:, 2])]  # the bottom of the bowl
    occupancy, tsdf, _ = label_points(watertight, np.array([hollow, wall]))
    assert occupancy.tolist() == [0.0, 1.0] and tsdf[0] == -1.0


def test_huge_mesh_is_decimated_and_processed():
    # A 1.2M-face height field built with numpy (icosphere(8) would take longer to build than to process).
    side = 775
    x, y = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    vertices = np.stack([x, y, 0.1 * np.sin(6 * x) * np.cos(6 * y)], axis=-1).reshape(-1, 3)
    grid = np.arange(side * side).reshape(side, side)
    a, b, c, d = grid[:-1, :-1].ravel(), grid[1:, :-1].ravel(), grid[1:, 1:].ravel(), grid[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    huge = trimesh.Trimesh(vertices, faces, process=False)
    assert len(huge.faces) >= 1_000_000
    processor = MeshProcessor(epsilon=8 / 256, max_faces=100_000)
    prepared = processor.process(huge, **SMALL)
    meta = json.loads(str(prepared["meta"]))
    assert meta["num_input_faces"] <= 100_000 and meta["decimated_from_faces"] == len(faces)
    # The decimated surface still matches the height field.
    points = prepared["uniform_points"]
    assert np.isfinite(points).all() and np.ptp(points[:, 0]) > 1.8


def test_batch_logs_every_bad_file_and_goes_on(tmp_path):
    folder = tmp_path / "meshes"
    folder.mkdir()
    (folder / "empty.obj").write_bytes(b"")
    (folder / "garbage.stl").write_bytes(b"solid x\nfacet nonsense\n")
    _write_off(folder / "nofaces.off", [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [])
    trimesh.creation.box().export(folder / "good.obj")
    out = tmp_path / "prepared"
    assert _prepare_folder(folder, out) == 0
    failures = {
        row["shape_id"]: row["reason"]
        for row in map(json.loads, (out / "failures.jsonl").read_text().splitlines())
    }
    assert set(failures) == {"empty", "garbage", "nofaces"}
    assert "empty file" in failures["empty"] and "empty.obj" in failures["empty"]
    assert [p.name for p in (out / "samples").glob("*.npz")] == ["good.npz"]


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_valid_box_at_extreme_scale_prepares(tmp_path, scale):
    # Validity is judged in the mesh's own scale: a closed box is a closed box at any size float64 holds.
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    folder = tmp_path / "meshes"
    folder.mkdir()
    _write_off(folder / "box.off", (box.vertices * scale).tolist(), box.faces.tolist())
    mesh = load_mesh(folder / "box.off")
    assert len(mesh.faces) == 12 and mesh.is_watertight
    np.testing.assert_allclose(
        mesh.bounds, [[-0.95 / 3, -0.95 * 2 / 3, -0.95], [0.95 / 3, 0.95 * 2 / 3, 0.95]]
    )
    assert mesh.metadata["normalization"]["scale"] == pytest.approx(0.95 / (1.5 * scale))
    out = tmp_path / "prepared"
    assert _prepare_folder(folder, out) == 0
    assert not (out / "failures.jsonl").exists() or not (out / "failures.jsonl").read_text().strip()
    assert [p.name for p in (out / "samples").glob("*.npz")] == ["box.npz"]


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_degenerate_input_at_extreme_scale_still_fails(tmp_path, scale):
    # Rescaling must not rescue a flat or collapsed input: collinear triangles and a single repeated point stay
    # degenerate at every scale, with the same reason.
    flat = _write_off(
        tmp_path / "flat.off",
        (np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]]) * scale).tolist(),
        [[0, 1, 2], [0, 0, 1]],
    )
    with pytest.raises(MeshError, match=r"flat\.off: all 2 faces are degenerate"):
        load_mesh(flat)
    point = _write_off(tmp_path / "point.off", [[scale, scale, scale]] * 3, [[0, 1, 2]])
    with pytest.raises(MeshError, match=r"point\.off: all 1 faces are degenerate"):
        load_mesh(point)

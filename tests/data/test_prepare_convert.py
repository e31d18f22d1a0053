"""Sample storage formats: uncompressed by default, the compressed format still read, and `dora convert-prepared`
rewriting a folder bit for bit (atomic per file, skipping what is already converted or unreadable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from dora_shapegen.data.prepare import PreparedDataset, main
from dora_shapegen.data.prepare_convert import convert_folder, storage_of
from dora_shapegen.data.prepare_convert import main as convert_main

SMALL = ["--epsilon", str(8 / 256), "--n-uniform", "256", "--n-salient", "64"]
SMALL += ["--n-volume", "64", "--n-near", "64", "--n-sharp", "32"]


@pytest.fixture()
def meshes(tmp_path):
    folder = tmp_path / "meshes"
    folder.mkdir()
    trimesh.creation.box(extents=(1, 0.5, 0.3)).export(folder / "box.obj")
    trimesh.creation.icosphere(2).export(folder / "ball.obj")
    return folder


def _raw(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def test_default_is_uncompressed_and_compressed_folders_convert_bit_for_bit(meshes, tmp_path, capsys):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    assert main([str(meshes), "--out", str(plain), *SMALL]) == 0
    assert main([str(meshes), "--out", str(packed), *SMALL, "--storage", "npz_compressed"]) == 0
    assert {storage_of(p) for p in (plain / "samples").glob("*.npz")} == {"npz"}
    assert {storage_of(p) for p in (packed / "samples").glob("*.npz")} == {"npz_compressed"}
    # The old format stays readable: the same training items from both folders.
    torch.manual_seed(0)
    from_plain = PreparedDataset(plain, n_uniform=100, n_salient=20, n_supervision=50)[0]
    torch.manual_seed(0)
    from_packed = PreparedDataset(packed, n_uniform=100, n_salient=20, n_supervision=50)[0]
    for key in ("uniform", "salient", "sup_points", "sup_tsdf", "sup_group"):
        assert torch.equal(from_plain[key], from_packed[key]), key

    before = {p.name: _raw(p) for p in (packed / "samples").glob("*.npz")}
    assert convert_main([str(packed)]) == 0
    assert "2 converted to npz, 0 already in it" in capsys.readouterr().out
    for name, arrays in before.items():
        path = packed / "samples" / name
        assert storage_of(path) == "npz"
        after = _raw(path)
        assert sorted(after) == sorted(arrays)
        for key, value in arrays.items():
            assert value.dtype == after[key].dtype and np.array_equal(value, after[key]), (name, key)
    assert sorted(p.name for p in (packed / "samples").iterdir()) == sorted(before)  # no temporaries left
    report = convert_folder(packed)  # a rerun has nothing left to do
    assert (report["converted"], report["unchanged"]) == (0, 2)


def test_unreadable_files_are_reported_and_kept(meshes, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main([str(meshes), "--out", str(out), *SMALL, "--storage", "npz_compressed"]) == 0
    bad = out / "samples" / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert convert_main([str(out), "--storage", "npz"]) == 1
    captured = capsys.readouterr()
    assert "bad.npz" in captured.err and "2 converted" in captured.out
    assert bad.read_bytes() == b"PK\x03\x04 truncated"
    assert convert_main([str(tmp_path / "empty")]) == 2


def test_unknown_storage_is_a_clear_error(meshes, tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text("storage: zstd\n")
    assert main([str(meshes), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "storage must be one of" in error and "'zstd'" in error

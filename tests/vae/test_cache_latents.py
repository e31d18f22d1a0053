"""`dora cache-latents` with a tiny real DoraVAE on samples written by `dora prepare`: round trip, statistics,
views/bf16, failures, 2 processes (torchrun, gloo), SIGKILL + resume, partitioning and recovery."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from dora_shapegen.data.latent_shards import (
    LatentStats,
    from_storage,
    latent_shard_pipeline,
    load_manifest,
    to_storage,
)
from dora_shapegen.data.prepare import load_prepared
from dora_shapegen.data.prepare import main as prepare_main
from dora_shapegen.seeding import derive_seed
from dora_shapegen.vae import DoraVAE
from dora_shapegen.vae.cache_latents import main, my_shapes, recover, view_points

PROJECT_ROOT = Path(__file__).resolve().parents[2]
N_UNIFORM, N_SALIENT, NUM_TOKENS, CHANNELS = 128, 32, 24, 8
PREPARE = [
    "--epsilon",
    str(8 / 256),
    "--n-uniform",
    str(N_UNIFORM),
    "--n-salient",
    str(N_SALIENT),
    "--n-volume",
    "32",
    "--n-near",
    "32",
    "--n-sharp",
    "16",
    "--workers",
    "1",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Three meshes prepared by `dora prepare`, copied under 30 shape ids (meta updated), and a tiny VAE."""
    root = tmp_path_factory.mktemp("cache")
    meshes = {
        "box": trimesh.creation.box(extents=(1, 0.5, 0.3)),
        "ball": trimesh.creation.icosphere(2),
        "can": trimesh.creation.cylinder(radius=0.3, height=1.0),
    }
    (root / "meshes").mkdir()
    rows = []
    for name, mesh in meshes.items():
        mesh.export(root / "meshes" / f"{name}.obj")
        rows.append({"path": f"meshes/{name}.obj", "caption": f"a {name}", "category": name})
    (root / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert prepare_main([str(root / "index.jsonl"), "--out", str(root / "prepared"), *PREPARE]) == 0
    samples = root / "prepared" / "samples"
    for index in range(30):
        name = list(meshes)[index % 3]
        with np.load(samples / f"{name}.npz") as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(str(arrays["meta"]))
        caption = f"a {name} number {index}"
        meta.update(shape_id=f"{name}_{index:02d}", caption=caption, captions=[caption])
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez_compressed(samples / f"{name}_{index:02d}.npz", **arrays)
    for name in meshes:
        (samples / f"{name}.npz").unlink()
    torch.manual_seed(0)
    DoraVAE(
        width=32,
        heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        latent_channels=CHANNELS,
        output_type="occupancy",
        epsilon=8 / 256,
        n_uniform=N_UNIFORM,
        n_salient=N_SALIENT,
    ).save_pretrained(root / "vae")
    return root


def shape_ids(workspace: Path) -> list[str]:
    return sorted(path.stem for path in (workspace / "prepared" / "samples").glob("*.npz"))


def run_args(workspace: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--vae",
        str(workspace / "vae"),
        "--data",
        str(workspace / "prepared"),
        "--out",
        str(out),
        "--num-tokens",
        str(NUM_TOKENS),
        "--num-workers",
        "0",
        *extra,
    ]


def read_raw(out: Path, **kwargs) -> list[dict]:
    return list(latent_shard_pipeline(out, normalize=False, shuffle_buffer=0, **kwargs))


def test_round_trip_manifest_and_statistics(workspace, tmp_path):
    out = tmp_path / "latents"
    assert main(run_args(workspace, out, "--dtype", "fp32", "--max-samples", "7", "--batch-size", "4")) == 0
    manifest = load_manifest(out)
    model = DoraVAE.from_pretrained(workspace / "vae").eval()
    direct = {}
    for shape_id in shape_ids(workspace):
        sample = load_prepared(workspace / "prepared" / "samples" / f"{shape_id}.npz")
        cloud = {
            "uniform": np.concatenate([sample["uniform_points"], sample["uniform_normals"]], 1)[None],
            "salient": np.concatenate([sample["salient_points"], sample["salient_normals"]], 1)[None],
        }
        with torch.no_grad():
            direct[shape_id] = (
                model.encode(cloud, num_tokens=NUM_TOKENS)[0].numpy(),
                sample["meta"]["caption"],
            )
    samples = read_raw(out)
    assert sorted(sample["shape_id"] for sample in samples) == sorted(direct)
    for sample in samples:
        latents, caption = direct[sample["shape_id"]]
        np.testing.assert_allclose(sample["latents"].numpy(), latents, atol=1e-5)
        assert sample["caption"] == caption and sample["meta"]["meta"]["category"] in caption
        assert sample["meta"]["num_tokens"] == NUM_TOKENS and sample["meta"]["token_order"] == "fps"

    assert (manifest["num_samples"], manifest["num_tokens"], manifest["latent_channels"]) == (
        30,
        NUM_TOKENS,
        CHANNELS,
    )
    assert manifest["dtype"] == "fp32" and manifest["epsilon"] == pytest.approx(8 / 256)
    assert [shard["num_samples"] for shard in manifest["shards"]] == [7, 7, 7, 7, 2]
    assert (
        manifest["token_order"].startswith("fps") and manifest["vae"]["config"]["latent_channels"] == CHANNELS
    )
    weights = workspace / "vae" / "diffusion_pytorch_model.safetensors"
    import hashlib

    assert manifest["vae"]["weights_sha256"] == {
        weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()
    }
    everything = np.concatenate([latents for latents, _ in direct.values()]).astype(np.float64)  # (30*N, C)
    stats = LatentStats.from_manifest(manifest)
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.std, everything.std(0), rtol=1e-4)
    stored = np.concatenate([sample["latents"].numpy() for sample in samples]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, stored.mean(0), rtol=1e-9, atol=1e-12)  # exactly what is stored
    np.testing.assert_allclose(stats.std, stored.std(0), rtol=1e-9)
    # a finished run is a no-op; other settings in the same folder are refused
    assert main(run_args(workspace, out, "--dtype", "fp32", "--max-samples", "7")) == 0
    assert load_manifest(out)["shards"] == manifest["shards"]
    with pytest.raises(ValueError, match="other settings.*num_tokens"):
        main(run_args(workspace, out, "--dtype", "fp32", "--max-samples", "7", "--num-tokens", "16"))


def test_views_in_bf16_are_independent_point_subsets(workspace, tmp_path):
    out = tmp_path / "views"
    assert (
        main(run_args(workspace, out, "--dtype", "bf16", "--num-views", "2", "--limit", "4", "--seed", "7"))
        == 0
    )
    manifest = load_manifest(out)
    assert (manifest["num_views"], manifest["dtype"], manifest["num_samples"]) == (2, "bf16", 4)
    model = DoraVAE.from_pretrained(workspace / "vae").eval()
    for view in range(2):
        for sample in read_raw(out, view=view):
            shape_id = sample["shape_id"]
            prepared = load_prepared(workspace / "prepared" / "samples" / f"{shape_id}.npz")
            cloud = {
                stream: view_points(
                    prepared[f"{stream}_points"],
                    prepared[f"{stream}_normals"],
                    count,
                    derive_seed(7, f"cache-{stream}-points", shape_id, view),
                    keep_all=False,
                )[None]
                for stream, count in (("uniform", N_UNIFORM), ("salient", N_SALIENT))
            }
            with torch.no_grad():
                expected = from_storage(to_storage(model.encode(cloud, num_tokens=NUM_TOKENS)[0], "bf16"))
            np.testing.assert_allclose(sample["latents"].numpy(), expected, rtol=2**-7, atol=1e-3)
    first = {s["shape_id"]: s["latents"] for s in read_raw(out, view=0)}
    second = {s["shape_id"]: s["latents"] for s in read_raw(out, view=1)}
    assert all(not torch.equal(first[key], second[key]) for key in first)


def test_a_corrupt_prepared_sample_is_logged_and_skipped(workspace, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(workspace / "prepared", data)
    (data / "samples" / "aaa_broken.npz").write_bytes(b"not an npz")
    out = tmp_path / "latents"
    args = run_args(workspace, out, "--limit", "5")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    manifest = load_manifest(out)
    assert manifest["num_samples"] == 4 and [f["shape_id"] for f in manifest["failures"]] == ["aaa_broken"]
    logged = [
        json.loads(line) for line in (out / "progress" / "failures-00000.jsonl").read_text().splitlines()
    ]
    assert "aaa_broken.npz" in logged[0]["error"]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_processes_write_disjoint_shards_and_reduce_statistics(workspace, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    assert main(run_args(workspace, single, "--dtype", "fp32", "--max-samples", "4")) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dora_shapegen.vae.cache_latents",
        *run_args(workspace, double, "--dtype", "fp32", "--max-samples", "4"),
    ]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )  # two cold torch imports on a loaded 2-core CI box
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(double)
    assert manifest["world_size"] == 2 and manifest["num_samples"] == 30
    by_rank = {}
    for record_line in (double / "progress" / "rank-00001.jsonl").read_text().splitlines():
        by_rank.setdefault(1, []).extend(json.loads(record_line)["shape_ids"])
    for record_line in (double / "progress" / "rank-00000.jsonl").read_text().splitlines():
        by_rank.setdefault(0, []).extend(json.loads(record_line)["shape_ids"])
    assert len(by_rank[0]) == len(by_rank[1]) == 15 and not set(by_rank[0]) & set(by_rank[1])
    assert {shard["name"][:5] for shard in manifest["shards"]} == {"00000", "00001"}
    ids = [sample["shape_id"] for sample in read_raw(double)]
    assert sorted(ids) == shape_ids(workspace)
    reference = load_manifest(single)["stats"]
    # Different batch compositions per rank change float32 summation order inside the encoder: equal to ~1e-6.
    np.testing.assert_allclose(manifest["stats"]["mean"], reference["mean"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(manifest["stats"]["std"], reference["std"], rtol=1e-4)
    assert manifest["stats"]["count"] == reference["count"]
    # rerun with 1 process (world size changed): nothing left to encode, rank 1's shards and sums still count
    assert main(run_args(workspace, double, "--dtype", "fp32", "--max-samples", "4")) == 0
    again = load_manifest(double)
    assert again["num_samples"] == 30 and again["shards"] == manifest["shards"] and again["world_size"] == 1
    np.testing.assert_allclose(again["stats"]["mean"], manifest["stats"]["mean"], rtol=1e-12)


def test_sigkill_mid_run_then_resume_caches_every_shape_exactly_once(workspace, tmp_path):
    out = tmp_path / "latents"
    command = [
        sys.executable,
        "-m",
        "dora_shapegen.vae.cache_latents",
        *run_args(workspace, out, "--max-samples", "2", "--batch-size", "1", "--dtype", "fp16"),
    ]
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = out / "progress" / "rank-00000.jsonl"
    deadline = time.monotonic() + 180  # a cold start on a loaded CI box
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    recorded = [json.loads(line) for line in log.read_text().splitlines()]
    assert 1 <= len(recorded) < 15  # killed mid-way: some shards recorded, not all

    assert main(run_args(workspace, out, "--max-samples", "2", "--batch-size", "1", "--dtype", "fp16")) == 0
    assert not list(out.glob("*.tmp"))
    ids = [sample["shape_id"] for sample in read_raw(out)]
    assert len(ids) == len(set(ids)) and sorted(ids) == shape_ids(workspace)
    manifest = load_manifest(out)
    assert manifest["num_samples"] == 30 and sorted(p.name for p in out.glob("*.tar")) == [
        shard["name"] for shard in manifest["shards"]
    ]
    stored = np.concatenate([sample["latents"].numpy() for sample in read_raw(out)]).astype(np.float64)
    np.testing.assert_allclose(manifest["stats"]["mean"], stored.mean(0), rtol=1e-9, atol=1e-12)


def test_partition_is_disjoint_complete_and_stable(tmp_path):
    all_ids = [f"s{i:02d}" for i in range(10)]
    parts = [my_shapes(all_ids, set(), set(), rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == all_ids and parts[0] == ["s00", "s03", "s06", "s09"]
    done = {"s00", "s03", "s01"}
    assert my_shapes(all_ids, done, {3}, 0, 3) == ["s06", "s09"]  # same world size: own part minus done
    pending = [
        my_shapes(all_ids, done, {3}, rank, 2) for rank in range(2)
    ]  # world size changed: pending split
    assert (
        sorted(sum(pending, [])) == sorted(set(all_ids) - done)
        and abs(len(pending[0]) - len(pending[1])) <= 1
    )


def test_recover_drops_unrecorded_shards_and_torn_log_lines(tmp_path):
    (tmp_path / "progress").mkdir()
    record = {"name": "00000-000000.tar", "shape_ids": ["a"]}
    (tmp_path / "progress" / "rank-00000.jsonl").write_text(
        json.dumps(record) + "\n" + '{"name": "00000-0000'
    )
    for name in ("00000-000000.tar", "00000-000001.tar", "00001-000000.tar.tmp"):
        (tmp_path / name).write_bytes(b"x")
    recover(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("*.tar*")) == ["00000-000000.tar"]
    assert (tmp_path / "progress" / "rank-00000.jsonl").read_text() == json.dumps(record) + "\n"


def test_posterior_samples_do_not_depend_on_batching(workspace, tmp_path):
    runs = {}
    for batch_size in ("1", "3"):
        out = tmp_path / f"batch{batch_size}"
        assert (
            main(
                run_args(
                    workspace,
                    out,
                    "--dtype",
                    "fp32",
                    "--limit",
                    "4",
                    "--sample-posterior",
                    "--batch-size",
                    batch_size,
                )
            )
            == 0
        )
        runs[batch_size] = {s["shape_id"]: s["latents"] for s in read_raw(out)}
    assert main(run_args(workspace, tmp_path / "mean", "--dtype", "fp32", "--limit", "4")) == 0
    means = {s["shape_id"]: s["latents"] for s in read_raw(tmp_path / "mean")}
    for shape_id, latents in runs["1"].items():
        assert torch.allclose(latents, runs["3"][shape_id], atol=1e-5)
        assert not torch.allclose(latents, means[shape_id], atol=1e-3)


def test_renders_are_cached_beside_the_latents_and_a_shape_without_them_fails(workspace, tmp_path):
    from dora_shapegen.data.render_views import RenderConfig, load_renders, render_dataset

    prepared = tmp_path / "prepared"
    shutil.copytree(workspace / "prepared" / "samples", prepared / "samples")
    summary = render_dataset(prepared, RenderConfig(num_views=2, size=48))
    assert summary["done"] == 30
    (prepared / "renders" / "ball_01.npz").unlink()  # one shape lost its renders
    args = ["--vae", str(workspace / "vae"), "--data", str(prepared), "--num-tokens", str(NUM_TOKENS)]
    assert main([*args, "--out", str(tmp_path / "with"), "--num-workers", "0"]) == 0
    assert main([*args, "--out", str(tmp_path / "without"), "--num-workers", "0", "--renders", "off"]) == 0

    manifest = load_manifest(tmp_path / "with")
    assert manifest["renders"]["num_views"] == 2 and manifest["renders"]["size"] == 48
    assert [failure["shape_id"] for failure in manifest["failures"]] == ["ball_01"]
    assert "run `dora render-views`" in manifest["failures"][0]["error"]
    assert load_manifest(tmp_path / "without")["renders"] is None  # a text-only cache says so
    with_images = {s["shape_id"]: s for s in read_raw(tmp_path / "with", images="all")}
    plain = {s["shape_id"]: s for s in read_raw(tmp_path / "without")}
    assert len(with_images) == 29 and len(plain) == 30
    for shape_id, sample in with_images.items():
        np.testing.assert_array_equal(sample["latents"].numpy(), plain[shape_id]["latents"].numpy())
        expected = load_renders(prepared / "renders" / f"{shape_id}.npz")
        np.testing.assert_array_equal(sample["images"].numpy(), expected["images"])
        assert sample["meta"]["renders"]["cameras"] == expected["cameras"].tolist()

    # A text-only cache is not silently extended with images (or the other way round).
    with pytest.raises(ValueError, match=r"other settings \(\['renders'\]\)"):
        main([*args, "--out", str(tmp_path / "without"), "--num-workers", "0"])


def test_full_disk_keeps_committed_shards_and_a_rerun_caches_every_shape_once(
    workspace, tmp_path, monkeypatch
):
    """ENOSPC while the third shard is written: the error names that shard and says the disk is full; the two
    shards already committed stay readable and match their records, no partial file is left; after space is
    freed the rerun caches the rest, each shape exactly once."""
    from dora_shapegen.data import latent_shards
    from dora_shapegen.data.latent_shards import read_shard
    from dora_shapegen.errors import DiskFullError

    write, shards_opened = latent_shards._HashingFile.write, []

    def fill_the_disk(self, data):
        if self.handle.name not in shards_opened:
            shards_opened.append(self.handle.name)
        if len(shards_opened) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(latent_shards._HashingFile, "write", fill_the_disk)
    out = tmp_path / "latents"
    args = run_args(workspace, out, "--max-samples", "4", "--batch-size", "2", "--dtype", "fp32")
    with pytest.raises(DiskFullError, match=r"disk full: no space left to write .*00000-000002\.tar"):
        main(args)
    records = [json.loads(line) for line in (out / "progress" / "rank-00000.jsonl").read_text().splitlines()]
    assert [record["name"] for record in records] == ["00000-000000.tar", "00000-000001.tar"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["00000-000000.tar", "00000-000001.tar"]
    for record in records:
        samples = list(read_shard(str(out / record["name"]), record, verify=True))
        assert [s["__key__"] for s in samples] == record["shape_ids"]

    monkeypatch.setattr(latent_shards._HashingFile, "write", write)  # space freed
    assert main(args) == 0
    ids = [sample["shape_id"] for sample in read_raw(out)]
    assert len(ids) == len(set(ids)) and sorted(ids) == shape_ids(workspace)
    assert load_manifest(out)["num_samples"] == 30 and not list(out.glob("*.tmp"))

"""Latent shard format on synthetic arrays: writer -> manifest -> reader, statistics, corruption, splitting."""

from __future__ import annotations

import hashlib
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_shapegen.data.latent_shards import (
    CorruptShardError,
    LatentShardDataset,
    LatentShardWriter,
    LatentStats,
    LatentSums,
    build_manifest,
    collate_latents,
    from_storage,
    latent_shard_pipeline,
    load_manifest,
    to_storage,
    write_manifest,
)

NUM_VIEWS, NUM_TOKENS, CHANNELS = 2, 12, 4


def write_shards(
    out_dir: Path, num_shapes: int = 9, dtype: str = "fp32", max_samples: int = 3, max_bytes: int = 2**30
) -> dict[str, dict]:
    """Random latents for ``num_shapes`` shapes (ids with dots/slashes) -> shards + manifest; returns the truth."""
    rng = np.random.default_rng(0)
    truth, records = {}, []
    with LatentShardWriter(
        out_dir, rank=0, max_samples=max_samples, max_bytes=max_bytes, on_shard_closed=records.append
    ) as writer:
        for index in range(num_shapes):
            shape_id = f"set.a/shape.{index}"
            latents = rng.normal(1.0, 2.0, size=(NUM_VIEWS, NUM_TOKENS, CHANNELS)) * np.arange(
                1, CHANNELS + 1
            )
            stored = to_storage(latents, dtype)
            captions = [f"caption {index}", f"other caption {index}"]
            metadata = {"shape_id": shape_id, "captions": captions, "dtype": dtype, "num_tokens": NUM_TOKENS}
            writer.write(shape_id, stored, captions, f"/meshes/{index}.off", metadata)
            truth[shape_id] = {"latents": from_storage(stored, dtype), "captions": captions}
    sums = LatentSums()
    for record in records:
        sums = sums.merge(record.sums)
    write_manifest(out_dir, build_manifest(records, sums, num_tokens=NUM_TOKENS, dtype=dtype))
    return truth


def read_all(source, **kwargs) -> list[dict]:
    kwargs.setdefault("shuffle_buffer", 0)
    return list(latent_shard_pipeline(source, **kwargs))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_gives_back_arrays_captions_ids(tmp_path, dtype):
    truth = write_shards(tmp_path, dtype=dtype)
    for view in range(NUM_VIEWS):
        samples = read_all(tmp_path, normalize=False, view=view)
        assert sorted(sample["shape_id"] for sample in samples) == sorted(truth)
        for sample in samples:
            expected = truth[sample["shape_id"]]
            assert sample["latents"].dtype == torch.float32
            assert np.array_equal(sample["latents"].numpy(), expected["latents"][view])
            assert sample["caption"] in expected["captions"]
            assert sample["meta"]["view"] == view
    if dtype == "bf16":  # bf16 rounding keeps ~3 significant digits, never more error than that
        raw = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
        assert np.allclose(from_storage(to_storage(raw, "bf16")), raw, rtol=2**-8)


def test_shards_are_bounded_and_the_manifest_matches_the_files(tmp_path):
    write_shards(tmp_path, num_shapes=7, max_samples=3)
    manifest = load_manifest(tmp_path)
    assert [shard["num_samples"] for shard in manifest["shards"]] == [3, 3, 1]
    for shard in manifest["shards"]:
        data = (tmp_path / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["num_bytes"]
    assert not list(tmp_path.glob("*.tmp"))

    bounded = tmp_path / "bytes"
    write_shards(bounded, num_shapes=7, max_samples=100, max_bytes=2 * tarfile.RECORDSIZE)  # ~3.5 KiB samples
    sizes = [path.stat().st_size for path in sorted(bounded.glob("*.tar"))]
    assert len(sizes) >= 2 and max(sizes) <= 2 * tarfile.RECORDSIZE
    assert sum(load_manifest(bounded)["shards"][i]["num_samples"] for i in range(len(sizes))) == 7


def test_manifest_statistics_equal_direct_computation(tmp_path):
    truth = write_shards(tmp_path, dtype="fp16")
    everything = np.concatenate([item["latents"].reshape(-1, CHANNELS) for item in truth.values()]).astype(
        np.float64
    )
    stats = LatentStats.from_manifest(load_manifest(tmp_path))
    assert stats.count == len(everything)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, everything.std(axis=0), rtol=1e-10)
    # the reader normalises with them: all views together are standardised
    normalized = torch.cat(
        [torch.cat([s["latents"] for s in read_all(tmp_path, view=v)]) for v in range(NUM_VIEWS)]
    )
    np.testing.assert_allclose(normalized.double().mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.double().std(0, unbiased=False).numpy(), 1.0, atol=1e-5)


def test_normalize_denormalize_are_inverse_for_tensors_and_arrays():
    stats = LatentStats(mean=np.array([1.0, -2.0]), std=np.array([0.5, 3.0]))
    tensor = torch.randn(3, 5, 2)
    assert torch.allclose(stats.denormalize(stats.normalize(tensor)), tensor, atol=1e-6)
    assert stats.normalize(tensor).dtype == torch.float32
    array = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_allclose(stats.normalize(array), (array - [1.0, -2.0]) / [0.5, 3.0], rtol=1e-6)


def test_truncation_keeps_the_token_prefix(tmp_path):
    truth = write_shards(tmp_path)
    for sample in read_all(tmp_path, normalize=False, num_tokens=5, view=0):
        assert sample["latents"].shape == (5, CHANNELS)
        assert np.array_equal(sample["latents"].numpy(), truth[sample["shape_id"]]["latents"][0, :5])
    with pytest.raises(ValueError, match="asked for 99 tokens"):
        read_all(tmp_path, num_tokens=99)


def test_truncated_tar_raises_naming_the_shard_or_is_skipped(tmp_path):
    truth = write_shards(tmp_path)
    shard = sorted(tmp_path.glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside a member
    with pytest.raises(CorruptShardError, match=shard.name):
        read_all(tmp_path)
    with pytest.warns(UserWarning, match=shard.name):
        samples = read_all(tmp_path, skip_corrupt=True)
    ids = {sample["shape_id"] for sample in samples}
    assert len(ids) >= len(truth) - 3 and ids < set(truth)


def test_tar_cut_at_a_member_boundary_is_caught_by_the_sample_count(tmp_path):
    write_shards(tmp_path)
    shard = sorted(tmp_path.glob("*.tar"))[0]
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    cut = members[5].offset  # the first member of the second sample: a valid but shorter tar
    shard.write_bytes(shard.read_bytes()[:cut] + b"\0" * 1024)
    with pytest.raises(CorruptShardError, match=f"{shard.name} is truncated: 1 samples"):
        read_all(tmp_path)


def test_checksum_mismatch_is_detected_with_verify(tmp_path):
    truth = write_shards(tmp_path)
    shard = sorted(tmp_path.glob("*.tar"))[2]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data: the tar itself stays valid
    shard.write_bytes(bytes(data))
    assert len(read_all(tmp_path)) == len(truth)  # undetectable without the checksum
    with pytest.raises(CorruptShardError, match=f"{shard.name}: sha256"):
        read_all(tmp_path, verify=True)
    with pytest.warns(UserWarning, match=shard.name):
        samples = read_all(tmp_path, verify=True, skip_corrupt=True)
    assert len(samples) == len(truth) - 3  # the whole shard is skipped, nothing of it leaks


@pytest.mark.parametrize("epochs", [2])
def test_two_dataloader_workers_see_every_sample_once_per_epoch(tmp_path, epochs):
    truth = write_shards(tmp_path, num_shapes=11, max_samples=2)  # 6 shards
    dataset = latent_shard_pipeline(tmp_path, shuffle_buffer=4, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_latents)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        ids = [shape for batch in loader for shape in batch["shape_id"]]
        assert sorted(ids) == sorted(truth)
    batch = next(iter(loader))
    assert batch["latents"].shape == (3, NUM_TOKENS, CHANNELS) and len(batch["caption"]) == 3


def test_ranks_get_disjoint_shards_and_resampling_draws_shards(tmp_path, monkeypatch):
    truth = write_shards(tmp_path, num_shapes=8, max_samples=2)  # 4 shards
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([sample["shape_id"] for sample in read_all(tmp_path, seed=5)])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(truth)
    resampled = latent_shard_pipeline(tmp_path, resampled=True, shuffle_buffer=0).with_epoch(20)
    ids = [sample["shape_id"] for sample in resampled]
    assert len(ids) == 20 and set(ids) <= set(truth)


def test_shard_urls_and_manifest_paths(tmp_path):
    truth = write_shards(tmp_path, num_shapes=4, max_samples=2)
    manifest = load_manifest(tmp_path / "manifest.json")
    urls = [f"pipe:cat {tmp_path / shard['name']}" for shard in manifest["shards"]]
    samples = read_all(
        urls, manifest=manifest, verify=True
    )  # a pipe: URL list + the manifest's stats/checksums
    assert sorted(sample["shape_id"] for sample in samples) == sorted(truth)
    assert isinstance(latent_shard_pipeline(tmp_path), LatentShardDataset)
    with pytest.raises(ValueError, match="normalize=True needs"):
        latent_shard_pipeline(urls)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path / "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_all(urls, normalize=False)) == 4


def test_shard_order_is_shared_by_ranks_and_sample_streams_are_per_rank_and_worker(tmp_path, monkeypatch):
    import webdataset as wds

    from dora_shapegen.data.latent_shards import _worker_seed

    write_shards(tmp_path, num_shapes=12, max_samples=1)  # 12 shards

    def order(seed: int, epoch: int) -> list[str]:
        dataset = latent_shard_pipeline(tmp_path, seed=seed)  # one per rank: each computes the order itself
        dataset.set_epoch(epoch)
        return [item["url"] for item in dataset._shard_urls()]

    assert order(3, 0) == order(3, 0) and sorted(order(3, 0)) == sorted(order(3, 1))
    assert order(3, 1) != order(3, 0) and order(4, 0) != order(3, 0)
    seeds = set()
    for rank, worker, epoch in [(r, w, e) for r in range(2) for w in range(2) for e in range(2)]:
        monkeypatch.setattr(wds.utils, "pytorch_worker_info", lambda r=rank, w=worker: (r, 2, w, 2))
        seeds.add(_worker_seed(3, epoch))
    assert len(seeds) == 8

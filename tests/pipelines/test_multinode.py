"""The multi-node recipe, rehearsed on one machine: two `accelerate launch` invocations, one per "machine"
(--num_machines 2, --machine_rank 0/1, --main_process_ip 127.0.0.1, a port), for both training commands on tiny
configs. The ranks must form one process group (gloo on CPUs), train, and end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data._prepared import prepare_builtin

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HELPER = PROJECT_ROOT / "tests" / "pipelines" / "_multinode_train.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_machines(kind: str, config: str, data: str, out: Path) -> list[dict]:
    """What docs/SCALING.md tells a two-node cluster to run, with 127.0.0.1 as the main node's address."""
    port = str(_free_port())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    processes = []
    for machine_rank in (0, 1):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(HELPER),
            kind,
            config,
            data,
            str(out),
        ]
        processes.append(
            subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=400)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for machine_rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"machine {machine_rank} failed:\n{output[-4000:]}"
    return [json.loads((out / f"hash-{rank}.json").read_text()) for rank in (0, 1)]


def check_ranks(records: list[dict]) -> None:
    # One group of two (each rank alone would also end identical, having seen the same data: the count rules it out).
    assert [(r["rank"], r["world_size"], r["num_processes"]) for r in records] == [(0, 2, 2), (1, 2, 2)]
    assert sorted(r["machine_rank"] for r in records) == [0, 1]  # one process per "machine"
    assert records[0]["final"] == records[1]["final"]
    assert records[0]["final"] != records[0]["initial"]  # they trained, and stayed in sync


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    return prepare_builtin(tmp_path_factory.mktemp("prepared"), 12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 synthetic shapes of 32 tokens (tiny DiT: 64 channels) through the real latent-cache writer."""
    from dora_shapegen.data.latent_shards import (
        LatentShardWriter,
        LatentSums,
        build_manifest,
        to_storage,
        write_manifest,
    )

    out = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    sums = LatentSums()
    with LatentShardWriter(out, max_samples=4) as writer:
        for index in range(8):
            stored = to_storage(rng.normal(size=(1, 32, 64)), "fp16")  # (V, N, C)
            captions = [f"shape number {index}"]
            meta = {
                "shape_id": f"shape-{index:04d}",
                "captions": captions,
                "category": "thing",
                "dtype": "fp16",
                "num_tokens": 32,
                "latent_channels": 64,
            }
            writer.write(meta["shape_id"], stored, captions, "synthetic", meta)
            sums.update(stored)
    manifest = build_manifest(
        writer.records, sums, num_tokens=32, latent_channels=64, num_views=1, dtype="fp16"
    )
    write_manifest(out, manifest)
    return str(out)


def test_vae_on_two_machines(prepared, tmp_path):
    check_ranks(launch_two_machines("vae", "configs/vae/tiny.yaml", prepared, tmp_path / "vae"))


def test_dit_on_two_machines(shards, tmp_path):
    check_ranks(launch_two_machines("dit", "configs/dit/tiny.yaml", shards, tmp_path / "dit"))

"""Several CPU processes: `accelerate launch --cpu --num_processes 2` (accelerate 1.x starts one process without
MPI) is refused with the recipe that works, instead of training alone. The recipe itself, torchrun on CPUs, is
exercised by tests/diffusion/test_train.py and tests/vae/test_train.py (two ranks, identical replicas)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_accelerate_cpu_launch_of_two_processes_stops_with_the_working_recipe(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "dora_shapegen.diffusion.train", "--config", str(PROJECT_ROOT / "configs" / "dit" / "tiny.yaml"),
        "--shards", str(tmp_path / "latents"), "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "DORA_DEBUG"):
        environment.pop(name, None)
    done = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: `accelerate launch --cpu --num_processes N` started a single process" in done.stderr
    assert "torchrun --standalone --nproc_per_node N" in done.stderr  # accelerate adds its own traceback
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained alone

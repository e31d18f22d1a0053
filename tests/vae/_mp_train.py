"""Helper run by test_train.py under torchrun with 2 CPU processes: train the tiny VAE for 2 steps and write, per
rank, the process count accelerate saw and the steps it ran to OUT/rank-<rank>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dora_shapegen.config import load_config
from dora_shapegen.vae.train import VAETrainConfig, train


def main(config_path: str, data_root: str, output_dir: str) -> None:
    config = load_config(
        VAETrainConfig,
        config_path,
        {"data.root": data_root, "training.max_steps": 2, "training.checkpoint_every": 0},
    )
    summary = train(config, output_dir)
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "num_processes": summary["num_processes"], "steps": summary["steps"]}
    (Path(output_dir) / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])

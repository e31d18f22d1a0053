"""Helper run by test_train.py under torchrun with 2 CPU processes (gloo): train, then every rank writes the sha256
of its own model replica, and of the initial weights, to OUT/hash-<rank>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dora_shapegen.config import load_config
from dora_shapegen.diffusion.modeling_shape_dit import ShapeDiT
from dora_shapegen.diffusion.train import DiTTrainConfig, train
from dora_shapegen.training.checkpoints import state_dict_sha256


def main(config_path: str, shards: str, output_dir: str) -> None:
    config = load_config(DiTTrainConfig, config_path, {"data.shards": shards, "sampling.final": False})
    torch.manual_seed(config.training.seed)  # what train() does before building the model
    initial = state_dict_sha256(ShapeDiT(**config.model))
    result = train(config, output_dir)
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "initial": initial,
        "final": state_dict_sha256(result.model),
        "num_processes": result.summary["num_processes"],
        "steps": result.summary["steps"],
    }
    (Path(output_dir) / f"hash-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Helper run by test_multinode.py under `accelerate launch --num_machines 2`: train a tiny VAE or DiT for a few
steps, then every rank writes the sha256 of its own replica (right after accelerate's prepare, and at the end of
training) to OUT/hash-<rank>.json.

Neither training function hands back every rank's model (the VAE's returns a summary), so the replica is read
where both loops pass it anyway: ``Accelerator.prepare`` and ``Accelerator.end_training``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator

from dora_shapegen.config import load_config
from dora_shapegen.training.checkpoints import state_dict_sha256

MODEL_CLASSES = {"vae": "DoraVAE", "dit": "ShapeDiT"}


def main(kind: str, config_path: str, data: str, output_dir: str) -> None:
    hashes: dict[str, str] = {}

    def replica(accelerator: Accelerator):
        models = [accelerator.unwrap_model(m) for m in accelerator._models]
        (model,) = [m for m in models if type(m).__name__ == MODEL_CLASSES[kind]]
        return model

    original_prepare, original_end = Accelerator.prepare, Accelerator.end_training

    def prepare(self, *args, **kwargs):
        prepared = original_prepare(self, *args, **kwargs)
        hashes.setdefault("initial", state_dict_sha256(replica(self)))
        return prepared

    def end_training(self):
        hashes["final"] = state_dict_sha256(replica(self))
        hashes["num_processes"] = self.num_processes
        return original_end(self)

    Accelerator.prepare, Accelerator.end_training = prepare, end_training
    if kind == "vae":
        from dora_shapegen.vae.train import VAETrainConfig, train

        config = load_config(
            VAETrainConfig,
            config_path,
            {"data.root": data, "training.max_steps": 3, "training.checkpoint_every": 0},
        )
        train(config, output_dir)
    else:
        from dora_shapegen.diffusion.train import DiTTrainConfig, train

        config = load_config(
            DiTTrainConfig,
            config_path,
            {
                "data.shards": data,
                "training.max_steps": 3,
                "training.checkpoint_every": 0,
                "sampling.final": False,
            },
        )
        train(config, output_dir)
    rank = int(os.environ["RANK"])
    hashes |= {
        "rank": rank,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "machine_rank": int(os.environ.get("GROUP_RANK", -1)),
    }
    (Path(output_dir) / f"hash-{rank}.json").write_text(json.dumps(hashes))


if __name__ == "__main__":
    main(*sys.argv[1:5])

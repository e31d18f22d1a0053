"""`dora train-vae`: a 2-step run (checkpoint + export), exact resume, loss going down (the token schedule is tested
in tests/training/test_schedules.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dora_shapegen.config import load_config
from dora_shapegen.vae.train import VAETrainConfig, build_model, compute_loss, main, train
from dora_shapegen.vae.train_data import EpochPermutationSampler, SeededItems, build_datasets, collate
from tests.data._prepared import prepare_builtin

TINY = Path(__file__).resolve().parents[2] / "configs" / "vae" / "tiny.yaml"


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory) -> str:
    """A few built-in procedural shapes prepared coarsely (epsilon 1/32, few points): seconds, not minutes."""
    root = tmp_path_factory.mktemp("prepared")
    prepare_builtin(root, 10)
    assert len(list((root / "samples").glob("*.npz"))) == 10
    return str(root)


def _weights(run: Path, name: str = "final") -> dict[str, torch.Tensor]:
    (file,) = (run / name).glob("*.safetensors")
    return load_file(str(file))


def test_two_step_run_writes_checkpoint_and_export(prepared_root, tmp_path):
    run = tmp_path / "run"
    assert (
        main(["--config", str(TINY), "--output-dir", str(run), "--data", prepared_root, "--max-steps", "2"])
        == 0
    )
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert json.loads((checkpoint / "train_state.json").read_text())["global_step"] == 2
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.bin").exists()
    assert (checkpoint / "ema.safetensors").exists()
    assert load_config(VAETrainConfig, checkpoint / "config.yaml").training.max_steps == 2
    for export in ("final", "best"):
        assert json.loads((run / export / "config.json").read_text())["_class_name"]
        assert _weights(run, export)
        stored = load_config(VAETrainConfig, run / export / "run_config.yaml")
        assert stored.data.root == prepared_root
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert 0.0 <= metrics["iou@16"] <= 1.0 and "chamfer@32" in metrics
    assert list((run / "samples").glob("final_step*.png")) and (run / "curves.png").exists()
    assert list((run / "logs").rglob("events.out.tfevents*"))


def test_resume_matches_uninterrupted_run(prepared_root, tmp_path):
    config = load_config(
        VAETrainConfig,
        TINY,
        {"data.root": prepared_root, "training.max_steps": 5, "training.checkpoint_every": 2},
    )
    full = tmp_path / "full"
    assert train(config, full)["steps"] == 5
    # An interrupted run: only the step-2 checkpoint exists; resume must continue from step 2, not from 0.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    summary = train(config, resumed, resume="latest")
    assert summary["steps"] == 5
    state = json.loads((resumed / "checkpoints" / "checkpoint-5" / "train_state.json").read_text())
    assert [step for step, _ in state["history"]["loss"]] == [1, 2, 3, 4, 5]  # 1-2 come from the checkpoint
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # And the run did move: the final weights differ from the step-2 weights.
    step2 = load_file(str(full / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert any(not torch.allclose(step2[k], a[k]) for k in step2 if k in a)


def _fixed_set_loss(model, config, root: str) -> float:
    """Loss of ``model`` on every training shape with fixed point draws and fixed posterior noise."""
    train_set, _, train_idx, _ = build_datasets(config, root)
    items = SeededItems(train_set, train_idx)
    batch = collate([items[(i, 1000 + i)] for i in range(len(items))])
    with torch.no_grad():
        loss, _ = compute_loss(
            model.eval(), batch, 32, "occupancy", config.training, torch.Generator().manual_seed(0)
        )
    return loss.item()


def test_loss_decreases_on_a_tiny_fixed_set(prepared_root, tmp_path):
    from dora_shapegen.vae import DoraVAE

    # A fixed set: every training shape in one batch, all supervision points, constant LR.
    config = load_config(
        VAETrainConfig,
        TINY,
        {
            "data.root": prepared_root,
            "training.max_steps": 30,
            "training.checkpoint_every": 0,
            "training.use_ema": False,
            "data.batch_size": 16,
            "data.n_supervision": None,
            "training.lr_scheduler": "constant_with_warmup",
            "training.learning_rate": 1e-2,
        },
    )
    torch.manual_seed(config.training.seed)  # train() builds its model after the same seeding
    before = _fixed_set_loss(build_model(config), config, prepared_root)
    train(config, tmp_path / "run")
    after = _fixed_set_loss(DoraVAE.from_pretrained(str(tmp_path / "run" / "final")), config, prepared_root)
    assert after < 0.9 * before
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-30" / "train_state.json").read_text())
    losses = [loss for _, loss in state["history"]["loss"]]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_on_cpus_trains_data_parallel(prepared_root, tmp_path):
    """Plain torchrun on a machine without GPUs: both processes must join one gloo group (not train alone)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(root / "tests" / "vae" / "_mp_train.py"),
        str(TINY),
        prepared_root,
        str(out),
    ]
    completed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["num_processes"], r["steps"]) for r in records] == [(2, 2), (2, 2)]
    assert (out / "final" / "config.json").exists()


@pytest.mark.parametrize(
    "config_name", ["vae/small.yaml", "vae/small_uniform_only.yaml", "quickstart/vae.yaml"]
)
def test_cpu_configs_weight_every_supervision_point_volume_twice(config_name):
    """The short-run configs weight points, not groups (volume x2): their group weights must follow the point counts
    of the data they are documented with, or the loss silently shifts toward whichever group is small."""
    from dora_shapegen.config import load_yaml

    prepare, training = load_yaml("quickstart/prepare.yaml"), load_yaml(config_name)["training"]
    per_point = {"volume": 2.0, "near": 1.0, "sharp": 1.0}
    mass = {group: per_point[group] * prepare[f"n_{group}"] for group in per_point}
    for group in per_point:
        assert training[f"{group}_weight"] == pytest.approx(mass[group] / sum(mass.values()), abs=1e-3), group


def test_group_weights_act_on_group_means():
    """compute_loss weights per-group MEANS: with weights proportional to point counts it equals one mean over all
    points."""
    counts = {0: 6, 1: 3, 2: 1}
    group = torch.cat([torch.full((count,), index) for index, count in counts.items()])[None].repeat(
        2, 1
    )  # (2, 10)
    raw = torch.linspace(-2.0, 2.0, 20).view(2, 10)
    occupancy = (torch.arange(20).view(2, 10) % 3 == 0).float()

    def model(**_):
        return {"raw": raw, "kl": torch.zeros(2)}

    config = VAETrainConfig().training
    config.volume_weight, config.near_weight, config.sharp_weight, config.kl_weight = 0.6, 0.3, 0.1, 0.0
    batch = {
        "uniform": None,
        "salient": None,
        "sup_points": None,
        "sup_occupancy": occupancy,
        "sup_group": group,
    }
    loss, _ = compute_loss(model, batch, 8, "occupancy", config)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(raw, occupancy)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    config.sharp_weight = 1.1  # the one sharp point now counts as much as 11 volume points
    loss, parts = compute_loss(model, batch, 8, "occupancy", config)
    # Logged values are 0-d tensors (summed on the device by the training core, no host sync per micro-step).
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in parts.values())
    weighted = 0.6 * parts["loss/volume"] + 0.3 * parts["loss/near"] + 1.1 * parts["loss/sharp"]
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_wall_clock_cap_cuts_the_run_loudly(prepared_root, tmp_path, caplog):
    config = load_config(
        VAETrainConfig,
        TINY,
        {
            "data.root": prepared_root,
            "training.max_steps": 50,
            "validation.every_steps": 0,
            "training.checkpoint_every": 0,
        },
    )
    with caplog.at_level("WARNING", logger="dora.train_vae"):
        summary = train(config, tmp_path / "run", max_minutes=1e-6)  # out of time after the first step
    assert summary["stopped_by_time"] and summary["steps"] == 1
    assert "WALL-CLOCK CAP" in caplog.text and "step 1 of 50" in caplog.text
    assert (tmp_path / "run" / "final" / "config.json").exists()  # what was trained is still exported


def test_epoch_order_and_item_draws_are_seeded_per_epoch_with_a_seed_per_draw():
    sampler = EpochPermutationSampler(40, seed=3)
    first = list(sampler)
    assert first == list(EpochPermutationSampler(40, seed=3))  # every rank and a resumed run: the same
    assert sorted(item for item, _ in first) == list(range(40))
    sampler.set_epoch(1)
    second = list(sampler)
    assert [item for item, _ in second] != [item for item, _ in first]
    assert [item for item, _ in EpochPermutationSampler(40, seed=4)] != [item for item, _ in first]
    draws = [draw for _, draw in first + second]
    assert len(set(draws)) == len(draws)  # each position of each epoch draws its own point subsets

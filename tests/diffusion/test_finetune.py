"""`dora train-dit --init-from` and LoRA: a fine-tuning run starts from the trained DiT (its loss, its config), a LoRA
run trains and saves only the adapter (base bit-identical, a small file), resumes exactly, and bad configs are
refused with the field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dora_shapegen.diffusion import ShapeDiT
from dora_shapegen.diffusion.finetune import (
    ADAPTER_FILE,
    init_latent_stats,
    prepare_finetune,
    target_module_names,
)
from dora_shapegen.diffusion.train import build_parser, train
from dora_shapegen.provenance import weight_hashes

from .test_train import TINY, fixed_loss, shards, tiny_config  # noqa: F401  (module fixture)

LORA = {
    "lora.rank": 4,
    "training.use_ema": False,
    "training.learning_rate": 1e-2,
    "training.caption_dropout": 0.0,
    "training.lr_scheduler": "constant_with_warmup",
}


@pytest.fixture(scope="module")
def base_dit(shards, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny DiT trained 25 steps from scratch (its export is the folder to fine-tune)."""
    run = tmp_path_factory.mktemp("dit_base")
    config = tiny_config(
        shards,
        **{
            "data.batch_size": 8,
            "training.max_steps": 25,
            "training.caption_dropout": 0.0,
            "training.use_ema": False,
            "training.checkpoint_every": 0,
            "training.learning_rate": 3e-3,
        },
    )
    train(config, run)
    return run / "final"


def _base_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_full_finetune_starts_from_the_trained_dit(shards, base_dit, tmp_path):  # noqa: F811
    config = tiny_config(shards, **{"training.max_steps": 2})
    torch.manual_seed(config.training.seed)
    fresh = fixed_loss(ShapeDiT(**config.model), shards, config)
    base = fixed_loss(ShapeDiT.from_pretrained(base_dit), shards, config)
    assert base < 0.7 * fresh
    out = tmp_path / "run"
    assert build_parser().parse_args(["--config", TINY, "--init-from", str(base_dit)]).init_from == str(
        base_dit
    )
    train(tiny_config(shards, **{"training.max_steps": 2, "init_from": str(base_dit)}), out)
    # Two steps later (EMA 0.9 over the loaded weights) the model is still at the trained DiT's loss.
    tuned = fixed_loss(ShapeDiT.from_pretrained(out / "final"), shards, config)
    assert tuned < 1.2 * base and tuned < 0.7 * fresh
    stored = yaml.safe_load((out / "final" / "run_config.yaml").read_text())
    assert stored["init_from"] == str(base_dit) and stored["init_from_sha256"] == weight_hashes(base_dit)
    assert stored["model"] == {
        k: v for k, v in ShapeDiT.from_pretrained(base_dit).config.items() if not k.startswith("_")
    }
    # The latent statistics are the base DiT's (the pipeline that holds the base un-normalises with them).
    assert (
        json.loads((out / "final" / "latent_stats.json").read_text())["stats"]
        == json.loads((base_dit / "latent_stats.json").read_text())["stats"]
    )


@pytest.mark.parametrize(("key", "value"), [("width", 64), ("num_heads", 4), ("in_channels", 32)])
def test_contradicting_dit_config_is_refused_naming_the_field(shards, base_dit, key, value):  # noqa: F811
    config = tiny_config(shards, **{f"model.{key}": value, "init_from": str(base_dit)})
    manifest = json.loads((shards / "manifest.json").read_text())
    with pytest.raises(ValueError, match=rf"model\.{key}=.*contradicts init_from"):
        prepare_finetune(config, manifest, str(shards))


def test_other_bad_finetune_configs_are_named(shards, base_dit):  # noqa: F811
    manifest = json.loads((shards / "manifest.json").read_text())
    ok, _ = prepare_finetune(
        tiny_config(shards, **{"model.dropout": 0.1, "init_from": str(base_dit)}), manifest, "s"
    )
    assert ok.model["dropout"] == 0.1  # a fine-tuning key
    cases = [
        ({"text_encoder": "tiny-random:bert", "init_from": str(base_dit)}, "text_encoder="),
        ({"lora.rank": 4, "training.use_ema": False}, "needs init_from"),
        ({"lora.rank": 4, "init_from": str(base_dit)}, "training.use_ema must be false"),
        ({"lora.rank": -1}, "lora.rank must be >= 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            prepare_finetune(tiny_config(shards, **overrides), manifest, "s")
    # A cache from other VAE weights than the base DiT's latents.
    recorded = {"stats": manifest["stats"], "vae_sha256": {"m.safetensors": "a"}}
    with pytest.raises(ValueError, match="trained on latents of VAE"):
        init_latent_stats(
            _write_stats(base_dit.parent / "other", recorded),
            manifest | {"vae": {"weights_sha256": {"m.safetensors": "b"}}},
            "s",
        )
    assert target_module_names(["attention", "mlp", "attention"]) == [
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "mlp.0",
        "mlp.3",
    ]


def _write_stats(folder: Path, stats: dict) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "latent_stats.json").write_text(json.dumps(stats))
    return str(folder)


def test_lora_run_trains_only_the_adapter(shards, base_dit, tmp_path):  # noqa: F811
    config = tiny_config(
        shards, **LORA | {"training.max_steps": 6, "init_from": str(base_dit), "training.checkpoint_every": 0}
    )
    result = train(config, tmp_path / "lora")
    base = _base_weights(base_dit)
    state = result.model.state_dict()
    adapters = {k: v for k, v in state.items() if "lora_" in k}
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    # Every base tensor is bit-identical (peft keeps a wrapped Linear's weights under base_layer).
    for name, tensor in state.items():
        if "lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name
    assert any(
        v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k
    )  # B starts at zero: it trained
    final = tmp_path / "lora" / "final"
    assert not (final / "diffusion_pytorch_model.safetensors").exists()
    saved = load_file(str(final / ADAPTER_FILE))
    assert set(saved) == {"transformer." + k.replace(".default", "") for k in adapters}
    size, base_size = (
        (final / ADAPTER_FILE).stat().st_size,
        (base_dit / "diffusion_pytorch_model.safetensors").stat().st_size,
    )
    assert size < 48_000 and size < 0.25 * base_size, (size, base_size)
    checkpoint = tmp_path / "lora" / "checkpoints" / "checkpoint-6"
    assert (checkpoint / ADAPTER_FILE).is_file() and not (checkpoint / "model.safetensors").exists()
    # LoRA lowered the loss below the base's on the training set.
    assert fixed_loss(result.model, shards, config) < fixed_loss(
        ShapeDiT.from_pretrained(base_dit), shards, config
    )


def test_lora_resume_matches_an_uninterrupted_run(shards, base_dit, tmp_path):  # noqa: F811
    config = tiny_config(
        shards, **LORA | {"training.max_steps": 4, "training.checkpoint_every": 2, "init_from": str(base_dit)}
    )
    straight = train(config, tmp_path / "straight")
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    resumed = train(config, tmp_path / "resumed", resume="latest")
    assert resumed.summary["resumed_from_step"] == 2 and resumed.summary["steps"] == 4
    for (name, expected), (_, actual) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters()
    ):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=name)
    # Resuming onto other base weights is refused (the checkpoint holds only the adapter).
    other = tmp_path / "other_base"
    shutil.copytree(base_dit, other)
    model = ShapeDiT.from_pretrained(other)
    with torch.no_grad():
        model.proj_in.weight.add_(1.0)
    model.save_pretrained(other)
    moved = tiny_config(shards, **LORA | {"training.max_steps": 4, "init_from": str(other)})
    with pytest.raises(ValueError, match="that run started from weights"):
        train(moved, tmp_path / "resumed", resume="latest")


def test_lora_recipe_config_loads():
    from dora_shapegen.config import load_config
    from dora_shapegen.diffusion.finetune import check_lora_config
    from dora_shapegen.diffusion.train import DiTTrainConfig

    config = load_config(
        DiTTrainConfig, "configs/dit/lora.yaml", {"init_from": "outputs/quickstart/dit/final"}
    )
    check_lora_config(config)  # rank > 0, EMA off, init_from given: accepted
    assert config.lora.rank == 8 and config.lora.target_modules == ["attention"] and config.model == {}

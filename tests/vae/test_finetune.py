"""`dora train-vae --init-from`: a run starts from a pretrained folder's weights and config, refuses a contradicting
config naming the field, records provenance; a fine-tuned VAE is another VAE for the latent cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dora_shapegen.config import load_config
from dora_shapegen.provenance import check_vae_identity, resolve_init_from, weight_hashes
from dora_shapegen.vae.modeling_dora_vae import DoraVAE
from dora_shapegen.vae.train import VAE_FREE_KEYS, VAETrainConfig, build_model, main, train

from .test_train import TINY, _fixed_set_loss, prepared_root  # noqa: F401  (session fixture)


def _config(root: str, **overrides) -> VAETrainConfig:
    values = {
        "data.root": root,
        "training.checkpoint_every": 0,
        "training.use_ema": False,
        "data.batch_size": 16,
        "data.n_supervision": None,
        "validation.max_shapes": 1,
        "validation.mesh_token_counts": [],
        "validation.final_token_counts": [16],
    }
    return load_config(VAETrainConfig, TINY, values | overrides)


@pytest.fixture(scope="module")
def pretrained(prepared_root, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny VAE trained 25 steps: a pretrained folder whose loss is well below a fresh model's."""
    run = tmp_path_factory.mktemp("vae_base")
    train(
        _config(
            prepared_root,
            **{
                "training.max_steps": 25,
                "training.learning_rate": 1e-2,
                "training.lr_scheduler": "constant_with_warmup",
            },
        ),
        run,
    )
    return run / "final"


@pytest.fixture(scope="module")
def finetuned(prepared_root, pretrained, tmp_path_factory) -> Path:  # noqa: F811
    """2 steps of `dora train-vae --init-from` the pretrained folder."""
    run = tmp_path_factory.mktemp("vae_finetuned")
    argv = [
        "--config",
        str(TINY),
        "--data",
        prepared_root,
        "--output-dir",
        str(run),
        "--max-steps",
        "2",
        "--init-from",
        str(pretrained),
    ]
    assert main(argv) == 0
    return run


def _logged_losses(run: Path) -> list[float]:
    (checkpoint,) = (run / "checkpoints").glob("checkpoint-*")
    return [loss for _, loss in json.loads((checkpoint / "train_state.json").read_text())["history"]["loss"]]


def test_finetune_starts_from_the_pretrained_loss(prepared_root, pretrained, finetuned):  # noqa: F811
    config = _config(prepared_root)
    torch.manual_seed(config.training.seed)
    fresh_loss = _fixed_set_loss(build_model(config), config, prepared_root)
    base_loss = _fixed_set_loss(DoraVAE.from_pretrained(str(pretrained)), config, prepared_root)
    resolved = resolve_init_from(config, DoraVAE, VAE_FREE_KEYS, init_from=str(pretrained))
    start_loss = _fixed_set_loss(build_model(resolved), config, prepared_root)
    assert start_loss == pytest.approx(base_loss, rel=1e-6) and base_loss < 0.9 * fresh_loss
    # The pretrained run's first step is a fresh model's loss on the first batch (same seed, same data order);
    # the fine-tuning run's first step is far below it, at the level the pretrained run ended on.
    scratch, tuned = _logged_losses(pretrained.parent), _logged_losses(finetuned)
    assert tuned[0] < 0.9 * scratch[0] and tuned[0] < 1.05 * max(scratch[-3:])
    # Provenance: the run config names the source folder and its weights' sha256, and its model section is the
    # folder's config, so the export rebuilds without the source.
    stored = yaml.safe_load((finetuned / "final" / "run_config.yaml").read_text())
    assert stored["init_from"] == str(pretrained)
    assert stored["init_from_sha256"] == weight_hashes(pretrained) and len(stored["init_from_sha256"]) == 1
    source_config = json.loads((pretrained / "config.json").read_text())
    assert (
        stored["model"]["width"] == source_config["width"]
        and stored["model"]["epsilon"] == source_config["epsilon"]
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("width", 64), ("heads", 4), ("latent_channels", 16), ("output_type", "tsdf"), ("epsilon", 2 / 256)],
)
def test_contradicting_model_config_is_refused_naming_the_field(prepared_root, pretrained, key, value):  # noqa: F811
    config = _config(prepared_root, **{f"model.{key}": value, "init_from": str(pretrained)})
    with pytest.raises(ValueError, match=rf"model\.{key}=.*contradicts init_from"):
        resolve_init_from(config, DoraVAE, VAE_FREE_KEYS)


def test_fine_tuning_keys_may_change_and_unknown_keys_are_named(prepared_root, pretrained):  # noqa: F811
    config = _config(
        prepared_root,
        **{
            "model.max_train_tokens": 64,
            "model.n_uniform": 128,
            "training.learning_rate": 1e-5,
            "init_from": str(pretrained),
        },
    )
    resolved = resolve_init_from(config, DoraVAE, VAE_FREE_KEYS)
    assert resolved.model["max_train_tokens"] == 64 and resolved.model["n_uniform"] == 128
    assert build_model(resolved).config.max_train_tokens == 64
    with pytest.raises(ValueError, match=r"model\.no_such_key"):
        resolve_init_from(
            _config(prepared_root, **{"model.no_such_key": 1, "init_from": str(pretrained)}),
            DoraVAE,
            VAE_FREE_KEYS,
        )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_init_from(config, DoraVAE, VAE_FREE_KEYS, init_from=str(pretrained.parent))
    # A config recording other weights (e.g. a stored run config pointed at a changed folder) is refused.
    stale = _config(
        prepared_root, **{"init_from": str(pretrained), "init_from_sha256": {"x.safetensors": "0"}}
    )
    with pytest.raises(ValueError, match="init_from_sha256"):
        resolve_init_from(stale, DoraVAE, VAE_FREE_KEYS)


def test_latents_cached_from_a_vae_match_only_its_exact_weights(
    prepared_root,  # noqa: F811
    pretrained,
    finetuned,
    tmp_path,
):
    from dora_shapegen.vae.cache_latents import main as cache_main

    tuned = finetuned
    cache = tmp_path / "latents"
    args = [
        "--data",
        prepared_root,
        "--out",
        str(cache),
        "--num-tokens",
        "16",
        "--limit",
        "3",
        "--num-workers",
        "0",
    ]
    assert cache_main(["--vae", str(pretrained), *args]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["vae"]["weights_sha256"] == weight_hashes(pretrained)
    # The fine-tuned VAE has the source's config but other weights: not the VAE of this cache.
    with pytest.raises(ValueError, match="other settings.*vae"):
        cache_main(["--vae", str(tuned / "final"), *args])
    with pytest.raises(ValueError, match="cached latents come from a VAE"):
        check_vae_identity(manifest, tuned / "final", "cache")
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    check_vae_identity(manifest, copy, "cache")  # the same weights under another path are the same VAE
    assert cache_main(["--vae", str(copy), *args]) == 0  # and may extend the cache


def test_dora_configs_fit_converted_weights(tmp_path):
    """The GPU recipe: configs/vae/dora_v1_1.yaml and dora_v1_1_finetune.yaml start from `dora
    convert-dora-checkpoint` output (its config inferred from the official tensor shapes, here meta tensors)."""
    from safetensors.torch import save_file

    from dora_shapegen.vae.convert_dora import infer_config

    meta = {
        name: torch.empty(shape, device="meta")
        for name, shape in {
            "encoder.input_proj.weight": (768, 54),
            "encoder.input_proj1.weight": (768, 54),
            "decoder.query_proj.weight": (768, 51),
            "post_kl.weight": (768, 64),
            "transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
        }.items()
    }
    meta |= {
        f"encoder.self_attn.resblocks.{i}.ln_1.weight": torch.empty(768, device="meta") for i in range(8)
    }
    meta |= {f"transformer.resblocks.{i}.ln_1.weight": torch.empty(768, device="meta") for i in range(16)}
    converted = tmp_path / "dora_vae_v1_1"
    converted.mkdir()
    (converted / "config.json").write_text(json.dumps({"_class_name": "DoraVAE", **infer_config(meta)}))
    save_file({"w": torch.zeros(1)}, str(converted / "diffusion_pytorch_model.safetensors"))
    root = Path(__file__).resolve().parents[2] / "configs" / "vae"
    for name in ("dora_v1_1.yaml", "dora_v1_1_finetune.yaml"):
        config = load_config(VAETrainConfig, root / name, {"init_from": str(converted)})
        resolved = resolve_init_from(config, DoraVAE, VAE_FREE_KEYS)
        assert resolved.model["width"] == 768 and resolved.model["epsilon"] == 2 / 256, name
        assert resolved.model["output_type"] == "tsdf" and resolved.model["gradient_checkpointing"] is True, (
            name
        )


def test_decoder_only_finetune_keeps_the_encoder_and_its_codes(prepared_root, pretrained, tmp_path):  # noqa: F811
    """training.trainable: decoder trains the decoder alone (here on noisy codes), so the codes a cache or a DiT
    was built on are still the ones the fine-tuned VAE's encoder gives."""
    from dora_shapegen.errors import ConfigError
    from dora_shapegen.vae.train import ENCODER_MODULES

    run = tmp_path / "decoder_only"
    overrides = {
        "init_from": str(pretrained),
        "training.trainable": "decoder",
        "training.latent_noise": 0.5,
        "training.latent_noise_sampling": "half_normal",
        "training.max_steps": 3,
        "training.learning_rate": 1e-2,
    }
    train(_config(prepared_root, **overrides), run)
    before = DoraVAE.from_pretrained(pretrained).state_dict()
    after = DoraVAE.from_pretrained(run / "final").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "the decoder did not train"
    assert all(name.split(".")[0] not in ENCODER_MODULES for name in changed), sorted(changed)
    assert any(name.startswith("decoder_blocks.") for name in changed)

    cloud = torch.cat(
        [torch.rand(2, 64, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(2, 64, 3), dim=-1)], -1
    )
    encoders = [DoraVAE.from_pretrained(path).eval() for path in (pretrained, run / "final")]
    with torch.no_grad():
        codes = [
            vae.encode({"uniform": cloud, "salient": cloud}, num_tokens=16, sample_posterior=False)
            for vae in encoders
        ]
    assert torch.equal(codes[0], codes[1])

    with pytest.raises(ConfigError, match="training.trainable"):
        build_model(_config(prepared_root, **{"training.trainable": "encoder"}))

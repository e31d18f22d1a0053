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


# ------------------------------------------------------------------------- data.codes: a decoder fine-tune on codes
CODE_TOKENS = 16


def _encode_training_shapes(root: str, vae_dir: Path, count: int) -> tuple[list[str], torch.Tensor]:
    """The shape ids and posterior-mean codes (S, CODE_TOKENS, C) of the first ``count`` training shapes of
    ``root``, encoded by the VAE in ``vae_dir`` (what `dora cache-latents` stores for them)."""
    from dora_shapegen.vae.train_data import SeededItems, build_datasets, collate, shape_ids_of

    config = _config(root)
    train_set, _, train_idx, _ = build_datasets(config, root)
    items = SeededItems(train_set, train_idx[:count])
    batch = collate([items[(i, 500 + i)] for i in range(len(items))])
    vae = DoraVAE.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        codes = vae.encode(
            {"uniform": batch["uniform"], "salient": batch["salient"]},
            num_tokens=CODE_TOKENS,
            sample_posterior=False,
        )  # (S, N, C)
    ids = shape_ids_of(train_set)
    return [ids[i] for i in train_idx[:count]], codes


def _write_codes(
    folder: Path,
    shape_ids: list[str],
    clean: torch.Tensor,
    vae_sha256: dict[str, str] | None,
    perturbed: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A `dora sample-codes` folder in the documented format: per shape its clean code (sigma 0) and ``perturbed``
    codes off it (sigma 0.4, 0.6, ...); ``tensors`` replaces entries of codes.safetensors (broken folders)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    spread = clean.flatten(0, 1).std(0)  # (C,)
    rows, index, sigma = [clean], list(range(len(shape_ids))), [0.0] * len(shape_ids)
    for variant in range(perturbed):
        level = 0.4 + 0.2 * variant
        rows.append(clean + level * spread * torch.randn(clean.shape, generator=generator))  # (S, N, C)
        index += list(range(len(shape_ids)))
        sigma += [level] * len(shape_ids)
    values = {
        "codes": torch.cat(rows).to(torch.float16).contiguous(),  # (P, N, C)
        "shape_index": torch.tensor(index, dtype=torch.int64),  # (P,)
        "sigma": torch.tensor(sigma, dtype=torch.float32),  # (P,)
    } | (tensors or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(values, str(folder / "codes.safetensors"))
    info = {"shape_ids": shape_ids, "num_codes": len(values["codes"]), "vae_weights_sha256": vae_sha256}
    (folder / "codes.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def coded(prepared_root, pretrained, tmp_path_factory) -> tuple[Path, list[str], torch.Tensor]:  # noqa: F811
    """A codes folder of the pretrained VAE for all training shapes but the last two (left out on purpose)."""
    from dora_shapegen.vae.train_data import build_datasets

    _, _, train_idx, _ = build_datasets(_config(prepared_root), prepared_root)
    shape_ids, clean = _encode_training_shapes(prepared_root, pretrained, len(train_idx) - 2)
    folder = _write_codes(tmp_path_factory.mktemp("codes"), shape_ids, clean, weight_hashes(pretrained))
    return folder, shape_ids, clean


def _codes_overrides(pretrained: Path, folder: Path, **extra) -> dict:
    return {
        "init_from": str(pretrained),
        "training.trainable": "decoder",
        "data.codes": str(folder),
        "training.max_steps": 3,
        "training.learning_rate": 1e-2,
    } | extra


def test_decoder_fine_tune_on_codes_trains_the_decoder_alone_on_the_covered_shapes(
    prepared_root,  # noqa: F811
    pretrained,
    coded,
    tmp_path,
    monkeypatch,
    caplog,
):
    import dora_shapegen.vae.train as vae_train
    from dora_shapegen.vae.train import ENCODER_MODULES
    from dora_shapegen.vae.train_data import build_datasets

    folder, shape_ids, clean = coded
    seen: list[torch.Tensor] = []
    original = vae_train.compute_loss

    def spy(model, batch, *args, **kwargs):
        assert "codes" in batch, "a batch without codes: the decoder would read the encoder's"
        seen.append(batch["codes"].detach().clone())
        loss, parts = original(model, batch, *args, **kwargs)
        assert "loss/kl" not in parts  # the encoder took no part: nothing of it to regularise
        return loss, parts

    monkeypatch.setattr(vae_train, "compute_loss", spy)
    run = tmp_path / "refined"
    with caplog.at_level("WARNING", logger="dora.train_vae"):
        summary = train(_config(prepared_root, **_codes_overrides(pretrained, folder)), run)
    assert summary["steps"] == 3 and len(seen) == 3
    # Shapes without codes are left out, with a warning that says how many.
    _, _, train_idx, _ = build_datasets(_config(prepared_root), prepared_root)
    assert (
        json.loads((run / "summary.json").read_text())["train_shapes"] == len(shape_ids) == len(train_idx) - 2
    )
    assert f"2 of {len(train_idx)} training shapes have no code and are left out" in caplog.text
    # Every batch decoded rows of the codes table ((B, 16, 8) in fp16 precision), never an encoder's code.
    from dora_shapegen.vae.train_data import CodeTable

    table = CodeTable(folder)
    for codes in seen:
        assert codes.shape[1:] == (CODE_TOKENS, 8)
        for code in codes:
            assert any(torch.equal(code, row) for row in table.codes), "a code that is not in the table"

    before = DoraVAE.from_pretrained(pretrained).state_dict()
    after = DoraVAE.from_pretrained(run / "final").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("decoder_blocks.") for name in changed), sorted(changed)
    assert all(name.split(".")[0] not in ENCODER_MODULES for name in changed), sorted(changed)
    encoder = [name for name in before if name.split(".")[0] in ENCODER_MODULES]
    assert encoder and all(torch.equal(before[name], after[name]) for name in encoder)
    stored = yaml.safe_load((run / "final" / "run_config.yaml").read_text())
    assert stored["data"]["codes"] == str(folder) and stored["training"]["trainable"] == "decoder"
    assert stored["init_from_sha256"] == weight_hashes(pretrained)


def test_codes_need_a_frozen_encoder_of_the_same_vae(prepared_root, pretrained, coded, tmp_path):  # noqa: F811
    from dora_shapegen.errors import ConfigError

    folder, shape_ids, clean = coded
    overrides = _codes_overrides(pretrained, folder)
    with pytest.raises(ConfigError, match="training.trainable: decoder"):
        train(_config(prepared_root, **(overrides | {"training.trainable": "all"})), tmp_path / "all")
    without_init = {key: value for key, value in overrides.items() if key != "init_from"}
    with pytest.raises(ConfigError, match="--init-from"):
        train(_config(prepared_root, **without_init), tmp_path / "scratch")
    with pytest.raises(ConfigError, match="clean_code_fraction"):
        train(
            _config(prepared_root, **(overrides | {"data.clean_code_fraction": 1.5})), tmp_path / "fraction"
        )
    # Codes made in another VAE's latent space (another cache) are refused, naming both weights.
    foreign = _write_codes(
        tmp_path / "foreign", shape_ids, clean, {"diffusion_pytorch_model.safetensors": "0" * 64}
    )
    with pytest.raises(ConfigError, match="made in the latent space of a VAE with weights .*0000"):
        train(_config(prepared_root, **_codes_overrides(pretrained, foreign)), tmp_path / "foreign_run")
    # Codes of another channel count are refused before training (not at the first step).
    wide = _write_codes(
        tmp_path / "wide", shape_ids, torch.zeros(len(shape_ids), 4, 5), weight_hashes(pretrained)
    )
    with pytest.raises(ConfigError, match="codes of 5 channels.*8 latent channels"):
        train(_config(prepared_root, **_codes_overrides(pretrained, wide)), tmp_path / "wide_run")
    # Codes of none of the training shapes leave nothing to train on.
    strangers = _write_codes(tmp_path / "strangers", ["no-such-shape"], clean[:1], weight_hashes(pretrained))
    with pytest.raises(ConfigError, match="no code for any training shape"):
        train(_config(prepared_root, **_codes_overrides(pretrained, strangers)), tmp_path / "strangers_run")


def test_code_table_rejects_broken_folders_naming_them(coded, tmp_path):
    from dora_shapegen.vae.train_data import CodeTable

    folder, shape_ids, clean = coded
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: not a `dora sample-codes` output"):
        CodeTable(empty)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(folder / "codes.json", half / "codes.json")
    with pytest.raises(FileNotFoundError, match=str(half)):
        CodeTable(half)

    def broken(name: str, **tensors: torch.Tensor) -> Path:
        return _write_codes(tmp_path / name, shape_ids, clean, None, tensors=tensors)

    rows = len(shape_ids) * 3
    short = broken("short", shape_index=torch.zeros(rows - 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"{short}: codes .* do not line up"):
        CodeTable(short)
    flat = broken("flat", codes=torch.zeros(rows, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=f"{flat}: codes .* do not line up"):
        CodeTable(flat)
    outside = broken("outside", shape_index=torch.full((rows,), len(shape_ids), dtype=torch.int64))
    with pytest.raises(ValueError, match=f"{outside}: shape_index points outside"):
        CodeTable(outside)
    torn = _write_codes(tmp_path / "torn", shape_ids, clean, None)
    (torn / "codes.safetensors").write_bytes((torn / "codes.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{torn}: cannot read the codes"):
        CodeTable(torn)
    (torn / "codes.safetensors").unlink()
    from safetensors.torch import save_file

    save_file({"codes": clean.half().contiguous()}, str(torn / "codes.safetensors"))
    with pytest.raises(ValueError, match=f"{torn}: codes file lacks \\['shape_index', 'sigma'\\]"):
        CodeTable(torn)


def test_code_table_draws_the_clean_or_a_generated_code(coded):
    from dora_shapegen.vae.train_data import CodedItems, CodeTable, collate

    folder, shape_ids, clean = coded
    table = CodeTable(folder)
    assert table.covers(shape_ids[0]) and not table.covers("no-such-shape")
    shape = shape_ids[1]
    clean_row = table.codes[table.clean[shape]]
    generated = [table.codes[row] for row in table.generated[shape]]
    assert len(generated) == 2 and table.sigma[table.clean[shape]] == 0.0
    torch.testing.assert_close(clean_row, clean[1].half().float())
    torch.manual_seed(0)
    for _ in range(10):
        assert torch.equal(table.draw(shape, clean_fraction=1.0), clean_row)
        drawn = table.draw(shape, clean_fraction=0.0)
        assert any(torch.equal(drawn, code) for code in generated) and not torch.equal(drawn, clean_row)
    # A mix draws both kinds; the draw follows torch's RNG (seeded per item by SeededItems).
    torch.manual_seed(1)
    mixed = [table.draw(shape, clean_fraction=0.5) for _ in range(40)]
    assert any(torch.equal(code, clean_row) for code in mixed) and not all(
        torch.equal(code, clean_row) for code in mixed
    )
    torch.manual_seed(2)
    again = table.draw(shape, 0.5)
    torch.manual_seed(2)
    assert torch.equal(table.draw(shape, 0.5), again)

    first_two = shape_ids[:2]

    class Items(torch.utils.data.Dataset):  # the prepared dataset's item layout, two shapes
        shape_ids = first_two

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict:
            return {key: torch.zeros(4) for key in ("uniform", "salient", "sup_points", "sup_occupancy",
                                                       "sup_tsdf", "sup_group")} | {"meta": {}}  # fmt: skip

    batch = collate([CodedItems(Items(), table, 1.0)[i] for i in range(2)])
    torch.testing.assert_close(batch["codes"], clean[:2].half().float())  # (B, N, C)


def test_forward_decodes_given_latents_without_the_encoder(pretrained):
    vae = DoraVAE.from_pretrained(pretrained).eval()
    latents = torch.randn(
        2, CODE_TOKENS, vae.config.latent_channels, generator=torch.Generator().manual_seed(0)
    )
    points = torch.rand(2, 50, 3) * 2 - 1
    with torch.no_grad():
        out = vae(query_points=points, latents=latents)
        expected = vae.decode_at_points(latents, points, output="raw")
    assert set(out) == {"raw", "latents"} and out["raw"].shape == (2, 50)
    torch.testing.assert_close(out["raw"], expected)
    torch.testing.assert_close(out["latents"], latents)
    with pytest.raises(ValueError, match=r"latents must have shape \(B, N, 8\), got \(2, 16, 5\)"):
        vae(query_points=points, latents=torch.zeros(2, CODE_TOKENS, 5))
    with pytest.raises(ValueError, match="a point cloud \\(uniform\\) or latents"):
        vae(query_points=points)

"""`dora assemble-pipeline`: tiny trained-part folders + a latent manifest -> a loadable pipeline folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler

from dora_shapegen.data.latent_shards import LatentSums, build_manifest, write_manifest
from dora_shapegen.pipelines import DoraTextTo3DPipeline
from dora_shapegen.pipelines.apps.cli import main as dora
from tests.pipelines._tiny_pipeline import LATENT_CHANNELS, make_tiny_pipeline

CACHED_TOKENS = 24
TRAINED_TOKENS = 16  # the DiT trained on prefixes of the cached 24 tokens
SHIFT = 2.5


def _write_parts(
    root: Path,
    channels: int = LATENT_CHANNELS,
    vae_sha256: str | None = None,
    sampling: dict | None = None,
) -> dict[str, Path]:
    """The folders `dora train-vae` / `train-dit` / `cache-latents` produce, from the tiny test models
    (``sampling``: the run record's sampling section, which older records and this default lack)."""
    tiny = make_tiny_pipeline()
    tiny.vae.save_pretrained(root / "vae")
    # `dora train-dit` exports final/: the weights, run_config.yaml (text encoder, schedule...) and scheduler/.
    tiny.transformer.save_pretrained(root / "dit" / "final")
    run_config = {"text_encoder": "tiny-random:bert", "training": {"text_max_length": 40},
                  "schedule": {"phases": [{"until_step": None, "tokens": [8, TRAINED_TOKENS]}]}}  # fmt: skip
    if sampling is not None:
        run_config["sampling"] = sampling
    (root / "dit" / "final" / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(root / "dit" / "final" / "scheduler")
    sums = LatentSums()
    sums.update(np.random.default_rng(0).normal(0.3, 2.0, size=(5, CACHED_TOKENS, channels)))
    (root / "shards").mkdir(parents=True)
    # `dora cache-latents` pins the latents to the VAE's weights (sha256 per weight file).
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    vae_sha256 = (
        vae_sha256 or hashlib.sha256(weights.read_bytes()).hexdigest()
    )  # default: the VAE saved above
    identity = {"weights_sha256": {weights.name: vae_sha256}}
    manifest = build_manifest([], sums, num_tokens=CACHED_TOKENS, latent_channels=channels, vae=identity)
    write_manifest(root / "shards", manifest)
    return {"vae": root / "vae", "dit": root / "dit" / "final", "manifest": root / "shards" / "manifest.json"}


def test_assemble_pipeline_round_trip(tmp_path, capsys):
    parts = _write_parts(tmp_path)
    out = tmp_path / "pipeline"
    code = dora(["assemble-pipeline", "--vae", str(parts["vae"]), "--transformer", str(parts["dit"]),
                 "--manifest", str(parts["manifest"]), "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads(parts["manifest"].read_text())
    pipe = DoraTextTo3DPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.latent_mean == pytest.approx(manifest["stats"]["mean"])
    assert pipe.config.latent_std == pytest.approx(manifest["stats"]["std"])
    # From the run config: the text encoder, its max_length, the schedule's largest token count; the scheduler.
    assert pipe.config.text_encoder_kind == "bert" and pipe.config.text_max_length == 40
    assert pipe.default_num_tokens == TRAINED_TOKENS
    # A run record without sampling.guidance_scale stores no guidance: the pipeline samples at 5, as before.
    assert pipe.config.default_guidance_scale is None and pipe.default_guidance_scale == 5.0
    assert (
        isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == SHIFT
    )
    latents = pipe("a chair", num_inference_steps=1, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).latents  # fmt: skip
    assert latents.shape == (1, TRAINED_TOKENS, LATENT_CHANNELS)


def test_assemble_rejects_mismatched_parts(tmp_path, capsys):
    parts = _write_parts(tmp_path)
    other = _write_parts(tmp_path / "other", channels=LATENT_CHANNELS + 1)
    args = ["--vae", str(parts["vae"]), "--transformer", str(parts["dit"]), "--out", str(tmp_path / "p")]
    assert dora(["assemble-pipeline", *args, "--manifest", str(other["manifest"])]) == 2
    assert (
        f"the cached latents have {LATENT_CHANNELS + 1} channels but the DiT expects {LATENT_CHANNELS}"
        in (capsys.readouterr().err)
    )
    # The real MiniLM gives 384-d tokens; the tiny DiT cross-attends to 32-d ones.
    builtin = ["--manifest", str(parts["manifest"]), "--text-encoder", "builtin:all-MiniLM-L6-v2"]
    assert dora(["assemble-pipeline", *args, *builtin]) == 2
    assert "gives 384-d tokens but the DiT's cross_attention_dim is 32" in capsys.readouterr().err
    foreign = _write_parts(tmp_path / "foreign", vae_sha256="0" * 64)
    assert dora(["assemble-pipeline", *args, "--manifest", str(foreign["manifest"])]) == 2
    assert f"come from a VAE with weights {{'diffusion_pytorch_model.safetensors': '{'0' * 64}'}}" in (
        capsys.readouterr().err
    )
    assert dora(["assemble-pipeline", *args, "--manifest", str(tmp_path / "missing.json")]) == 2
    assert "--manifest" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # nothing written on a rejected assembly


def _assemble(parts: dict[str, Path], out: Path, *extra: str) -> int:
    return dora(["assemble-pipeline", "--vae", str(parts["vae"]), "--transformer", str(parts["dit"]),
                 "--manifest", str(parts["manifest"]), "--out", str(out), *extra])  # fmt: skip


def test_the_dit_runs_guidance_is_stored_and_guidance_scale_overrides_it(tmp_path, capsys):
    parts = _write_parts(tmp_path, sampling={"num_tokens": TRAINED_TOKENS, "guidance_scale": 2.0})
    assert _assemble(parts, tmp_path / "pipeline") == 0, capsys.readouterr().err
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["default_guidance_scale"] == 2.0
    pipe = DoraTextTo3DPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.default_guidance_scale == 2.0
    pipe("a chair", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert pipe.guidance_scale == 2.0  # a call without guidance_scale samples at the stored one

    assert _assemble(parts, tmp_path / "chosen", "--guidance-scale", "3") == 0, capsys.readouterr().err
    assert DoraTextTo3DPipeline.from_pretrained(tmp_path / "chosen").default_guidance_scale == 3.0


def test_guidance_out_of_range_is_a_clear_error(tmp_path, capsys):
    parts = _write_parts(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        _assemble(parts, tmp_path / "p", "--guidance-scale", "200")
    assert stopped.value.code == 2
    assert "argument --guidance-scale: must be a number in [0, 100], got 200" in capsys.readouterr().err
    broken = _write_parts(tmp_path / "broken", sampling={"guidance_scale": -1.0})
    assert _assemble(broken, tmp_path / "p") == 2
    assert (
        "the DiT's run record: `sampling.guidance_scale` must be a number in [0, 100], got -1.0; pass "
        "--guidance-scale" in capsys.readouterr().err
    )
    assert not (tmp_path / "p").exists()

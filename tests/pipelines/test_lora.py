"""LoRA adapters in DoraTextTo3DPipeline (diffusers' loader API) and `dora generate --lora DIR[:SCALE]`: an adapter
at scale 0 reproduces the base pipeline exactly, scales combine, fuse/unfuse round-trips, only safetensors load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import trimesh

from dora_shapegen.diffusion.finetune import ADAPTER_FILE, LoraConfig, add_lora, save_adapter
from dora_shapegen.pipelines.generate import main as generate
from dora_shapegen.pipelines.generate import parse_lora
from tests.pipelines._tiny_pipeline import center_surface_on, make_tiny_pipeline

PROMPT = "a chair"
STEPS = 3


def _latents(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0)).latents  # fmt: skip


def _adapter(folder: Path, seed: int, targets: list[str]) -> Path:
    """An adapter for the tiny pipeline's transformer written by the training code's own export, with random
    (non-zero) lora_B so that it changes the output."""
    transformer = make_tiny_pipeline().transformer
    add_lora(transformer, LoraConfig(rank=4, target_modules=targets), seed)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    save_adapter(transformer, folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return _adapter(root / "a", 1, ["attention"]), _adapter(root / "b", 2, ["attention", "mlp"])


def test_adapter_scales_fuse_and_unfuse(adapters):
    first, second = adapters
    pipe = make_tiny_pipeline()
    base = _latents(pipe)
    pipe.load_lora_weights(str(first), adapter_name="a")
    full = _latents(pipe)
    assert (full - base).abs().max() > 1e-2  # the adapter matters
    pipe.set_adapters(["a"], [0.0])
    assert torch.equal(_latents(pipe), base)  # scale 0 is the base pipeline, bit for bit
    pipe.set_adapters(["a"], [1.0])
    pipe.fuse_lora()  # merged into the base weights: same output, no adapter pass
    torch.testing.assert_close(_latents(pipe), full, atol=1e-4, rtol=1e-4)
    pipe.unfuse_lora()
    torch.testing.assert_close(_latents(pipe), full, atol=1e-4, rtol=1e-4)
    pipe.disable_lora()
    torch.testing.assert_close(
        _latents(pipe), base, atol=1e-4, rtol=1e-4
    )  # unfused: the base weights are back
    pipe.enable_lora()
    # Two adapters, each with its own scale; the adapter targeting the MLPs too changes more than attention.
    pipe.load_lora_weights(str(second), adapter_name="b")
    assert set(pipe.get_list_adapters()["transformer"]) == {"a", "b"}
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    torch.testing.assert_close(_latents(pipe), base, atol=1e-4, rtol=1e-4)
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    torch.testing.assert_close(_latents(pipe), full, atol=1e-4, rtol=1e-4)
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    assert (_latents(pipe) - full).abs().max() > 1e-3
    pipe.unload_lora_weights()
    torch.testing.assert_close(_latents(pipe), base, atol=1e-4, rtol=1e-4)


def test_a_fused_adapter_saves_as_a_plain_pipeline(adapters, tmp_path):
    """fuse + unload + save_pretrained bakes the adapter in: the saved pipeline has no LoRA layers and gives the
    adapted output (how a tool that takes only --pipeline, such as `dora bench-generation`, measures a LoRA)."""
    from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline

    pipe = make_tiny_pipeline()
    pipe.load_lora_weights(str(adapters[1]), adapter_name="b")
    adapted = _latents(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "baked")
    baked = DoraTextTo3DPipeline.from_pretrained(tmp_path / "baked")
    baked.set_progress_bar_config(disable=True)
    assert not any("lora" in name or "base_layer" in name for name in baked.transformer.state_dict())
    torch.testing.assert_close(_latents(baked), adapted, atol=1e-4, rtol=1e-4)


def test_only_safetensors_adapters_load(adapters, tmp_path):
    pipe = make_tiny_pipeline()
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.load_lora_weights(str(adapters[0]), use_safetensors=False)
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"not read")
    with pytest.raises(OSError):  # no .safetensors: diffusers' pickle fallback is never taken
        pipe.load_lora_weights(str(tmp_path))


def test_generate_with_lora(adapters, tmp_path, capsys, caplog):
    assert parse_lora("runs/x/final") == (Path("runs/x/final"), 1.0)
    assert parse_lora("runs/x/final:0.5") == (Path("runs/x/final"), 0.5)
    pipe = make_tiny_pipeline()
    center_surface_on(pipe, PROMPT, num_inference_steps=STEPS, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    pipe.save_pretrained(tmp_path / "pipe")
    args = [PROMPT, "--pipeline", str(tmp_path / "pipe"), "--steps", str(STEPS), "--resolution", "32"]
    assert generate([*args, "-o", str(tmp_path / "base.ply")]) == 0
    assert generate([*args, "-o", str(tmp_path / "zero.ply"), "--lora", f"{adapters[0]}:0"]) == 0
    assert "LoRA adapter lora0_a loaded" in capsys.readouterr().out
    base, zero = (trimesh.load(tmp_path / f"{n}.ply", force="mesh") for n in ("base", "zero"))
    assert len(base.faces) > 0 and (base.vertices == zero.vertices).all() and (base.faces == zero.faces).all()
    assert generate([*args, "-o", str(tmp_path / "bad.ply"), "--lora", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no LoRA adapter ({ADAPTER_FILE})" in capsys.readouterr().err
    # An adapter whose run recorded other base weights than the pipeline's transformer is warned about.
    foreign = tmp_path / "foreign"
    shutil.copytree(adapters[0], foreign)
    (foreign / "run_config.yaml").write_text("init_from_sha256: {diffusion_pytorch_model.safetensors: '0'}\n")
    with caplog.at_level(logging.WARNING, logger="dora_shapegen.pipelines.generate"):
        assert generate([*args, "-o", str(tmp_path / "foreign.ply"), "--lora", f"{foreign}:0.5"]) == 0
    assert "was trained on DiT weights" in caplog.text

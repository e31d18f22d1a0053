"""Converter from the official Dora-VAE v1.1 checkpoint, tested on synthetic state dicts built from the
reference key list (names and shapes of every official tensor; random values, no download)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dora_shapegen.vae import DoraVAE
from dora_shapegen.vae.convert_dora import (
    build_model,
    convert_state_dict,
    load_official_state_dict,
    main,
    split_per_head,
)
from dora_shapegen.vae.fps import farthest_point_indices
from dora_shapegen.vae.modeling_dora_vae import interleave_order

REFERENCE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "dora_vae_1_1_state_dict.json"
)
PREFIX = "shape_model."


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"reference key list not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())


class HyperParameters(dict):
    """Stands for Lightning's AttributeDict: a class that weights_only loading does not allowlist."""


class Options:
    """A plain object with attribute state, as hyper-parameter containers pickle."""

    def __init__(self) -> None:
        self.learning_rate = 1e-4


def synthetic_official(reference: dict, width: int | None = None, max_layers: int | None = None) -> dict:
    """Official names/shapes (prefix stripped) with random values. ``width`` scales the 768-wide dims (heads
    stay 12) and ``max_layers`` drops deeper blocks, for fast error-path tests."""
    generator = torch.Generator().manual_seed(0)
    scale = {} if width is None else {768: width, 1536: 2 * width, 2304: 3 * width, 3072: 4 * width}
    state = {}
    for entry in reference["tensors"]:
        name = entry["name"][len(PREFIX) :]
        layer = re.search(r"resblocks\.(\d+)\.", name)
        if max_layers is not None and layer and int(layer.group(1)) >= max_layers:
            continue
        shape = [scale.get(dim, dim) for dim in entry["shape"]]
        tensor = torch.empty(shape)
        if name.endswith("bias"):
            tensor.uniform_(-0.05, 0.05, generator=generator)
        elif re.search(r"(ln_\d|ln_post)\.weight$", name):
            tensor.uniform_(0.8, 1.2, generator=generator)
        else:  # one in-place pass: 192M values are generated here, keep it cheap
            bound = (3.0 / shape[-1]) ** 0.5
            tensor.uniform_(-bound, bound, generator=generator)
        state[name] = tensor
    return state


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor, heads: int
) -> torch.Tensor:
    """Plain multi-head attention from standard (head-major) Q/K/V outputs, written out without SDPA."""

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, H, L, D)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).flatten(2)  # (B, L, H*D)
    return F.linear(out, proj_w, proj_b)


def official_self_block(state: dict, prefix: str, x: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """A ResidualAttentionBlock computed from the INTERLEAVED official weights, as the reference notes define
    them: c_qkv rows are h*3*D + s*D + c (s = 0 Q, 1 K, 2 V)."""

    def ln(t, name):
        return F.layer_norm(
            t, t.shape[-1:], state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"], 1e-5
        )

    h = ln(x, "ln_1")
    qkv = F.linear(h, state[f"{prefix}attn.c_qkv.weight"])  # (B, N, 3W), per-head interleaved
    qkv = qkv.view(x.shape[0], x.shape[1], heads, 3, -1)  # (B, N, H, 3, D)
    q, k, v = (qkv[..., s, :].flatten(2) for s in range(3))
    x = x + reference_attention(
        q, k, v, state[f"{prefix}attn.c_proj.weight"], state[f"{prefix}attn.c_proj.bias"], heads
    )
    hidden = F.gelu(
        F.linear(ln(x, "ln_2"), state[f"{prefix}mlp.c_fc.weight"], state[f"{prefix}mlp.c_fc.bias"])
    )
    return x + F.linear(hidden, state[f"{prefix}mlp.c_proj.weight"], state[f"{prefix}mlp.c_proj.bias"])


def official_cross_block(state: dict, prefix: str, x: torch.Tensor, data: torch.Tensor, heads: int = 12):
    """A ResidualCrossAttentionBlock from the official weights: c_kv rows are h*2*D + s*D + c (s = 0 K, 1 V)."""

    def ln(t, name):
        return F.layer_norm(
            t, t.shape[-1:], state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"], 1e-5
        )

    hq, hd = ln(x, "ln_1"), ln(data, "ln_2")
    q = F.linear(hq, state[f"{prefix}attn.c_q.weight"])
    kv = F.linear(hd, state[f"{prefix}attn.c_kv.weight"]).view(data.shape[0], data.shape[1], heads, 2, -1)
    k, v = kv[..., 0, :].flatten(2), kv[..., 1, :].flatten(2)
    x = x + reference_attention(
        q, k, v, state[f"{prefix}attn.c_proj.weight"], state[f"{prefix}attn.c_proj.bias"], heads
    )
    hidden = F.gelu(
        F.linear(ln(x, "ln_3"), state[f"{prefix}mlp.c_fc.weight"], state[f"{prefix}mlp.c_fc.bias"])
    )
    return x + F.linear(hidden, state[f"{prefix}mlp.c_proj.weight"], state[f"{prefix}mlp.c_proj.bias"])


def test_split_per_head_undoes_interleaving():
    heads, head_dim = 3, 2
    # Row h*3*D + s*D + c holds the value 100*s + 10*h + c.
    fused = torch.tensor(
        [[100.0 * s + 10 * h + c] for h in range(heads) for s in range(3) for c in range(head_dim)]
    )
    q, k, v = split_per_head(fused, heads, 3)
    for s, part in enumerate((q, k, v)):
        assert part[:, 0].tolist() == [100.0 * s + 10 * h + c for h in range(heads) for c in range(head_dim)]


def test_full_size_conversion(reference, tmp_path):
    official = synthetic_official(reference)
    assert len(official) == reference["num_tensors"] == 322
    # (The file-reading half and the CLI are tested on a narrow checkpoint below, to keep this test light.)
    build_model(official, heads=12).save_pretrained(tmp_path / "converted")
    model = DoraVAE.from_pretrained(tmp_path / "converted").eval()
    config = model.config
    assert (config.width, config.heads, config.num_encoder_layers, config.num_decoder_layers) == (
        768,
        12,
        8,
        16,
    )
    assert (config.latent_channels, config.output_type, config.qkv_bias, config.use_salient) == (
        64,
        "tsdf",
        False,
        True,
    )
    ours = model.state_dict()
    assert sum(t.numel() for t in ours.values()) == reference["num_parameters"]
    assert all(t.dtype == torch.float32 for t in ours.values())

    # Every official tensor consumed and every one of ours filled: the converted dict matches exactly, and each
    # official tensor's values appear in the model (split ones as their parts).
    converted = convert_state_dict(official)
    assert set(converted) == set(ours)
    for key, tensor in converted.items():
        assert torch.equal(ours[key], tensor), key
    assert torch.equal(ours["uniform_proj.weight"], official["encoder.input_proj.weight"])
    assert torch.equal(ours["salient_proj.weight"], official["encoder.input_proj1.weight"])
    assert torch.equal(ours["output_proj.bias"], official["decoder.output_proj.bias"])
    total_official = sum(t.numel() for t in official.values())
    assert total_official == sum(t.numel() for t in converted.values())

    # The de-interleaving is proven numerically against blocks computed from the official fused weights.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 768, generator=generator)
    data = torch.randn(2, 9, 768, generator=generator)
    with torch.no_grad():
        ours_self = model.decoder_blocks[3](x)
        ours_cross = model.cross_attn_salient(x, data)
        ours_decoder_cross = model.cross_attn_decoder(x, data)
    torch.testing.assert_close(
        ours_self, official_self_block(official, "transformer.resblocks.3.", x), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        ours_cross, official_cross_block(official, "encoder.cross_attn1.", x, data), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        ours_decoder_cross,
        official_cross_block(official, "decoder.cross_attn_decoder.", x, data),
        atol=1e-4,
        rtol=1e-4,
    )
    # And the check has teeth: a plain chunk(3) of the fused weight (the wrong assumption) gives another block.
    naive = copy.deepcopy(model.decoder_blocks[3])
    for linear, part in zip(
        (naive.attn.to_q, naive.attn.to_k, naive.attn.to_v),
        official["transformer.resblocks.3.attn.c_qkv.weight"].chunk(3),
    ):
        linear.weight.data = part.clone()
    with torch.no_grad():
        assert not torch.allclose(naive(x), ours_self, atol=1e-2)

    # A forward pass of the full model on few points and tokens.
    cloud = {
        "uniform": torch.randn(1, 64, 6, generator=generator),
        "salient": torch.randn(1, 32, 6, generator=generator),
    }
    with torch.no_grad():
        latents = model.encode(cloud, num_tokens=16)
        values = model.decode_at_points(latents, torch.rand(20, 3, generator=generator) * 2 - 1, output="raw")
    assert latents.shape == (1, 16, 64) and values.shape == (1, 20) and torch.isfinite(values).all()


def test_missing_or_unknown_keys_fail(reference):
    official = synthetic_official(reference, width=48, max_layers=2)
    model = build_model(official, heads=12)
    assert model.config.num_encoder_layers == 2 and model.config.width == 48
    incomplete = dict(official)
    del incomplete["encoder.cross_attn1.ln_2.bias"]
    with pytest.raises(ValueError, match="cross_attn_salient.norm_context.bias"):
        build_model(incomplete, heads=12)
    with pytest.raises(ValueError, match="encoder.mystery"):
        build_model({**official, "encoder.mystery.weight": torch.zeros(3)}, heads=12)


def test_loader_accepts_flat_dicts_and_lightning_extras(reference, tmp_path):
    official = synthetic_official(reference, width=24, max_layers=1)
    flat = tmp_path / "flat.pt"
    torch.save({k: v.half() for k, v in official.items()}, flat)
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save(
        {
            "state_dict": {PREFIX + k: v for k, v in official.items()},
            "hyper_parameters": HyperParameters(options=Options(), seed=0),
        },
        wrapped,
    )
    assert set(load_official_state_dict(flat)) == set(official)
    loaded = load_official_state_dict(wrapped)
    assert set(loaded) == set(official)
    assert all(torch.equal(loaded[k], v) for k, v in official.items())
    half_model = build_model(load_official_state_dict(flat), heads=12)
    assert all(p.dtype == torch.float32 for p in half_model.parameters())
    # The command end to end: Lightning-style file in, save_pretrained folder out.
    assert main([str(wrapped), str(tmp_path / "out")]) == 0
    converted = DoraVAE.from_pretrained(tmp_path / "out")
    assert converted.config.width == 24 and converted.config.epsilon == pytest.approx(2 / 256)
    assert torch.equal(
        converted.state_dict()["cross_attn_uniform.attn.to_q.weight"],
        official["encoder.cross_attn.attn.c_q.weight"],
    )
    assert main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out2")]) == 1


def test_whole_model_matches_official_forward(reference):
    """Encoder and decoder assembled from the official weights by the reference notes (Fourier order, raw
    normals, [coarse ; sharp] queries, summed dual cross-attention, ln_post, mean-first KL split, no norm before
    the decoder cross-attention) agree with the converted model end to end."""
    official = synthetic_official(reference, width=48, max_layers=2)
    model = build_model(official, heads=12)
    generator = torch.Generator().manual_seed(2)
    uniform, salient = torch.randn(2, 40, 6, generator=generator), torch.randn(2, 30, 6, generator=generator)
    query_points = torch.rand(2, 25, 3, generator=generator) * 2 - 1

    def fourier(xyz: torch.Tensor) -> torch.Tensor:
        arguments = torch.cat([xyz[..., i : i + 1] * 2.0 ** torch.arange(8) for i in range(3)], dim=-1)
        return torch.cat([xyz, arguments.sin(), arguments.cos()], dim=-1)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, official[f"{name}.weight"], official[f"{name}.bias"])

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], official[f"{name}.weight"], official[f"{name}.bias"], 1e-5)

    coarse = linear(torch.cat([fourier(uniform[..., :3]), uniform[..., 3:]], -1), "encoder.input_proj")
    sharp = linear(torch.cat([fourier(salient[..., :3]), salient[..., 3:]], -1), "encoder.input_proj1")
    picked_coarse = farthest_point_indices(uniform[..., :3], 6)
    picked_sharp = farthest_point_indices(salient[..., :3], 6)
    queries = torch.cat(
        [
            torch.stack([coarse[b, picked_coarse[b]] for b in range(2)]),
            torch.stack([sharp[b, picked_sharp[b]] for b in range(2)]),
        ],
        dim=1,
    )  # [coarse ; sharp]
    latents = official_cross_block(official, "encoder.cross_attn.", queries, coarse) + official_cross_block(
        official, "encoder.cross_attn1.", queries, sharp
    )
    for i in range(2):
        latents = official_self_block(official, f"encoder.self_attn.resblocks.{i}.", latents)
    mean = linear(layer_norm(latents, "encoder.ln_post"), "pre_kl")[..., :64]
    tokens = linear(mean, "post_kl")
    for i in range(2):
        tokens = official_self_block(official, f"transformer.resblocks.{i}.", tokens)
    hidden = official_cross_block(
        official, "decoder.cross_attn_decoder.", linear(fourier(query_points), "decoder.query_proj"), tokens
    )
    raw = linear(layer_norm(hidden, "decoder.ln_post"), "decoder.output_proj")[..., 0]

    with torch.no_grad():
        ours = model.encode({"uniform": uniform, "salient": salient}, num_tokens=12, sample_posterior=False)
        ours_raw = model.decode_at_points(ours, query_points, output="raw")
    order = interleave_order(6, 6)  # ours interleaves the streams; the set is the same
    torch.testing.assert_close(ours, mean[:, order], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_raw, raw, atol=1e-4, rtol=1e-4)

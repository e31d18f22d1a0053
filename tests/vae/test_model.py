"""DoraVAE behaviour on tiny configs: shapes, set semantics, prefixes, round trip, streams, warnings."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from dora_shapegen.vae import DecodedLatents, DoraVAE
from dora_shapegen.vae.attention import FourierEmbedder
from dora_shapegen.vae.fps import farthest_point_indices
from dora_shapegen.vae.modeling_dora_vae import interleave_order

TINY = dict(
    width=32,
    heads=2,
    num_encoder_layers=1,
    num_decoder_layers=2,
    latent_channels=8,
    default_num_tokens=32,
    max_train_tokens=32,
    n_uniform=400,
    n_salient=200,
)


@dataclasses.dataclass
class StandInPointCloud:
    """Same fields as data.sampling.PointCloud (the model duck-types its input)."""

    uniform_points: np.ndarray
    uniform_normals: np.ndarray
    salient_points: np.ndarray
    salient_normals: np.ndarray
    epsilon: float | None = None


def make_point_cloud(
    n_uniform: int = 400, n_salient: int = 200, seed: int = 0, epsilon: float | None = 2 / 256
):
    rng = np.random.default_rng(seed)

    def sphere(count: int) -> tuple[np.ndarray, np.ndarray]:
        normals = rng.normal(size=(count, 3)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        return (0.6 * normals).astype(np.float32), normals

    (up, un), (sp, sn) = sphere(n_uniform), sphere(n_salient)
    fields = dict(
        uniform_points=up, uniform_normals=un, salient_points=sp, salient_normals=sn, epsilon=epsilon
    )
    try:
        from dora_shapegen.data.sampling import PointCloud

        return PointCloud(**fields)
    except (ImportError, TypeError):
        return StandInPointCloud(**fields)


def make_model(**overrides) -> DoraVAE:
    torch.manual_seed(0)
    return DoraVAE(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def model() -> DoraVAE:
    return make_model()


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return torch.rand(50, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_fourier_layout_matches_dora():
    embedder = FourierEmbedder(num_freqs=8, include_pi=False)
    point = torch.tensor([[0.3, -0.2, 0.7]])
    out = embedder(point)[0]
    assert out.shape == (51,) and embedder.output_dim(3) == 51
    freqs = 2.0 ** torch.arange(8)
    arguments = torch.cat([point[0, 0] * freqs, point[0, 1] * freqs, point[0, 2] * freqs])  # coordinate-major
    torch.testing.assert_close(out[:3], point[0])
    torch.testing.assert_close(out[3:27], arguments.sin())
    torch.testing.assert_close(out[27:], arguments.cos())


@pytest.mark.parametrize("num_tokens", [1, 7, 32, 64])
def test_encode_decode_shapes(model, queries, num_tokens):
    with torch.no_grad():
        latents = model.encode(make_point_cloud(), num_tokens=num_tokens)
        assert latents.shape == (1, num_tokens, 8)
        batch = model.encode([make_point_cloud(seed=1), make_point_cloud(seed=2)], num_tokens=num_tokens)
        assert batch.shape == (2, num_tokens, 8)
        decoded = model.decode(batch)
        assert (
            isinstance(decoded, DecodedLatents)
            and decoded.batch_size == 2
            and decoded.device == latents.device
        )
        assert decoded.tokens.shape == (2, num_tokens, 32)
        values = decoded(queries)
    assert values.shape == (2, 50) and values.min() >= 0 and values.max() <= 1
    assert decoded.field(1)(queries).shape == (50,)
    assert model.decode_at_points(batch, queries[None].expand(2, -1, -1), output="raw").shape == (2, 50)


def test_dict_input_and_unequal_point_counts(model):
    clouds = [make_point_cloud(seed=3), make_point_cloud(n_uniform=300, n_salient=150, seed=4)]
    with torch.no_grad():
        mixed = model.encode(clouds, num_tokens=16)
        alone = model.encode(clouds[1], num_tokens=16)
        as_dict = model.encode(
            {"uniform": torch.randn(3, 100, 6), "salient": torch.randn(3, 40, 6)}, num_tokens=20
        )
    assert mixed.shape == (2, 16, 8)
    torch.testing.assert_close(mixed[1:], alone)
    assert as_dict.shape == (3, 20, 8)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="uniform"):
        model.encode({"uniform": torch.randn(1, 10, 5), "salient": torch.randn(1, 10, 6)})
    with pytest.raises(ValueError, match="salient"):
        model.encode({"uniform": torch.randn(1, 10, 6)}, num_tokens=4)
    with pytest.raises(ValueError, match="NaN"):
        model.encode({"uniform": torch.full((1, 10, 6), float("nan")), "salient": torch.randn(1, 10, 6)})
    with pytest.raises(ValueError, match="query_points"):
        model.decode_at_points(torch.zeros(1, 4, 8), torch.zeros(5, 2))


def test_latent_set_is_permutation_invariant(model, queries):
    with torch.no_grad():
        latents = model.encode(make_point_cloud(), num_tokens=32)
        permutation = torch.randperm(32, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(permutation, torch.arange(32))
        reference = model.decode_at_points(latents, queries, output="raw")
        shuffled = model.decode_at_points(latents[:, permutation], queries, output="raw")
    torch.testing.assert_close(shuffled, reference, atol=1e-5, rtol=1e-5)


def test_prefix_decoding_and_token_order(model, queries):
    with torch.no_grad():
        latents = model.encode(make_point_cloud(), num_tokens=32)
        for k in (1, 5, 16):
            values = model.decode(latents[:, :k])(queries)
            assert values.shape == (1, 50) and torch.isfinite(values).all()
    # Proportional interleave: every prefix holds about the same salient share, each stream in FPS order.
    order = interleave_order(24, 8)
    assert sorted(order.tolist()) == list(range(32))
    salient = order >= 24
    for k in range(1, 33):
        assert abs(int(salient[:k].sum()) - k * 8 / 32) <= 1
    assert order[~salient].tolist() == list(range(24)) and order[salient].tolist() == list(range(24, 32))
    assert model.token_split(32) == (16, 16) and model.token_split(7) == (4, 3)


def test_fps_is_exact_ordered_and_backends_agree():
    points = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(0))
    picked = farthest_point_indices(points, 20, backend="fpsample")
    torch.testing.assert_close(picked, farthest_point_indices(points, 20, backend="torch"))
    cloud = points[0]
    distance = ((cloud - cloud[0]) ** 2).sum(-1)
    expected = [0]
    for _ in range(19):  # naive FPS from index 0
        expected.append(int(distance.argmax()))
        distance = torch.minimum(distance, ((cloud - cloud[expected[-1]]) ** 2).sum(-1))
    assert picked[0].tolist() == expected
    with pytest.raises(ValueError, match="301"):
        farthest_point_indices(points, 301)


def test_more_tokens_than_training_maximum(model):
    with torch.no_grad():
        latents = model.encode(make_point_cloud(), num_tokens=4 * model.config.max_train_tokens)
    assert latents.shape == (1, 128, 8) and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="salient"):
        model.encode(make_point_cloud(), num_tokens=420)  # 210 salient tokens from 200 salient points


def test_deterministic_encode_and_sampled_posterior(model):
    cloud = make_point_cloud()
    with torch.no_grad():
        first, second = model.encode(cloud, num_tokens=16), model.encode(cloud, num_tokens=16)
        posterior = model.encode_posterior(cloud, num_tokens=16)
        sample_a = model.encode(cloud, 16, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        sample_b = model.encode(cloud, 16, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        sample_c = model.encode(cloud, 16, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second) and torch.equal(first, posterior.mean)
    assert posterior.logvar.min() >= -30 and posterior.logvar.max() <= 20
    assert torch.equal(sample_a, sample_b) and not torch.equal(sample_a, sample_c)
    assert not torch.allclose(sample_a, first)


def test_save_load_round_trip(model, queries, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and list(tmp_path.glob("*.safetensors"))
    loaded = DoraVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.epsilon == model.config.epsilon and loaded.config.n_salient == 200
    cloud = make_point_cloud()
    with torch.no_grad():
        latents = model.encode(cloud, num_tokens=24)
        assert torch.equal(loaded.encode(cloud, num_tokens=24), latents)
        assert torch.equal(
            loaded.decode_at_points(latents, queries), model.decode_at_points(latents, queries)
        )


def test_chunked_decoding_matches_single_chunk(model, queries):
    with torch.no_grad():
        latents = model.encode(make_point_cloud(), num_tokens=16)
        small = model.decode_at_points(latents, queries, output="raw", chunk_size=7)
        whole = model.decode_at_points(latents, queries, output="raw", chunk_size=1000)
    torch.testing.assert_close(small, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("output_type", ["tsdf", "occupancy"])
def test_occupancy_mapping(output_type, queries):
    model = make_model(output_type=output_type)
    with torch.no_grad():
        latents = model.encode(make_point_cloud(), num_tokens=8)
        raw = model.decode_at_points(latents, queries, output="raw")
        occupancy = model.decode_at_points(latents, queries)
    expected = raw.sigmoid() if output_type == "occupancy" else ((raw + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(occupancy, expected)


def test_uniform_only_baseline():
    model = make_model(use_salient=False)
    assert not any("salient" in name for name in model.state_dict())
    assert model.token_split(10) == (10, 0)
    cloud = make_point_cloud(seed=5)
    other = dataclasses.replace(cloud, salient_points=cloud.salient_points[::-1] * 0.5)  # must not matter
    with torch.no_grad():
        latents = model.encode(cloud, num_tokens=300)  # more than the salient stream has
        assert torch.equal(latents, model.encode(other, num_tokens=300))
        assert model.encode({"uniform": torch.randn(2, 50, 6)}, num_tokens=10).shape == (2, 10, 8)
    assert latents.shape == (1, 300, 8)


def test_dual_model_uses_salient_stream(model):
    cloud = make_point_cloud(seed=6)
    other = dataclasses.replace(cloud, salient_points=cloud.salient_points * 0.5)
    with torch.no_grad():
        assert not torch.allclose(model.encode(cloud, num_tokens=16), model.encode(other, num_tokens=16))


def test_epsilon_mismatch_warns(model):
    with pytest.warns(UserWarning, match=r"trained at epsilon=0\.0078125.*holes"):
        model.encode(make_point_cloud(epsilon=1 / 256), num_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(make_point_cloud(epsilon=2 / 256), num_tokens=4)
        model.encode(make_point_cloud(epsilon=None), num_tokens=4)


def test_training_forward_and_gradient_checkpointing():
    plain = make_model()
    checkpointed = make_model(gradient_checkpointing=True)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    uniform, salient = torch.randn(2, 60, 6), torch.randn(2, 30, 6)
    query_points = torch.rand(2, 40, 3) * 2 - 1
    losses = []
    for vae in (plain, checkpointed):
        vae.train()
        out = vae(
            uniform=uniform,
            salient=salient,
            query_points=query_points,
            num_tokens=16,
            sample_posterior=True,
            generator=torch.Generator().manual_seed(0),
        )
        assert out["raw"].shape == (2, 40) and out["kl"].shape == (2,) and out["latents"].shape == (2, 16, 8)
        assert (out["kl"] >= 0).all()
        loss = out["raw"].pow(2).mean() + 1e-3 * out["kl"].mean()
        loss.backward()
        assert vae.salient_proj.weight.grad.abs().sum() > 0
        assert vae.cross_attn_salient.attn.to_k.weight.grad.abs().sum() > 0
        losses.append((loss.detach(), vae.uniform_proj.weight.grad.clone()))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    torch.testing.assert_close(losses[0][1], losses[1][1], atol=1e-6, rtol=1e-4)


def test_latent_noise_perturbs_the_decoded_code_relative_to_its_spread():
    vae = make_model().train()
    uniform, salient = torch.randn(4, 60, 6), torch.randn(4, 30, 6)
    query_points = torch.rand(4, 40, 3) * 2 - 1
    kwargs = dict(
        uniform=uniform, salient=salient, query_points=query_points, num_tokens=16, sample_posterior=False
    )
    with torch.no_grad():
        clean = vae(**kwargs)
        noisy = vae(**kwargs, latent_noise=0.5, generator=torch.Generator().manual_seed(0))
        again = vae(**kwargs, latent_noise=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy["raw"], again["raw"])  # seeded: resume-exact
    assert not torch.allclose(noisy["raw"], clean["raw"])
    torch.testing.assert_close(noisy["mean"], clean["latents"])  # the encoder's code is untouched
    spread = clean["latents"].flatten(0, 1).std(0)  # (C,)
    ratio = (noisy["latents"] - clean["latents"]).flatten(0, 1).std(0) / spread  # (C,)
    assert ratio.mean().item() == pytest.approx(0.5, rel=0.15)


def test_latent_noise_per_code_levels():
    """A (B,) level gives each code its own noise: a code at level 0 decodes exactly as without noise. The training
    config's "half_normal" draws those levels (RAE's noise-augmented decoder); "fixed" keeps one float."""
    from dora_shapegen.vae.train import TrainingConfig, noise_levels

    vae = make_model().train()
    uniform, salient = torch.randn(3, 60, 6), torch.randn(3, 30, 6)
    kwargs = dict(
        uniform=uniform,
        salient=salient,
        query_points=torch.rand(3, 40, 3) * 2 - 1,
        num_tokens=16,
        sample_posterior=False,
    )
    levels = torch.tensor([0.0, 0.3, 0.6])
    with torch.no_grad():
        clean = vae(**kwargs)
        noisy = vae(**kwargs, latent_noise=levels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy["raw"][0], clean["raw"][0])
    change = (noisy["latents"] - clean["latents"]).flatten(1).std(1)  # (B,)
    assert change[0] == 0 and 0 < change[1] < change[2]

    fixed = TrainingConfig(latent_noise=0.25)
    assert noise_levels(fixed, 3) == 0.25
    drawn = noise_levels(
        TrainingConfig(latent_noise=0.25, latent_noise_sampling="half_normal"),
        4096,
        torch.Generator().manual_seed(0),
    )
    assert drawn.shape == (4096,) and (drawn >= 0).all()
    assert drawn.mean().item() == pytest.approx(0.25 * (2 / np.pi) ** 0.5, rel=0.05)  # E|N(0,1)| = sqrt(2/pi)
    with pytest.raises(ValueError, match="latent_noise_sampling"):
        noise_levels(TrainingConfig(latent_noise=0.25, latent_noise_sampling="uniform"), 3)


def test_item_field_queries_only_its_own_shape(model, queries):
    latents = model.encode([make_point_cloud(seed=0), make_point_cloud(seed=1)], num_tokens=32)  # (2, 32, C)
    decoded = model.decode(latents)
    both = decoded(queries)  # (2, M)
    for index in range(2):
        torch.testing.assert_close(decoded.field(index)(queries), both[index])
    assert not torch.allclose(both[0], both[1])  # the two items are different shapes


def test_extra_query_layers_keep_set_semantics(queries, tmp_path):
    """num_query_layers > 1 (queries cross-attend to the tokens again): still order-free, saved and reloaded."""
    deep = make_model(num_query_layers=3, qk_norm=True)
    assert len(deep.extra_query_blocks) == 2 and "cross_attn_decoder.attn.to_q.weight" in deep.state_dict()
    with torch.no_grad():
        latents = deep.encode(make_point_cloud(), num_tokens=32)
        permutation = torch.randperm(32, generator=torch.Generator().manual_seed(2))
        reference = deep.decode_at_points(latents, queries, output="raw")
        torch.testing.assert_close(
            deep.decode_at_points(latents[:, permutation], queries, output="raw"),
            reference,
            atol=1e-5,
            rtol=1e-5,
        )
    deep.save_pretrained(tmp_path)
    loaded = DoraVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.num_query_layers == 3
    with torch.no_grad():
        # Same weights, same function; not bit-equal on every CPU (a reloaded tensor's memory alignment can pick
        # another SIMD kernel with another summation order).
        torch.testing.assert_close(
            loaded.decode_at_points(latents, queries, output="raw"), reference, atol=1e-6, rtol=1e-6
        )
    with pytest.raises(ValueError, match="num_query_layers"):
        DoraVAE(**{**TINY, "num_query_layers": 0})


def test_local_attention_is_order_free_and_trains_anchors(queries, tmp_path):
    """local_attention: distance-aware cross-attention with positions read from token content. The latent set
    must stay unordered (no index leaks in), the anchor term must come out of forward, and it must round-trip."""
    local = make_model(local_attention=True, qk_norm=True)
    assert local.cross_attn_decoder.attn.log_locality.shape == (local.config.heads,)
    cloud = make_point_cloud()
    with torch.no_grad():
        latents = local.encode(cloud, num_tokens=32)
        permutation = torch.randperm(32, generator=torch.Generator().manual_seed(3))
        reference = local.decode_at_points(latents, queries, output="raw")
        torch.testing.assert_close(
            local.decode_at_points(latents[:, permutation], queries, output="raw"),
            reference,
            atol=1e-5,
            rtol=1e-5,
        )
        assert local.decode(latents[:, :5])(queries).shape == (1, 50)  # prefixes still decode
    uniform = torch.as_tensor(np.concatenate([cloud.uniform_points, cloud.uniform_normals], 1))[None]
    salient = torch.as_tensor(np.concatenate([cloud.salient_points, cloud.salient_normals], 1))[None]
    out = local.train()(uniform=uniform, salient=salient, query_points=queries[None], num_tokens=16)
    assert out["anchor_loss"].shape == (1,) and torch.isfinite(out["anchor_loss"]).all()
    (out["raw"].mean() + out["anchor_loss"].mean()).backward()
    assert (
        local.anchor_head.weight.grad is not None
        and local.cross_attn_uniform.attn.log_locality.grad is not None
    )
    local.eval().save_pretrained(tmp_path)
    loaded = DoraVAE.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_at_points(latents, queries, output="raw"), reference)
    assert "anchor_loss" not in make_model()(
        uniform=uniform, salient=salient, query_points=queries[None], num_tokens=16
    )
    with pytest.raises(ValueError, match="locality_sigmas"):
        make_model(local_attention=True, locality_sigmas=[0.1])


def test_local_attention_in_the_encoder_only(queries, tmp_path):
    """local_decoder=False: the encoder's cross-attentions are local (they take the FPS points' positions), the
    query decoder is the plain one, so decoding needs no predicted anchors and forward has no anchor term."""
    from dora_shapegen.vae.attention import CrossAttentionBlock
    from dora_shapegen.vae.local_attention import LocalCrossAttentionBlock

    model = make_model(local_attention=True, local_decoder=False, qk_norm=True)
    assert isinstance(model.cross_attn_uniform, LocalCrossAttentionBlock)
    assert type(model.cross_attn_decoder) is CrossAttentionBlock and model.anchor_head is None
    cloud = make_point_cloud()
    uniform = torch.as_tensor(np.concatenate([cloud.uniform_points, cloud.uniform_normals], 1))[None]
    salient = torch.as_tensor(np.concatenate([cloud.salient_points, cloud.salient_normals], 1))[None]
    out = model.train()(uniform=uniform, salient=salient, query_points=queries[None], num_tokens=16)
    assert "anchor_loss" not in out
    out["raw"].mean().backward()
    assert model.cross_attn_uniform.attn.log_locality.grad is not None
    with torch.no_grad():
        latents = model.eval().encode(cloud, num_tokens=32)
        # The encoder is the full local model's (same seed, same parameters up to the decoder): the same code.
        full_local = make_model(local_attention=True, qk_norm=True)
        torch.testing.assert_close(latents, full_local.encode(cloud, num_tokens=32))
        reference = model.decode_at_points(latents, queries, output="raw")
    model.save_pretrained(tmp_path)
    loaded = DoraVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.local_decoder is False and loaded.anchor_head is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_at_points(latents, queries, output="raw"), reference)


def test_local_attention_reports_moving_least_squares_distance():
    """Keys on the plane z = 0 with normals +z: each head's IMLS distance feature is the query's height over its
    length sigma, and the offset's z part likewise (the attended point lies on the plane)."""
    from dora_shapegen.vae.local_attention import GEOMETRY_FEATURES, LocalMultiHeadAttention

    attention = LocalMultiHeadAttention(width=8, heads=2, locality_sigmas=[0.1, 0.2])
    with torch.no_grad():
        for layer in (attention.to_q, attention.to_k, attention.to_v, attention.to_out):
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
        attention.geometry_proj.weight.zero_()
        attention.geometry_proj.bias.zero_()
        # Output channel 0/1: head 0/1 distance; channel 2: head 0 offset z.
        attention.geometry_proj.weight[0, 6] = attention.geometry_proj.weight[1, GEOMETRY_FEATURES + 6] = 1.0
        attention.geometry_proj.weight[2, 2] = 1.0
    grid = torch.stack(
        torch.meshgrid(torch.linspace(-1, 1, 21), torch.linspace(-1, 1, 21), indexing="ij"), -1
    )
    keys = torch.cat([grid.reshape(-1, 2), torch.zeros(441, 1)], dim=1)[None]  # (1, 441, 3) on z = 0
    normals = torch.zeros_like(keys)
    normals[..., 2] = 1.0
    heights = torch.tensor([-0.3, -0.05, 0.02, 0.25])
    queries = torch.stack([torch.full((4,), 0.1), torch.full((4,), -0.2), heights], dim=1)[None]  # (1, 4, 3)
    with torch.no_grad():
        out = attention(torch.zeros(1, 4, 8), torch.zeros(1, 441, 8), queries, keys, normals)  # (1, 4, 8)
    torch.testing.assert_close(out[0, :, 0], heights / 0.1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0, :, 1], heights / 0.2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0, :, 2], heights / 0.1, atol=1e-4, rtol=1e-4)


def test_qk_norm_scale_sharpens_the_initial_attention(queries, tmp_path):
    """qk_norm_scale s starts every query / key RMSNorm at sqrt(s): the normalised queries and keys have RMS
    sqrt(s), so each attention logit starts s times what it would be, and the weights stay trainable."""
    plain, scaled = make_model(qk_norm=True), make_model(qk_norm=True, qk_norm_scale=4.0)
    names = [
        name for name, _ in scaled.named_parameters() if name.endswith(("norm_q.weight", "norm_k.weight"))
    ]
    assert len(names) >= 2 * (3 + TINY["num_encoder_layers"] + TINY["num_decoder_layers"])  # every attention
    for name, parameter in scaled.named_parameters():
        if name in names:
            torch.testing.assert_close(parameter, torch.full_like(parameter, 2.0))
            assert parameter.requires_grad
    tokens = torch.randn(1, 16, TINY["width"])
    attention_plain, attention_scaled = plain.decoder_blocks[0].attn, scaled.decoder_blocks[0].attn
    attention_scaled.load_state_dict(
        {
            **attention_plain.state_dict(),
            **{key: value for key, value in attention_scaled.state_dict().items() if "norm" in key},
        }
    )
    query_plain, key_plain, _ = attention_plain._project(tokens, None)
    query_scaled, key_scaled, _ = attention_scaled._project(tokens, None)
    torch.testing.assert_close(
        query_scaled @ key_scaled.transpose(-1, -2), 4 * (query_plain @ key_plain.transpose(-1, -2))
    )
    scaled.save_pretrained(tmp_path)
    loaded = DoraVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm_scale == 4.0
    latents = scaled.encode(make_point_cloud(), num_tokens=16)
    torch.testing.assert_close(
        loaded.decode_at_points(latents, queries), scaled.decode_at_points(latents, queries)
    )
    with pytest.raises(ValueError, match="qk_norm_scale"):
        make_model(qk_norm=True, qk_norm_scale=0.0)

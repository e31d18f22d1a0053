"""Image conditioners: tiny random DINOv2 built from a config (with and without registers), the RenderEncoder
trained with the DiT, the "no image" embedding, and bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from dora_shapegen.data.condition_image import ImageInputError
from dora_shapegen.diffusion.image_encoder import ImageEncoder
from dora_shapegen.diffusion.modeling_render_encoder import RenderEncoder, sincos_position_code


def _images(count: int, size: int = 96) -> list[np.ndarray]:
    """Renders-like inputs: a coloured box of a different size per image on white."""
    images = []
    for index in range(count):
        image = np.full((size, size, 3), 255, np.uint8)
        half = 10 + 8 * index
        image[size // 2 - half : size // 2 + half, size // 2 - 12 : size // 2 + 12] = (
            60 + 40 * index,
            90,
            160,
        )
        images.append(image)
    return images


@pytest.fixture(scope="module")
def dinov2() -> ImageEncoder:
    return ImageEncoder.from_name("tiny-random:dinov2")


def test_dinov2_patch_tokens_feed_cross_attention_and_cls_is_pooled(dinov2):
    embeddings = dinov2.encode(_images(2))
    tokens, mask, pooled = embeddings
    assert tokens.shape == (2, 16, 32)  # 56 px / 14 px patches = 4 x 4
    assert mask.dtype == torch.long and bool((mask == 1).all())
    pixels = dinov2.pixel_values(dinov2.load_images(_images(2)))
    hidden = dinov2.model(pixel_values=pixels).last_hidden_state  # (2, 1 + 16, 32)
    torch.testing.assert_close(tokens, hidden[:, 1:])
    torch.testing.assert_close(pooled, hidden[:, 0])
    assert not torch.allclose(tokens[0], tokens[1])  # different images, different tokens
    assert dinov2.hidden_size == dinov2.pooled_size == 32 and not dinov2.trainable


def test_dinov2_is_frozen_and_stays_in_eval_mode(dinov2):
    assert not any(p.requires_grad for p in dinov2.parameters())
    parent = torch.nn.ModuleDict({"encoder": dinov2})
    parent.train()
    assert not dinov2.model.training


def test_register_tokens_are_dropped(tmp_path):
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56,
        num_register_tokens=3,
    )  # fmt: skip
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "dino_reg")
    encoder = ImageEncoder.from_name(f"dinov2:{tmp_path / 'dino_reg'}", image_size=56)
    tokens, _, pooled = encoder.encode(_images(1))
    hidden = encoder.model(
        pixel_values=encoder.pixel_values(encoder.load_images(_images(1)))
    ).last_hidden_state
    assert hidden.shape[1] == 1 + 3 + 16 and tokens.shape == (1, 16, 32)
    torch.testing.assert_close(tokens, hidden[:, 4:])
    torch.testing.assert_close(pooled, hidden[:, 0])


def test_dinov2_loads_from_a_folder_with_or_without_prefix(dinov2, tmp_path):
    dinov2.model.save_pretrained(tmp_path / "dino")
    for name in (str(tmp_path / "dino"), f"dinov2:{tmp_path / 'dino'}"):
        loaded = ImageEncoder.from_name(name, image_size=56)
        torch.testing.assert_close(
            loaded.encode(_images(1)).hidden_states, dinov2.encode(_images(1)).hidden_states
        )
    assert ImageEncoder.from_name(str(tmp_path / "dino")).image_size == 518  # DINOv2's default input


def test_unknown_or_foreign_encoders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown image encoder 'clip-vit'"):
        ImageEncoder.from_name("clip-vit")
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="is a 'bert' model, not DINOv2"):
        ImageEncoder.from_name(f"dinov2:{tmp_path / 'bert'}")


def test_render_encoder_trains_with_the_dit_and_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = ImageEncoder.from_name(
        "render-cnn", {"image_size": 64, "channels": [16, 32], "hidden_size": 48}
    )
    assert encoder.trainable and encoder.hidden_size == 48
    batch = encoder.load_images(_images(3))  # (3, 64, 64, 3) uint8
    tokens, mask, pooled = encoder(batch)
    assert tokens.shape == (3, 64 // 8 * (64 // 8), 48) and pooled.shape == (3, 48)
    (tokens.square().mean() + pooled.sum()).backward()
    assert all(p.grad is not None for p in encoder.model.parameters())

    encoder.model.save_pretrained(tmp_path / "cnn")
    loaded = ImageEncoder.from_name(f"render-cnn:{tmp_path / 'cnn'}")
    torch.testing.assert_close(
        loaded.encode(_images(3)).hidden_states, encoder.encode(_images(3)).hidden_states
    )


def test_render_encoder_checks_its_input_and_sizes():
    with pytest.raises(ValueError, match="divisible by 16"):
        RenderEncoder(image_size=100, channels=(16, 32, 64))
    model = RenderEncoder(image_size=64, channels=(16, 32))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 32, 32))
    code = sincos_position_code(4, 4, 8)
    assert (
        code.shape == (16, 8) and len({tuple(row.tolist()) for row in code}) == 16
    )  # every position distinct


def test_no_image_is_an_empty_masked_sequence(dinov2):
    tokens, mask, pooled = dinov2.unconditional(3)
    assert tokens.shape == (3, 1, 32) and pooled.shape == (3, 32)
    assert not mask.any() and not tokens.any() and not pooled.any()


def test_bad_images_are_named(dinov2, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageInputError, match="photo.jpg.*unreadable"):
        dinov2.encode([_images(1)[0], tmp_path / "photo.jpg"])
    with pytest.raises(ImageInputError, match="front view: 8x8 px is too small"):
        dinov2.encode([np.zeros((8, 8, 3), np.uint8)], names=["front view"])

"""Text encoders: the packaged MiniLM offline, tiny random CLIP / T5 built from configs, masks, frozen weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from dora_shapegen.diffusion.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    TextEmbeddings,
    TextEncoder,
    resolve_builtin,
)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by tests/conftest.py: nothing may be downloaded
    return TextEncoder.from_name(DEFAULT_TEXT_ENCODER)


@pytest.fixture(scope="module")
def tokenizer():
    # The MiniLM (BERT) tokenizer stands in for any tiny model with the same vocabulary size: nothing to download.
    return AutoTokenizer.from_pretrained(resolve_builtin(DEFAULT_TEXT_ENCODER), local_files_only=True)


def tiny_clip(tokenizer, projection: bool) -> TextEncoder:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=24, intermediate_size=48, projection_dim=12,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return TextEncoder(model, tokenizer, "clip")


def tiny_t5(tokenizer) -> TextEncoder:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=24, d_kv=12, d_ff=48, num_layers=2, num_heads=2,
        is_encoder_decoder=False, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return TextEncoder(T5EncoderModel(config), tokenizer, "t5")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).item()


def test_builtin_minilm_offline_semantics(minilm):
    assert minilm.kind == "sentence-transformers"
    assert minilm.name == DEFAULT_TEXT_ENCODER
    assert minilm.hidden_size == 384 and minilm.pooled_size == 384
    embeddings = minilm.encode(["a chair", "a wooden chair", "a rocket"])
    hidden, mask, pooled = embeddings  # also unpacks like a tuple
    assert hidden.shape[0] == 3 and hidden.shape[2] == 384 and mask.shape == hidden.shape[:2]
    assert mask.dtype == torch.long
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))  # sentence-transformers normalises
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3
    assert cosine(pooled[0], pooled[1]) > cosine(pooled[0], pooled[2]) + 0.1
    # Token embeddings differ too (what cross-attention sees), not only the pooled vector.
    assert (hidden[0, : mask[0].sum()] - hidden[2, : mask[2].sum()]).abs().max() > 1e-3


def test_minilm_mask_and_padding_invariance(minilm):
    alone = minilm.encode(["a chair"])
    batch = minilm.encode(["a chair", "a tall wooden chair with four legs and a back"])
    length = int(alone.attention_mask.sum())
    assert batch.attention_mask[0].tolist() == [1] * length + [0] * (batch.attention_mask.shape[1] - length)
    assert batch.attention_mask[1].sum() > length
    torch.testing.assert_close(batch.hidden_states[0, :length], alone.hidden_states[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-4)


def test_empty_prompt_is_a_consistent_unconditional_embedding(minilm):
    empty = minilm.encode([""])
    assert empty.attention_mask.sum() >= 1  # [CLS] [SEP]: never an all-masked row
    again = minilm.encode(["a rocket", ""])
    torch.testing.assert_close(again.pooled[1], empty.pooled[0], atol=1e-5, rtol=1e-4)
    assert (empty.pooled[0] - again.pooled[0]).abs().max() > 1e-3


def test_frozen_and_eval(minilm):
    assert all(not parameter.requires_grad for parameter in minilm.parameters())
    wrapper = torch.nn.ModuleDict({"text": minilm}).train()  # a parent in training mode must not unfreeze it
    assert not minilm.training and not minilm.model.training
    embeddings = minilm.encode(["a chair"])
    assert not embeddings.hidden_states.requires_grad and not embeddings.pooled.requires_grad
    torch.testing.assert_close(minilm.encode(["a chair"]).pooled, embeddings.pooled)  # no dropout
    del wrapper


@pytest.mark.parametrize("projection", [True, False])
def test_tiny_clip(tokenizer, projection):
    encoder = tiny_clip(tokenizer, projection)
    assert encoder.hidden_size == 24 and encoder.pooled_size == (12 if projection else 24)
    prompts = ["", "a chair", "a wooden chair with arms"]
    embeddings = encoder.encode(prompts)
    assert embeddings.hidden_states.shape[:2] == embeddings.attention_mask.shape
    assert embeddings.pooled.shape == (3, encoder.pooled_size)
    tokens = tokenizer(prompts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        reference = encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    expected = reference.text_embeds if projection else reference.pooler_output
    torch.testing.assert_close(embeddings.pooled, expected)
    assert (embeddings.pooled[1] - embeddings.pooled[2]).abs().max() > 1e-4


def test_tiny_t5_masked_mean(tokenizer):
    encoder = tiny_t5(tokenizer)
    assert encoder.hidden_size == encoder.pooled_size == 24
    embeddings = encoder.encode(["a chair", "a wooden chair with arms", ""])
    for row in range(3):
        length = int(embeddings.attention_mask[row].sum())
        expected = embeddings.hidden_states[row, :length].mean(0)
        torch.testing.assert_close(embeddings.pooled[row], expected)
    alone = encoder.encode(["a chair"])
    torch.testing.assert_close(alone.pooled[0], embeddings.pooled[0], atol=1e-5, rtol=1e-4)
    assert all(not parameter.requires_grad for parameter in encoder.parameters())


@pytest.mark.parametrize("kind", ["clip", "t5", "bert"])
def test_tiny_random_names_are_deterministic(kind):
    first = TextEncoder.from_name(f"tiny-random:{kind}").encode(["a chair", ""])
    second = TextEncoder.from_name(f"tiny-random:{kind}").encode(["a chair", ""])
    assert isinstance(first, TextEmbeddings)
    torch.testing.assert_close(first.hidden_states, second.hidden_states)
    assert torch.isfinite(first.pooled).all()


def test_bad_names_and_prompts(tokenizer):
    with pytest.raises(ValueError, match="unknown built-in"):
        TextEncoder.from_name("builtin:not-a-model")
    with pytest.raises(ValueError, match="unknown kind"):
        TextEncoder(
            CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=99,
                    hidden_size=8,
                    intermediate_size=8,
                    num_hidden_layers=1,
                    num_attention_heads=1,
                )
            ),
            tokenizer,
            "gpt",
        )
    encoder = tiny_t5(tokenizer)
    with pytest.raises(TypeError, match="prompt 1"):
        encoder.encode(["a chair", None])
    with pytest.raises(ValueError, match="empty list"):
        encoder.encode([])

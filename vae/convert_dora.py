"""`dora convert-dora-checkpoint CKPT OUT_DIR`: the released Dora-VAE v1.1 weights as a DoraVAE folder.

The official Lightning checkpoint holds the model under ``state_dict`` with keys prefixed ``shape_model.``
(a flat dict, prefixed or not, is accepted too). Every official tensor is mapped onto our module names; the fused
attention projections are stored interleaved PER HEAD (``c_qkv`` rows are ``h*3*D + s*D + c``, ``c_kv`` rows
``h*2*D + s*D + c``), not stacked as ``[Q; K; V]``, so they are de-interleaved into ``to_q``/``to_k``/``to_v``.
The conversion fails unless every official key is consumed and every parameter of our model is filled.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``. Lightning files can carry
non-tensor objects (hyper-parameter containers); those are replaced by plain dicts without running their code.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import OrderedDict
from pathlib import Path
from pickle import UnpicklingError  # only the exception type: loading is torch.load(weights_only=True)
from typing import Any

import torch
from accelerate import init_empty_weights
from einops import rearrange

from dora_shapegen import cli_types
from dora_shapegen.vae.modeling_dora_vae import DoraVAE

OFFICIAL_PREFIX = "shape_model."

# Official key prefix -> (our prefix, block kind). Order matters only for readability: prefixes end with a dot,
# so "encoder.cross_attn." never matches "encoder.cross_attn1.".
PREFIX_MAP: list[tuple[str, str, str]] = [
    (r"encoder\.input_proj\.", "uniform_proj.", "plain"),
    (r"encoder\.input_proj1\.", "salient_proj.", "plain"),
    (r"encoder\.cross_attn\.", "cross_attn_uniform.", "cross"),
    (r"encoder\.cross_attn1\.", "cross_attn_salient.", "cross"),
    (r"encoder\.self_attn\.resblocks\.(\d+)\.", "encoder_blocks.{}.", "self"),
    (r"encoder\.ln_post\.", "encoder_norm_out.", "plain"),
    (r"pre_kl\.", "pre_kl.", "plain"),
    (r"post_kl\.", "post_kl.", "plain"),
    (r"transformer\.resblocks\.(\d+)\.", "decoder_blocks.{}.", "self"),
    (r"decoder\.query_proj\.", "query_proj.", "plain"),
    (r"decoder\.cross_attn_decoder\.", "cross_attn_decoder.", "cross"),
    (r"decoder\.ln_post\.", "decoder_norm_out.", "plain"),
    (r"decoder\.output_proj\.", "output_proj.", "plain"),
]
# Renames inside a block (the fused c_qkv / c_kv are handled separately).
COMMON_BLOCK_RENAMES = {
    "attn.c_q.": "attn.to_q.",
    "attn.c_proj.": "attn.to_out.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
BLOCK_RENAMES = {
    "self": {**COMMON_BLOCK_RENAMES, "ln_1.": "norm_attn.", "ln_2.": "norm_mlp."},
    "cross": {**COMMON_BLOCK_RENAMES, "ln_1.": "norm_query.", "ln_2.": "norm_context.", "ln_3.": "norm_mlp."},
    "plain": {},
}
FUSED = {
    "attn.c_qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "attn.c_kv.": ("attn.to_k.", "attn.to_v."),
}


class _Placeholder:
    """Stands in for any non-allowlisted class of the checkpoint: constructing it yields a plain dict, so no
    code of the original class runs and the model tensors can still be read. An OrderedDict, because the
    weights-only unpickler lets pickle fill both its items and its attributes (a plain dict takes items only)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:
        return OrderedDict()


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of an official checkpoint, ``shape_model.`` prefix stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError:
        # Lightning extras (e.g. hyper-parameter containers) are not allowlisted: map each to a placeholder
        # and load again, still with weights_only=True.
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_Placeholder, name) for name in unsafe]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict):
        raise ValueError(
            f"{path}: expected a dict (Lightning checkpoint or state dict), got {type(content).__name__}"
        )
    state = content.get("state_dict", content)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    if any(key.startswith(OFFICIAL_PREFIX) for key in state):
        state = {
            key[len(OFFICIAL_PREFIX) :]: value
            for key, value in state.items()
            if key.startswith(OFFICIAL_PREFIX)
        }
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state


def split_per_head(fused: torch.Tensor, heads: int, parts: int) -> list[torch.Tensor]:
    """Undo Dora's per-head interleaving: rows ``h*parts*D + s*D + c`` -> ``parts`` tensors of rows ``h*D + c``."""
    rows = fused.shape[0]
    if rows % (heads * parts):
        raise ValueError(
            f"fused projection with {rows} rows cannot be split into {heads} heads x {parts} parts"
        )
    grouped = rearrange(fused, "(h p d) ... -> p (h d) ...", h=heads, p=parts)  # (parts, H*D, ...)
    return [part.clone() for part in grouped]  # own storage each: safetensors refuses shared tensors


def map_official_key(key: str) -> tuple[str, str, str]:
    """(our block prefix, remainder of the key, block kind) for an official key (prefix stripped)."""
    for pattern, target, kind in PREFIX_MAP:
        match = re.match(pattern, key)
        if match:
            return target.format(*match.groups()), key[match.end() :], kind
    raise KeyError(key)


def convert_state_dict(official: dict[str, torch.Tensor], heads: int = 12) -> dict[str, torch.Tensor]:
    """Our state dict from the official one (float32). Raises when an official key has no place."""
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in official.items():
        tensor = tensor.detach().to(torch.float32)
        try:
            target, rest, kind = map_official_key(key)
        except KeyError:
            unmapped.append(key)
            continue
        fused = next((name for name in FUSED if rest.startswith(name)), None)
        if fused is not None and kind != "plain":
            outputs = FUSED[fused]
            for name, part in zip(outputs, split_per_head(tensor, heads, len(outputs))):
                converted[target + name + rest[len(fused) :]] = part
            continue
        for old, new in BLOCK_RENAMES[kind].items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        converted[target + rest] = tensor
    if unmapped:
        raise ValueError(f"{len(unmapped)} official keys have no place in DoraVAE: {unmapped[:8]}")
    return converted


def infer_config(official: dict[str, torch.Tensor], heads: int = 12, **overrides: Any) -> dict[str, Any]:
    """DoraVAE config matching the tensor shapes (heads cannot be read from shapes: 12 for v1.1)."""

    def count_layers(pattern: str) -> int:
        indices = {int(m.group(1)) for key in official if (m := re.match(pattern, key))}
        return max(indices) + 1 if indices else 0

    try:
        width, point_dim = official["encoder.input_proj.weight"].shape
        query_dim = official["decoder.query_proj.weight"].shape[1]
        latent_channels = official["post_kl.weight"].shape[1]
        mlp_hidden = official["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a Dora-VAE state dict: missing {error}") from None
    config = {
        "width": int(width),
        "heads": heads,
        "num_encoder_layers": count_layers(r"encoder\.self_attn\.resblocks\.(\d+)\."),
        "num_decoder_layers": count_layers(r"transformer\.resblocks\.(\d+)\."),
        "latent_channels": int(latent_channels),
        "mlp_ratio": mlp_hidden / width,
        "num_freqs": (query_dim // 3 - 1) // 2,  # query features are xyz + sin + cos of 3*num_freqs arguments
        "include_pi": False,
        "point_feature_dim": int(point_dim - query_dim),
        "use_salient": "encoder.input_proj1.weight" in official,
        "qkv_bias": any(key.endswith(("c_qkv.bias", "c_q.bias")) for key in official),
        "output_type": "tsdf",
        "default_num_tokens": 2048,  # Dora's inference: 1024 uniform + 1024 sharp FPS points
        "max_train_tokens": 4096,  # training drew up to 2048 per stream
        "n_uniform": 32768,
        "n_salient": 32768,
        # The official Dora-VAE test config reconstructs from a posterior sample (`sample_posterior: true`), so
        # a converted model's encode() samples by default too; encode(..., sample_posterior=False) gives the mean.
        "sample_posterior": True,
    }
    config.update(overrides)
    return config


def build_model(official: dict[str, torch.Tensor], heads: int = 12, **overrides: Any) -> DoraVAE:
    """A DoraVAE holding the official weights; fails unless every official key is used and every one of ours
    is filled with the right shape."""
    # Parameters on the meta device: the official tensors are assigned, not copied over a random init
    # (saves one model's worth of memory and the init time at 192M parameters).
    with init_empty_weights():
        model = DoraVAE(**infer_config(official, heads=heads, **overrides))
    converted = convert_state_dict(official, heads=heads)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(converted))
    extra = sorted(set(converted) - set(ours))
    if missing or extra:
        raise ValueError(
            f"key mismatch after conversion: ours not filled {missing[:8]}, unexpected {extra[:8]}"
        )
    wrong = [
        f"{k}: {tuple(converted[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if converted[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"shape mismatch after conversion: {wrong[:8]}")
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def convert_checkpoint(
    checkpoint: str | Path, out_dir: str | Path | None = None, heads: int = 12, **overrides: Any
) -> DoraVAE:
    """Load, map, check, and (when ``out_dir`` is given) ``save_pretrained`` the converted DoraVAE."""
    official = load_official_state_dict(checkpoint)
    non_float32 = sorted({str(t.dtype) for t in official.values() if t.dtype != torch.float32})
    if non_float32:
        print(f"note: casting {', '.join(non_float32)} tensors to float32", file=sys.stderr)
    model = build_model(official, heads=heads, **overrides)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dora convert-dora-checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="official dora_vae_1_1.ckpt (Lightning checkpoint or plain state dict)"
    )
    parser.add_argument("out_dir", help="output folder for DoraVAE.from_pretrained")
    parser.add_argument(
        "--heads",
        type=cli_types.positive_int,
        default=12,
        help="attention heads (not stored in the weights; 12 for v1.1)",
    )
    parser.add_argument(
        "--epsilon", type=cli_types.EPSILON, default=2 / 256, help="watertight/sampling epsilon to record"
    )
    args = parser.parse_args(argv)
    try:
        model = convert_checkpoint(args.checkpoint, args.out_dir, heads=args.heads, epsilon=args.epsilon)
    except (FileNotFoundError, ValueError, UnpicklingError, RuntimeError) as error:
        print(f"convert-dora-checkpoint: {error}", file=sys.stderr)
        return 1
    count = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out_dir}: DoraVAE with {count:,} parameters, all {len(model.state_dict())} tensors mapped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

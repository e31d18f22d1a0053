"""The pipeline's LoRA loader: diffusers' transformer-only loader mixin, safetensors only.

Kept apart from ``diffusion/finetune.py`` because importing diffusers' LoRA loaders costs seconds, which the
training command should not pay at start-up unless it saves an adapter.
"""

from __future__ import annotations

from typing import Any

from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin


class ShapeDiTLoraLoaderMixin(SanaLoraLoaderMixin):
    """LoRA loading for a pipeline whose one LoRA-able component is ``transformer``.

    diffusers' transformer-only loader is reused as is (the one written for Sana: nothing in it is Sana-specific;
    it hands the state dict to ``transformer.load_lora_adapter`` and provides ``set_adapters``, ``fuse_lora``,
    ``unfuse_lora``, ``disable_lora``, ``delete_adapters``). The one change: only safetensors are read, never the
    pickled ``.bin`` fallback.
    """

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "LoRA weights are read from safetensors only (use_safetensors=False is not supported)"
            )
        kwargs["use_safetensors"] = True  # with it set, diffusers does not fall back to unpickling a .bin
        return super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

"""Load a saved pipeline folder with the class that wrote it: text-to-3D or image(-and-text)-to-3D.

`dora generate`, `dora demo` and `dora bench-generation` take any pipeline folder; its ``model_index.json`` names
the class (``_class_name``), as diffusers' own ``DiffusionPipeline.from_pretrained`` dispatch does. Importing the
pipeline modules also imports the model classes diffusers must find by name (ShapeDiT, DoraVAE, RenderEncoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PIPELINE_CLASSES = {
    "DoraTextTo3DPipeline": "dora_shapegen.pipelines.pipeline_text_to_3d",
    "DoraImageTo3DPipeline": "dora_shapegen.pipelines.pipeline_image_to_3d",
}


def pipeline_class(folder: str | Path) -> Any:
    """The pipeline class a saved folder was written by; a ValueError naming the folder when it is none of ours."""
    import importlib

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{folder} is not a saved pipeline (no model_index.json); make one with `dora assemble-pipeline`"
        )
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{folder}: a {name!r} pipeline; expected one of {sorted(PIPELINE_CLASSES)}")
    return getattr(importlib.import_module(PIPELINE_CLASSES[name]), name)


def load_pipeline(folder: str | Path, device: str | None = None) -> Any:
    """The saved pipeline on ``device`` (default: cuda when available, else cpu)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipeline_class(folder).from_pretrained(str(folder)).to(device)


def is_image_pipeline(pipe: Any) -> bool:
    """Whether the pipeline takes images (``DoraImageTo3DPipeline``: condition image or both)."""
    return "image_encoder" in getattr(pipe, "components", {})


def takes_prompts(pipe: Any) -> bool:
    """Whether the pipeline reads prompts: a text pipeline, or an image pipeline trained with condition both."""
    return not is_image_pipeline(pipe) or pipe.config.condition == "both"

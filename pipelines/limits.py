"""What a generation argument may be: the ranges the pipeline's ``check_inputs``, `dora generate` and the demo
check, and whether a prompt is text. A module without torch, so the command line checks before loading models."""

from __future__ import annotations

from dora_shapegen.cli_types import RESOLUTION_RANGE

# Each mesh is reduced to at most this many faces by default, as Hunyuan3D-2's FaceReducer does (40k faces), so a
# file opens at once in a viewer or a game engine; extraction at 256^3 gives 250k-1M faces (5-18 MB of GLB).
# ``max_faces=None`` (``--faces 0``) keeps the full resolution.
DEFAULT_MAX_FACES = 40_000
MESH_RESOLUTION_RANGE = RESOLUTION_RANGE  # the marching-cubes grid of every `--resolution` (why: cli_types)
MAX_INFERENCE_STEPS = 1000  # the flow-matching scheduler's own timestep count
GUIDANCE_RANGE = (0.0, 100.0)  # <= 1 disables classifier-free guidance; far above ~15 samples break up
# The guidance of a pipeline that stores none (a folder assembled before pipelines stored one, or one built by hand
# without it): the pipelines' call default of that time, so such a pipeline samples as it did.
DEFAULT_GUIDANCE_SCALE = 5.0
MAX_SHAPES = 256  # shapes per `dora generate`: denoised in one batch, meshed in turn
MAX_PROMPT_CHARS = 2000  # the demo's limit: the text encoders read 77-512 tokens, a few hundred words at most


def not_text_problem(text: str) -> str | None:
    """Why ``text`` is not text a tokenizer can read, or None. Python turns command-line bytes that are not valid
    UTF-8 into lone surrogates (U+DC80-U+DCFF, one per byte): those are named with the byte they stand for."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"it is not valid UTF-8 text ({what} at character {error.start}); give the prompt in UTF-8"
    return None

"""Silence the two transformers warnings that every stage loading diffusers' pipeline code printed.

diffusers imports ``CLIPImageProcessor`` and ``SiglipImageProcessor`` at module level (its Flux pipeline, from
which ``diffusion.sampling`` takes ``calculate_shift``, and its IP-adapter loader, pulled in by the LoRA loader
mixins). transformers 5 resolves those names to a torchvision backend and, without torchvision, falls back to
the PIL class with a warning: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
`CLIPImageProcessorPil` ...". Nothing here processes images, so the fallback changes nothing, and a user reads
the warning as something broken.

The filter drops exactly that message (any ``*ImageProcessor`` falling back to its ``*ImageProcessorPil``) on the
one transformers logger that emits it; every other record of that logger, of transformers and of ours passes.
It is installed when ``diffusion`` or ``pipelines`` is imported, before either imports diffusers, and needs no
transformers import itself (the logger is a plain ``logging`` logger transformers later configures).
"""

from __future__ import annotations

import logging
import re

TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
_IMAGE_PROCESSOR_FALLBACK = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
)


class _DropImageProcessorFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _IMAGE_PROCESSOR_FALLBACK.search(record.getMessage())


def quiet_foreign_warnings() -> None:
    """Install the filter once (idempotent)."""
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(existing, _DropImageProcessorFallback) for existing in logger.filters):
        logger.addFilter(_DropImageProcessorFallback())

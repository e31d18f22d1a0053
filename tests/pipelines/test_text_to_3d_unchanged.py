"""Text-to-3D stays what it was: the tiny text pipeline's latents for fixed seeds equal those recorded before image
conditioning was added (tests/pipelines/golden/text_to_3d_latents.npz, written by the code of commit 014b7bf).

The tolerance (1e-5) admits last-bit differences between CPUs (vectorised kernels round differently); any change to
the sampler, the conditioning path, the DiT or the scheduler moves these latents by far more. On the machine that
recorded them the match is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.pipelines._tiny_pipeline import make_tiny_pipeline

GOLDEN = Path(__file__).parent / "golden" / "text_to_3d_latents.npz"


def test_text_pipeline_latents_match_the_recorded_ones():
    pipe = make_tiny_pipeline(0)
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    guided = pipe(
        ["a chair with four legs", "a round table"],
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=generators,
        output_type="latent",
    ).latents  # (2, 32, 8)
    plain = pipe(
        "a lamp",
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).latents  # (1, 32, 8)
    recorded = np.load(GOLDEN)
    np.testing.assert_allclose(guided.numpy(), recorded["guided"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(plain.numpy(), recorded["plain"], rtol=0, atol=1e-5)

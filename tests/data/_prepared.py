"""Built-in procedural shapes prepared coarsely, for the tests that train on prepared data (`dora train-vae`, the
multi-node rehearsal): epsilon 1/32 and few points, seconds rather than minutes."""

from __future__ import annotations

from pathlib import Path

COARSE = ["--workers", "1", "--epsilon", "0.03125", "--n-uniform", "512", "--n-salient", "128"]
COARSE += ["--n-volume", "512", "--n-near", "512", "--n-sharp", "256"]


def prepare_builtin(root: Path, count: int) -> str:
    """`dora prepare --builtin COUNT --out ROOT` with the coarse settings; ROOT as a string."""
    from dora_shapegen.data.prepare import main as prepare

    assert prepare(["--builtin", str(count), "--out", str(root), *COARSE]) == 0
    return str(root)

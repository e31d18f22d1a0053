"""`dora` errors a user can fix print as one line and a non-zero exit code; `--debug` / DORA_DEBUG=1 bring back
the traceback; a bug keeps it always."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dora_shapegen.data.latent_shards import (
    CorruptShardError,
    LatentShardWriter,
    LatentSums,
    build_manifest,
    to_storage,
    write_manifest,
)
from dora_shapegen.errors import ConfigError, DoraError
from dora_shapegen.pipelines.apps.cli import main as dora

PROJECT_ROOT = Path(__file__).resolve().parents[3]
TINY_DIT = PROJECT_ROOT / "configs" / "dit" / "tiny.yaml"


def one_error_line(stderr: str) -> str:
    """The only line of ``stderr``, which must be an ``error:`` line (no traceback, no log around it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.fixture()
def typo_config(tmp_path) -> Path:
    path = tmp_path / "typo.yaml"
    path.write_text(TINY_DIT.read_text().replace("  learning_rate:", "  learnin_rate:"))
    return path


def train_dit(config: Path, tmp_path: Path, shards: Path | None = None, *extra: str) -> list[str]:
    return ["train-dit", "--config", str(config), "--shards", str(shards or tmp_path / "none"),
            "--output-dir", str(tmp_path / "run"), *extra]  # fmt: skip


def test_config_key_typo_is_one_line(typo_config, tmp_path, capsys):
    assert dora(train_dit(typo_config, tmp_path)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(typo_config) in line and "'learnin_rate'" in line and "did you mean 'learning_rate'" in line


def test_broken_yaml_is_one_line_with_its_position(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  width: [32, 64\n  heads: 2\n")
    assert dora(train_dit(broken, tmp_path)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(broken) in line and "not valid YAML" in line and "line 3" in line


def test_corrupt_shard_is_one_line_naming_it(tmp_path, capsys):
    shards = tmp_path / "latents"
    with LatentShardWriter(shards, max_samples=2) as writer:
        for index in range(4):
            latents = np.random.default_rng(index).normal(size=(1, 32, 64))
            meta = {"shape_id": f"s{index}", "captions": ["a chair"], "dtype": "fp32", "num_tokens": 32}
            writer.write(f"s{index}", to_storage(latents, "fp32"), ["a chair"], "synthetic", meta)
    sums = LatentSums()
    for record in writer.records:
        sums = sums.merge(record.sums)
    write_manifest(
        shards, build_manifest(writer.records, sums, num_tokens=32, latent_channels=64, dtype="fp32")
    )
    damaged = shards / writer.records[1].name
    damaged.write_bytes(damaged.read_bytes()[:1500])  # cut inside the first sample
    assert dora(train_dit(TINY_DIT, tmp_path, shards)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "latent shard" in line and damaged.name in line


def test_debug_flag_and_environment_keep_the_traceback(typo_config, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="learnin_rate"):
        dora(train_dit(typo_config, tmp_path, None, "--debug"))
    monkeypatch.setenv("DORA_DEBUG", "1")
    with pytest.raises(ConfigError, match="learnin_rate"):
        dora(train_dit(typo_config, tmp_path))


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only errors the user can act on are shortened: an unexpected exception is a bug and propagates."""
    import dora_shapegen.data.procedural

    def broken(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(dora_shapegen.data.procedural, "main", broken)
    with pytest.raises(ZeroDivisionError):
        dora(["build-dataset", "--out", "nowhere"])
    assert issubclass(ConfigError, ValueError) and issubclass(CorruptShardError, DoraError)


def test_console_entry_prints_one_line_and_exits_1(typo_config, tmp_path):
    """As a user runs it: a fresh interpreter, the exit status and the whole of stderr."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    environment.pop("DORA_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dora_shapegen.pipelines.apps.cli", *train_dit(typo_config, tmp_path)],
        cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert "did you mean 'learning_rate'" in one_error_line(done.stderr)


# Every numeric option of every command, with a value outside its meaningful range: refused before any work, by
# argparse's usage line and a message that says the range.
NONSENSE = [
    ("build-dataset", "--num-shapes", "0", "an integer >= 1"),
    ("build-dataset", "--seed", "-1", "an integer in [0, 18446744073709551615]"),
    ("build-dataset", "--captions-per-shape", "5", "an integer in [1, 4]"),
    ("prepare", "--builtin", "-3", "an integer >= 1"),
    ("prepare", "--workers", "0", "an integer >= 1"),
    ("prepare", "--seed", "1.5", "an integer in [0, 18446744073709551615]"),
    ("prepare", "--epsilon", "nan", "a number in (0, 0.25]"),
    ("prepare", "--epsilon", "0", "a number in (0, 0.25]"),
    ("prepare", "--n-uniform", "0", "an integer >= 1"),
    ("prepare", "--n-salient", "-1", "an integer >= 1"),
    ("prepare", "--n-volume", "0", "an integer >= 1"),
    ("prepare", "--n-near", "0", "an integer >= 1"),
    ("prepare", "--n-sharp", "0", "an integer >= 1"),
    ("prepare", "--sharp-angle-deg", "270", "a number in (0, 180)"),
    ("prepare", "--num-shards", "0", "an integer >= 1"),
    ("prepare", "--shard-index", "-1", "an integer >= 0"),
    ("prepare", "--limit", "0", "an integer >= 1"),
    ("prepare", "--ray-max-retries", "-1", "an integer >= 0"),
    ("render-views", "--views", "0", "an integer >= 1"),
    ("render-views", "--size", "8", "an integer in [32, 2048]"),
    ("render-views", "--seed", "-1", "an integer in [0, 18446744073709551615]"),
    ("render-views", "--workers", "0", "an integer >= 1"),
    ("render-views", "--limit", "0", "an integer >= 1"),
    ("train-vae", "--max-steps", "0", "an integer >= 1"),
    ("train-vae", "--max-minutes", "-5", "a number > 0"),
    ("train-dit", "--max-minutes", "inf", "a number > 0"),
    ("train-dit", "--seed", "-2", "an integer in [0, 18446744073709551615]"),
    ("bench", "--tokens", "0", "an integer >= 1"),
    ("bench", "--resolution", "3", "an integer in [16, 1024]"),
    ("bench", "--limit", "0", "an integer >= 1"),
    ("bench", "--seed", "-1", "an integer in [0, 18446744073709551615]"),
    ("bench", "--num-workers", "0", "an integer >= 1"),
    ("convert-dora-checkpoint", "--heads", "0", "an integer >= 1"),
    ("convert-dora-checkpoint", "--epsilon", "-1", "a number in (0, 0.25]"),
    ("cache-latents", "--num-tokens", "0", "an integer >= 1"),
    ("cache-latents", "--num-views", "0", "an integer >= 1"),
    ("cache-latents", "--batch-size", "0", "an integer >= 1"),
    ("cache-latents", "--max-samples", "0", "an integer >= 1"),
    ("cache-latents", "--max-bytes", "-1", "an integer >= 1"),
    ("cache-latents", "--seed", "-1", "an integer in [0, 18446744073709551615]"),
    ("cache-latents", "--num-workers", "-1", "an integer >= 0"),
    ("cache-latents", "--n-uniform", "0", "an integer >= 1"),
    ("cache-latents", "--n-salient", "0", "an integer >= 1"),
    ("cache-latents", "--limit", "0", "an integer >= 1"),
    ("assemble-pipeline", "--scheduler-shift", "0", "a number > 0"),
    ("assemble-pipeline", "--max-tokens", "0", "an integer >= 1"),
    ("assemble-pipeline", "--num-tokens", "-8", "an integer >= 1"),
    ("assemble-pipeline", "--guidance-scale", "200", "a number in [0, 100]"),
    ("sample-codes", "--variants", "0", "an integer >= 1"),
    ("sample-codes", "--steps", "0", "an integer >= 1"),
    ("sample-codes", "--seed", "-1", "an integer in [0, 18446744073709551615]"),
    ("generate", "--guidance", "nan", "a number in [0, 100]"),
    ("generate", "--resolution", "3", "an integer in [16, 1024]"),
    ("bench-generation", "--held-out-fraction", "1.5", "a number in (0, 1)"),
    ("bench-generation", "--prompts-per-category", "0", "an integer >= 1"),
    ("bench-generation", "--samples-per-prompt", "0", "an integer >= 1"),
    ("bench-generation", "--steps", "0", "an integer in [1, 1000]"),
    ("bench-generation", "--guidance", "nan", "a number in [0, 100]"),
    ("bench-generation", "--guidance-interval", "0.2 1.5", "a number in [0, 1]"),
    ("bench-generation", "--threshold", "0", "a number in (0, 1)"),
    ("bench-generation", "--tokens", "0", "an integer >= 1"),
    ("bench-generation", "--seed", "-1", "an integer in [0, 18446744073709551615]"),
    ("bench-generation", "--resolution", "3", "an integer in [16, 1024]"),
    ("bench-generation", "--batch-size", "0", "an integer >= 1"),
    ("bench-generation", "--points", "0", "an integer >= 1"),
    ("bench-generation", "--emd-points", "-1", "an integer >= 0"),
    ("bench-generation", "--judge-k", "0", "an integer >= 1"),
    ("quickstart", "--vae-minutes", "0", "a number > 0"),
    ("quickstart", "--dit-minutes", "nan", "a number > 0"),
    ("quickstart", "--num-shapes", "0", "an integer >= 1"),
    ("quickstart", "--budget", "0", "a number > 0"),
    ("demo", "--port", "70000", "an integer in [1, 65535]"),
    ("demo", "--resolution", "3", "an integer in [16, 1024]"),
    ("demo", "--max-queue", "0", "an integer in [1, 1000]"),
]


@pytest.mark.parametrize(("command", "option", "value", "expected"), NONSENSE, ids=lambda x: str(x))
def test_numeric_options_are_checked_against_their_range(command, option, value, expected, capsys):
    with pytest.raises(SystemExit) as stopped:
        code = dora([command, option, *value.split()])
        raise SystemExit(code)  # `dora generate` returns argparse's code instead of exiting
    assert stopped.value.code == 2
    assert f"argument {option}: must be {expected}, got" in capsys.readouterr().err

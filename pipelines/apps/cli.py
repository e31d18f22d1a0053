"""The `dora` command: one subcommand per stage.

Each subcommand lives with its stage and exposes ``main(argv: list[str] | None) -> int`` with its own argparse
parser; this file only dispatches, importing the stage lazily so `dora --help` stays fast and a stage's heavy
imports are paid only when it runs.

Errors the user can fix from the message alone (``dora_shapegen.errors.DoraError``: a config key typo, a broken
YAML file, a corrupt shard or sample, a damaged checkpoint, a full disk; and missing files) print as one line,
``error: <message>``, with exit code 1. ``dora --debug <command>`` or ``DORA_DEBUG=1`` shows their traceback;
any other exception is a bug and always keeps it.
"""

from __future__ import annotations

import importlib
import os
import sys

from dora_shapegen.errors import debug_from_environment, run_reporting_errors  # light: no torch
from dora_shapegen.runtime import omp_wait_policy_environment  # light: no torch

# Before any stage loads torch (and with it OpenMP): idle OpenMP workers sleep instead of spinning when other work
# shares the cores, and spin (faster) when the cores are free; see dora_shapegen.runtime.omp_wait_policy_environment. Set
# OMP_WAIT_POLICY to override.
os.environ.update(omp_wait_policy_environment())

# name -> (module, help). The data flow is data -> vae -> (cache) -> diffusion -> pipelines.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-dataset": (
        "dora_shapegen.data.procedural",
        "write the built-in procedural dataset (meshes + captions index)",
    ),
    "prepare": (
        "dora_shapegen.data.prepare",
        "meshes -> watertight -> surface/sharp samples + occupancy/TSDF supervision",
    ),
    "render-views": (
        "dora_shapegen.data.render_views",
        "shaded renders of every prepared shape from random views (image-conditioning data)",
    ),
    "convert-prepared": (
        "dora_shapegen.data.prepare_convert",
        "rewrite prepared samples as uncompressed (fast) or compressed npz",
    ),
    "train-vae": (
        "dora_shapegen.vae.train",
        "train the Dora VAE with accelerate (progressive token schedule)",
    ),
    "bench": (
        "dora_shapegen.vae.bench.run",
        "Dora-bench: reconstruction metrics by complexity level, latent quality, token scaling",
    ),
    "convert-dora-checkpoint": (
        "dora_shapegen.vae.convert_dora",
        "convert the released Dora-VAE v1.1 checkpoint",
    ),
    "cache-latents": (
        "dora_shapegen.vae.cache_latents",
        "encode a prepared dataset into WebDataset latent shards",
    ),
    "train-dit": (
        "dora_shapegen.diffusion.train",
        "train the DiT (text, image or both conditioned) on cached latent shards",
    ),
    "assemble-pipeline": (
        "dora_shapegen.pipelines.assemble",
        "assemble VAE + DiT + text encoder into a diffusers pipeline",
    ),
    "sample-codes": (
        "dora_shapegen.pipelines.sample_codes",
        "the codes a pipeline's DiT makes from each training shape, for a decoder fine-tune (train-vae --codes)",
    ),
    "generate": ("dora_shapegen.pipelines.generate", "text -> mesh file(s) + preview PNG"),
    "bench-generation": (
        "dora_shapegen.pipelines.bench.run",
        "judge generated shapes: 1-NNA/COV/MMD, text following, structure",
    ),
    "quickstart": (
        "dora_shapegen.pipelines.apps.quickstart",
        "the whole chain on the built-in dataset, offline, on a CPU",
    ),
    "demo": ("dora_shapegen.pipelines.apps.demo", "Gradio web demo"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: dora <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `dora <command> --help` for the options of one command."]
    lines += ["--debug (anywhere, or DORA_DEBUG=1): full tracebacks instead of one-line errors."]
    return "\n".join(lines)


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere before a ``--`` separator (removed from the arguments), or ``DORA_DEBUG=1``."""
    end = argv.index("--") if "--" in argv else len(argv)
    flag = "--debug" in argv[:end]
    rest = [arg for index, arg in enumerate(argv) if not (index < end and arg == "--debug")]
    return flag or debug_from_environment(), rest


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dora: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # Denormal floats slow the CPU several-fold (local attention's distance terms make many of them); flushing
    # them is process-wide state, so it is set here, where every `dora` command starts, not inside a model.
    from dora_shapegen.runtime import flush_denormals

    flush_denormals()
    return run_reporting_errors(lambda: module.main(rest), debug)


if __name__ == "__main__":
    sys.exit(main())

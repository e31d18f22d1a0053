"""`dora quickstart`: the whole chain on the built-in procedural dataset, offline, on a CPU, in one command.

Stages (each one is the same `dora <command>` a user would run by hand, with its YAML in configs/quickstart/):

    1 build-dataset   procedural meshes + captions            OUT/dataset/index.jsonl
    2 prepare         watertight + points + supervision        OUT/prepared/
    3 train-vae       small Dora VAE                           OUT/vae/final/
    4 bench           brief Dora-bench of that VAE             OUT/bench/results.md
    5 cache-latents   frozen VAE -> WebDataset shards          OUT/latents/manifest.json
    6 train-dit       small text-conditioned DiT               OUT/dit/final/
    7 assemble        diffusers pipeline                       OUT/pipeline/
      with ``refine: {enabled: true}`` in quickstart.yaml (off in the shipped one), three more:
      sample-codes    the DiT's own codes of the training shapes OUT/codes/
      refine-decoder  decoder fine-tuned on them (encoder frozen) OUT/vae_refined/final/
      assemble-refined  the pipeline again, with that decoder  OUT/pipeline/
    8 generate        meshes for a few prompts + PNG grid      OUT/samples/  and  OUT/report.md
    9 bench-generation  1-NNA/COV/MMD, text following, structure  OUT/bench_generation/results.md

Each stage runs in its own process (exactly the command shown in the log, so it can be rerun or scaled up alone)
and leaves a marker in OUT/.stages/ when it finishes: running the quickstart again skips finished stages and
resumes an interrupted training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_shapegen import cli_types
from dora_shapegen.config import CONFIG_DIR, from_dict, load_yaml, resolve_config_path, save_yaml
from dora_shapegen.pipelines.apps.quickstart_report import read_json

QUICKSTART_CONFIGS = CONFIG_DIR / "quickstart"


@dataclass
class DatasetStage:
    num_shapes: int = 168
    seed: int = 0


@dataclass
class PrepareStage:
    workers: int = 2


@dataclass
class TrainStage:
    # The budget is the stage YAML's training.max_steps, so a busy machine gives the same run, only later. This is
    # a safety cap on wall-clock time (None = none): the training warns loudly when it cuts a run.
    max_minutes: float | None = None


@dataclass
class RefineStage:
    # The decoder fine-tune on the DiT's own codes (sample-codes, then train-vae with vae_refine.yaml, then the
    # pipeline assembled again with the refined VAE). Off for a config folder that does not ask for it.
    enabled: bool = False
    max_minutes: float | None = None  # safety cap of the fine-tune, as TrainStage's


@dataclass
class BenchStage:
    limit: int = 6
    tokens: list[int] = field(default_factory=lambda: [256, 512, 1024])
    resolution: int = 64


@dataclass
class GenerateStage:
    prompts: list[str] = field(default_factory=list)
    steps: int = 25
    # None: the pipeline's default_guidance_scale (assembled from dit.yaml's sampling.guidance_scale).
    guidance: float | None = None
    resolution: int = 96
    seed: int = 0


@dataclass(frozen=True)
class Calibration:
    """What the ETA printed up front scales: the shipped recipe's stage times on one free 2-core machine, measured
    with ``measure_training_rate`` read on that machine at the same time. The ETA multiplies each training's seconds
    by its configured steps over the calibrated ones, and everything by the calibrated rate over this machine's rate
    now. An ETA, not a promise: each training's progress bar has the real one.

    Measured on 2026-12-07 (main at 5cef97f) on a free 2-core machine reading 5.6 passes/s (147-186 GFLOP/s fp32
    matmul in the same minute): `dora quickstart --budget 4` trained the VAE's 2080 steps in 2306 s and the DiT's
    2480 in 2062 s; every other stage took 219 s (prepare 60 s, Dora-bench 47 s, bench-generation 66 s). At 1x that
    is ~22 min; the same machine's `make quickstart` of the shipped recipe took 24 min 9 s earlier that day, when it
    read slower. The decoder refinement's stages were measured there too (sample-codes 103 s + assemble-refined 6 s,
    300 refine-decoder steps 133 s, scaled by that day's VAE speed against this one's: x0.95)."""

    training_rate: float = 5.6  # block passes/s (measure_training_rate); 0 = no ETA, the budgets only
    other_stages_seconds: float = 219.0  # every stage but the trainings
    vae_seconds: float = 2306.0
    vae_steps: int = 2080
    dit_seconds: float = 2062.0
    dit_steps: int = 2480
    codes_seconds: float = 103.0  # sample-codes (codes_variants codes per shape) + assemble-refined
    codes_variants: int = 3
    refine_seconds: float = 126.0  # refine-decoder at refine_steps
    refine_steps: int = 300


CALIBRATION = Calibration()
# Keys of quickstart.yaml that held the calibration before it moved here: still accepted (and ignored) so that a
# copied config folder keeps working.
_FORMER_CALIBRATION_KEYS = ("calibration", "vae.calibrated_seconds", "dit.calibrated_seconds")


@dataclass
class QuickstartConfig:
    dataset: DatasetStage = field(default_factory=DatasetStage)
    prepare: PrepareStage = field(default_factory=PrepareStage)
    vae: TrainStage = field(default_factory=TrainStage)
    bench: BenchStage = field(default_factory=BenchStage)
    dit: TrainStage = field(default_factory=TrainStage)
    refine: RefineStage = field(default_factory=RefineStage)
    generate: GenerateStage = field(default_factory=GenerateStage)


def _stage_yaml(config_dir: Path, name: str) -> Path:
    path = config_dir / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"quickstart stage config missing: {path}")
    return path


def load_quickstart_config(config_dir: Path) -> QuickstartConfig:
    """The orchestration knobs live in quickstart.yaml; each stage's own settings in its stage YAML."""
    values = load_yaml(_stage_yaml(config_dir, "quickstart"))
    for dotted in _FORMER_CALIBRATION_KEYS:
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.pop(leaf, None) is not None:
            print(
                f"quickstart.yaml: '{dotted}' is ignored (the ETA's calibration is in {__name__})",
                file=sys.stderr,
            )
    return from_dict(QuickstartConfig, values, "quickstart.yaml")


# Keys of the training stages' YAMLs that count optimizer steps: a budget multiplier scales all of them, so a longer
# run is the same recipe stretched (warmup, cosine decay, token-length ramp, validation and checkpoint spacing).
STEP_KEYS = (
    ("training", "max_steps"),
    ("training", "warmup_steps"),
    ("training", "checkpoint_every"),
    ("validation", "every_steps"),
    ("sampling", "every_steps"),
)


def scale_stage_config(values: dict[str, Any], budget: float) -> dict[str, Any]:
    """A training stage's YAML values with every step count times ``budget`` (rounded, at least 1 where it was);
    the EMA keeps averaging the same share of the run (``1 - decay`` divided by the budget)."""
    if not budget > 0:
        raise ValueError(f"budget must be a positive multiplier, got {budget}")
    scaled = json.loads(json.dumps(values))  # a deep copy of plain YAML data

    def times(value: Any) -> Any:
        return value if not value else max(1, round(value * budget))

    for section, key in STEP_KEYS:
        if key in scaled.get(section, {}) and scaled[section][key] is not None:
            scaled[section][key] = times(int(scaled[section][key]))
    schedule = scaled.get("schedule") or {}
    if schedule.get("mixture") and "ramp_steps" in schedule["mixture"]:
        schedule["mixture"]["ramp_steps"] = times(int(schedule["mixture"]["ramp_steps"]))
    for phase in schedule.get("phases") or []:
        if phase.get("until_step") is not None:
            phase["until_step"] = times(int(phase["until_step"]))
    training = scaled.get("training", {})
    if training.get("use_ema") and "ema_decay" in training:
        training["ema_decay"] = 1.0 - (1.0 - float(training["ema_decay"])) / budget
    return scaled


class Quickstart:
    def __init__(
        self,
        out_dir: Path,
        config_dir: Path,
        overrides: dict[str, float] | None = None,
        budget: float = 1.0,
    ) -> None:
        self.out = out_dir
        self.config_dir = config_dir
        self.budget = float(budget)
        self.config = load_quickstart_config(config_dir)
        for key, value in (overrides or {}).items():
            section, name = key.split(".")
            setattr(getattr(self.config, section), name, value)
        self.marker_dir = out_dir / ".stages"
        self.log_path = out_dir / "quickstart.log"
        self.stage_times: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ plumbing
    def _done_marker(self, stage: str) -> Path:
        return self.marker_dir / f"{stage}.json"

    def _is_done(self, stage: str) -> bool:
        return self._done_marker(stage).exists()

    def _mark_done(self, stage: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "seconds": round(seconds, 1), **(info or {})}
        tmp = self._done_marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self._done_marker(stage))

    def _log(self, message: str) -> None:
        print(message, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(message + "\n")

    def _dora(self, *args: str) -> None:
        """Run one `dora` subcommand in a child process; its progress bars go straight to the terminal."""
        command = [sys.executable, "-m", "dora_shapegen.pipelines.apps.cli", *args]
        self._log("  $ dora " + " ".join(shlex.quote(a) for a in args))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise RuntimeError(
                f"stage command failed with exit code {result.returncode}: dora {' '.join(args)}\n"
                f"Fix the cause and run the quickstart again: finished stages are kept and skipped."
            )

    def _run_stage(self, index: int, total: int, stage: str, action) -> None:
        header = f"[{index}/{total}] {stage}"
        if self._is_done(stage):
            record = json.loads(self._done_marker(stage).read_text())
            self.stage_times[stage] = record.get("seconds", 0.0)
            self._log(f"{header}: already done ({record.get('seconds', '?')} s), skipped")
            return
        self._log(f"{header} ...")
        start = time.perf_counter()
        info = action() or {}
        seconds = time.perf_counter() - start
        self.stage_times[stage] = seconds
        self._mark_done(stage, seconds, info)
        self._log(f"{header}: done in {seconds:.0f} s")

    # ------------------------------------------------------------------------------------------ stages
    def build_dataset(self) -> dict[str, Any]:
        cfg = self.config.dataset
        self._dora(
            "build-dataset",
            "--out",
            str(self.out / "dataset"),
            "--num-shapes",
            str(cfg.num_shapes),
            "--seed",
            str(cfg.seed),
        )
        return {"num_shapes": cfg.num_shapes}

    def prepare(self) -> dict[str, Any]:
        self._dora(
            "prepare",
            str(self.out / "dataset" / "index.jsonl"),
            "--out",
            str(self.out / "prepared"),
            "--config",
            str(_stage_yaml(self.config_dir, "prepare")),
            "--workers",
            str(self.config.prepare.workers),
        )
        summary = self.out / "prepared" / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else {}

    def training_config(self, config_name: str) -> Path:
        """The training stage's YAML; with a budget other than 1, a copy with every step count scaled, written to
        OUT/configs/ (the command in the log names it, so the stage can be rerun by hand)."""
        path = _stage_yaml(self.config_dir, config_name)
        if self.budget == 1.0:
            return path
        scaled = self.out / "configs" / f"{config_name}_budget{self.budget:g}.yaml"
        save_yaml(scale_stage_config(load_yaml(path), self.budget), scaled)
        return scaled

    def _train(
        self, command: str, config_name: str, run_dir: Path, minutes: float | None, *extra: str
    ) -> None:
        args = [
            command,
            "--config",
            str(self.training_config(config_name)),
            "--output-dir",
            str(run_dir),
            *(["--max-minutes", str(minutes)] if minutes else []),
            *extra,
        ]
        # An interrupted training resumes from its last checkpoint instead of starting over.
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            args += ["--resume", "latest"]
        self._dora(*args)

    def train_vae(self) -> dict[str, Any]:
        self._train(
            "train-vae",
            "vae",
            self.out / "vae",
            self.config.vae.max_minutes,
            "--data",
            str(self.out / "prepared"),
        )
        return read_json(self.out / "vae" / "final" / "metrics.json")

    def bench(self) -> dict[str, Any]:
        cfg = self.config.bench
        self._dora(
            "bench",
            "--vae",
            str(self.out / "vae" / "final"),
            "--names",
            "quickstart-vae",
            "--meshes",
            str(self.out / "dataset" / "index.jsonl"),
            "--out",
            str(self.out / "bench"),
            "--config",
            str(_stage_yaml(self.config_dir, "bench")),
            "--limit",
            str(cfg.limit),
            "--resolution",
            str(cfg.resolution),
            "--tokens",
            *[str(t) for t in cfg.tokens],
        )
        return {}

    def cache_latents(self) -> dict[str, Any]:
        self._dora(
            "cache-latents",
            "--vae",
            str(self.out / "vae" / "final"),
            "--data",
            str(self.out / "prepared"),
            "--out",
            str(self.out / "latents"),
            "--config",
            str(_stage_yaml(self.config_dir, "cache")),
        )
        manifest = read_json(self.out / "latents" / "manifest.json")
        return {key: manifest.get(key) for key in ("num_samples", "num_tokens", "latent_channels", "dtype")}

    def train_dit(self) -> dict[str, Any]:
        self._train(
            "train-dit",
            "dit",
            self.out / "dit",
            self.config.dit.max_minutes,
            "--shards",
            str(self.out / "latents"),
            "--vae",
            str(self.out / "vae" / "final"),
        )
        return {}

    def assemble(self, vae: str = "vae") -> dict[str, Any]:
        self._dora(
            "assemble-pipeline",
            "--vae",
            str(self.out / vae / "final"),
            "--transformer",
            str(self.out / "dit" / "final"),
            "--manifest",
            str(self.out / "latents" / "manifest.json"),
            "--out",
            str(self.out / "pipeline"),
        )
        return {}

    def sample_codes(self) -> dict[str, Any]:
        self._dora(
            "sample-codes",
            "--pipeline",
            str(self.out / "pipeline"),
            "--shards",
            str(self.out / "latents"),
            "--out",
            str(self.out / "codes"),
            "--config",
            str(_stage_yaml(self.config_dir, "sample_codes")),
        )
        info = read_json(self.out / "codes" / "codes.json")
        return {key: info.get(key) for key in ("num_codes", "num_shapes", "distance_by_sigma")}

    def refine_decoder(self) -> dict[str, Any]:
        self._train(
            "train-vae",
            "vae_refine",
            self.out / "vae_refined",
            self.config.refine.max_minutes,
            "--data",
            str(self.out / "prepared"),
            "--init-from",
            str(self.out / "vae" / "final"),
            "--codes",
            str(self.out / "codes"),
        )
        return read_json(self.out / "vae_refined" / "final" / "metrics.json")

    def generate(self) -> dict[str, Any]:
        # In-process: one pipeline load serves every prompt (a `dora generate` per prompt would reload it).
        from dora_shapegen.pipelines.apps.quickstart_report import generate_samples

        return generate_samples(self.out / "pipeline", self.out / "samples", self.config.generate)

    def bench_generation(self) -> dict[str, Any]:
        self._dora(
            "bench-generation",
            "--pipeline",
            str(self.out / "pipeline"),
            "--out",
            str(self.out / "bench_generation"),
            "--reference",
            str(self.out / "prepared"),
            "--config",
            str(_stage_yaml(self.config_dir, "bench_generation")),
        )
        results = read_json(self.out / "bench_generation" / "results.json")
        return {
            name: {key: figures["overall"].get(key) for key in ("text_accuracy_pct", "1-NNA-CD")}
            for name, figures in results.get("sets", {}).items()
        }

    def eta_message(self) -> str:
        """Step budgets and the expected time, from the calibration scaled by this machine's training rate now."""
        steps = {
            name: scale_stage_config(load_yaml(_stage_yaml(self.config_dir, name)), self.budget)["training"][
                "max_steps"
            ]
            for name in ("vae", "dit") + (("vae_refine",) if self.config.refine.enabled else ())
        }
        budget = f"budgets: VAE {steps['vae']} steps, DiT {steps['dit']} steps"
        if self.budget != 1.0:
            budget += f" (--budget {self.budget:g}: every training step count x{self.budget:g})"
        calibration = CALIBRATION
        # Each training's seconds scale with its steps (the budget's included); the other stages do not.
        seconds = (
            calibration.other_stages_seconds
            + calibration.vae_seconds * steps["vae"] / calibration.vae_steps
            + calibration.dit_seconds * steps["dit"] / calibration.dit_steps
        )
        if self.config.refine.enabled:  # the codes cost by their count, the fine-tune by its steps
            variants = int(load_yaml(_stage_yaml(self.config_dir, "sample_codes")).get("variants", 1))
            seconds += calibration.codes_seconds * variants / max(calibration.codes_variants, 1)
            seconds += calibration.refine_seconds * steps["vae_refine"] / calibration.refine_steps
            budget += f", decoder refinement {steps['vae_refine']} steps"
        if calibration.training_rate <= 0 or seconds <= 0:
            return budget
        rate = measure_training_rate()
        expected = seconds * calibration.training_rate / rate
        return (
            f"{budget}; ~{seconds / 60:.0f} min on the calibration's free 2-core machine ({calibration.training_rate:.1f} "
            f"block passes/s); this machine does {rate:.1f} now: ETA ~{expected / 60:.0f} min (later on a busy "
            f"machine, with the same steps and results)"
        )

    def run(self, stop_after: str | None = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        stages = [
            ("build-dataset", self.build_dataset),
            ("prepare", self.prepare),
            ("train-vae", self.train_vae),
            ("bench", self.bench),
            ("cache-latents", self.cache_latents),
            ("train-dit", self.train_dit),
            ("assemble-pipeline", self.assemble),
            *(
                [
                    ("sample-codes", self.sample_codes),
                    ("refine-decoder", self.refine_decoder),
                    ("assemble-refined", lambda: self.assemble("vae_refined")),
                ]
                if self.config.refine.enabled
                else []
            ),
            ("generate", self.generate),
            ("bench-generation", self.bench_generation),
        ]
        start = time.perf_counter()
        self._log(f"dora quickstart -> {self.out} (configs: {self.config_dir})")
        self._log(self.eta_message())
        for index, (name, action) in enumerate(stages, start=1):
            self._run_stage(index, len(stages), name, action)
            if name == stop_after:
                break
        from dora_shapegen.pipelines.apps.quickstart_report import write_report

        report = write_report(self.out, self.stage_times)
        self._log(f"quickstart finished in {time.perf_counter() - start:.0f} s this run; report: {report}")
        return report


def measure_training_rate(repeats: int = 5) -> float:
    """This machine's speed right now at the work the trainings do (about a second): forward and backward passes
    of two transformer blocks of the quickstart models' size (width 128, 4 heads, MLP 512, SDPA) over a (8, 512,
    128) batch, in passes per second (the median pass).

    Not the fp32 matmul rate the ETA used before: a CPU with half the matmul rate trained the quickstart only ~1.3x
    slower, not 2x (small-width models spend much of a step outside the large matrix products), so the ETA read
    36 minutes for a 24-minute run."""
    import torch

    generator = torch.Generator().manual_seed(0)
    blocks = torch.nn.Sequential(
        *(
            torch.nn.TransformerEncoderLayer(
                128, 4, 512, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(2)
        )
    )
    tokens = torch.randn(8, 512, 128, generator=generator)  # (B, N, C)
    seconds = []
    for index in range(repeats + 1):  # the first pass warms up
        started = time.perf_counter()
        blocks(tokens).square().mean().backward()
        if index:
            seconds.append(time.perf_counter() - started)
    return 1.0 / statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dora quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/quickstart", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--configs",
        default=str(QUICKSTART_CONFIGS),
        help="folder of the stage YAMLs; one of the shipped configs can be named as configs/... "
        "(default: the shipped configs/quickstart)",
    )
    parser.add_argument(
        "--vae-minutes",
        type=cli_types.positive_float,
        default=None,
        help="wall-clock safety cap of the VAE training (its budget is steps, in vae.yaml)",
    )
    parser.add_argument(
        "--dit-minutes",
        type=cli_types.positive_float,
        default=None,
        help="wall-clock safety cap of the DiT training (its budget is steps, in dit.yaml)",
    )
    parser.add_argument(
        "--budget",
        type=cli_types.positive_float,
        default=1.0,
        help="multiply every training step count (steps, warmup, decay, ramps) by this: 2 = twice the steps, "
        "the same recipe; the ETA says what it costs (default: %(default)s)",
    )
    parser.add_argument(
        "--num-shapes", type=cli_types.positive_int, default=None, help="override the dataset size"
    )
    parser.add_argument("--stop-after", default=None, help="stop after this stage (e.g. train-vae)")
    args = parser.parse_args(argv)
    if not (args.budget > 0 and args.budget < float("inf")):
        parser.error(f"--budget must be a positive number, got {args.budget}")
    overrides: dict[str, float] = {}
    if args.vae_minutes is not None:
        overrides["vae.max_minutes"] = args.vae_minutes
    if args.dit_minutes is not None:
        overrides["dit.max_minutes"] = args.dit_minutes
    if args.num_shapes is not None:
        overrides["dataset.num_shapes"] = args.num_shapes
    try:
        configs = resolve_config_path(args.configs)
        Quickstart(Path(args.out), configs, overrides, args.budget).run(stop_after=args.stop_after)
    except (RuntimeError, FileNotFoundError) as error:
        print(f"dora quickstart: {error}", file=sys.stderr)
        return 1
    return 0

"""Benchmark: Dora's ablation of salient (sharp-edge) sampling with dual cross-attention, with today's CPU VAE.

Matched runs: every variant trains from ``configs/vae/small.yaml`` or ``configs/vae/small_uniform_only.yaml`` with
the SAME step budget, token schedule, data, batch and seeds (runs are budgeted in steps, never minutes, so a
loaded machine changes the wall time and not the result). Then one ``dora bench`` per evaluation set scores all of
them together on the same ground truth: the geometric sharp-edge errors (sharp Chamfer-L1, sharp normal angle), the
rendered Sharp Normal Error, Chamfer-L1, F-scores and volume IoU, at the training token count.

    python tests/benchmarks/bench_ses_ablation.py --data runs/ses_ablation/prepared \
        --index runs/ses_ablation/builtin/index.jsonl --out runs/ses_ablation/study --steps 300 --seeds 0 1 2

Evaluation sets: ``heldout`` = shapes of the training set's own held-out split (shape-id hash, as
``dora train-vae`` validates) with at least ``--min-sharp-edges`` sharp edges, up to ``--heldout-shapes`` of them,
spread over the categories; ``real`` = ``../shared/meshes`` (skipped when absent). Diagnostic variants (token split,
salient point count, sharp supervision weight) come from ``VARIANTS`` and are run with ``--variants``.

Prints a table (mean +- standard deviation over seeds, and [min, max]) and a JSON object (``--json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]

from dora_shapegen.config import load_yaml  # noqa: E402

SALIENT, UNIFORM = "vae/small.yaml", "vae/small_uniform_only.yaml"
# name -> (base config, dotted overrides). The first two are the ablation; the rest probe why one side wins.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "salient+dual": (SALIENT, {}),
    "uniform-only": (UNIFORM, {}),
    # Token split: a quarter of the tokens from the salient stream instead of half.
    "salient-frac0.25": (SALIENT, {"model.salient_token_fraction": 0.25}),
    # Salient point count: 256 instead of 1024 sharp-edge points per shape (denser uniform context per token).
    "salient-pts256": (SALIENT, {"data.n_salient": 256, "model.n_salient": 256}),
    # Sharp supervision weight: Dora's emphasis (sharp-near points 4x the per-point weight, ~29% of the loss)
    # instead of small.yaml's per-point weighting, for both sides (the supervision is the same for both).
    "salient+sharpw4": (SALIENT, {"training.sharp_weight": 0.364}),
    "uniform+sharpw4": (UNIFORM, {"training.sharp_weight": 0.364}),
}
METRICS = [  # (key, header, display factor, lower is better)
    ("sharp_chamfer_l1", "sharp CD-L1 x1e3", 1e3, True),
    ("sharp_normal_error_deg", "sharp NE deg", 1.0, True),
    ("rendered_sharp_normal_error_deg", "rendered SNE deg", 1.0, True),
    ("chamfer_l1", "CD-L1 x1e3", 1e3, True),
    ("f_score@0.01", "F@0.01", 1.0, False),
    ("f_score@0.02", "F@0.02", 1.0, False),
    ("volume_iou", "IoU field", 1.0, False),
]


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        values = values.setdefault(key, {})
    values[leaf] = value


def run_config(variant: str, steps: int, out: Path) -> Path:
    """The variant's training YAML, scaled to ``steps``: the token-mixture ramp keeps its share of the run
    (540 of 720 steps), mid-run validation is skipped and the final one is held-out IoU at 512 tokens only."""
    base, overrides = VARIANTS[variant]
    values = load_yaml(base)
    ramp = values.get("schedule", {}).get("mixture", {}).get("ramp_steps")
    common = {
        "training.max_steps": steps,
        "training.checkpoint_every": 0,
        "validation.every_steps": steps + 1,
        "validation.final_token_counts": [512],
        "validation.mesh_token_counts": [],
        "validation.mesh_shapes": 0,
    }
    if ramp:
        common["schedule.mixture.ramp_steps"] = max(1, round(ramp * steps / values["training"]["max_steps"]))
    for dotted, value in {**common, **overrides}.items():
        set_dotted(values, dotted, value)
    path = out / "configs" / f"{variant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def train_all(jobs: list[tuple[str, int]], args: argparse.Namespace) -> dict[str, float]:
    """Train every (variant, seed) not yet finished, ``--parallel`` at a time with one thread each; seconds per run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    pending = [
        (v, s) for v, s in jobs if not (args.out / "runs" / f"{v}-s{s}" / "final" / "config.json").is_file()
    ]
    running: list[tuple[str, subprocess.Popen, float]] = []
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            variant, seed = pending.pop(0)
            name = f"{variant}-s{seed}"
            log = open(args.out / "logs" / f"train-{name}.log", "w")  # noqa: SIM115 - closed with the process
            command = [
                "nice",
                "-n",
                str(args.nice),
                sys.executable,
                "-m",
                "dora_shapegen.vae.train",
                "--config",
                str(run_config(variant, args.steps, args.out)),
                "--data",
                str(args.data),
                "--output-dir",
                str(args.out / "runs" / name),
                "--seed",
                str(seed),
            ]
            running.append(
                (
                    name,
                    subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log),
                    time.perf_counter(),
                )
            )
            print(f"train {name} started", flush=True)
        time.sleep(5)
        for name, process, start in list(running):
            if process.poll() is not None:
                running.remove((name, process, start))
                if process.returncode != 0:
                    raise RuntimeError(f"training {name} failed; see {args.out}/logs/train-{name}.log")
                seconds[name] = time.perf_counter() - start
                print(f"train {name} done in {seconds[name] / 60:.1f} min", flush=True)
    return seconds


def heldout_index(args: argparse.Namespace) -> Path:
    """An index of held-out training-set shapes with sharp edges, round-robin over categories."""
    from dora_shapegen.data.mesh_io import load_mesh
    from dora_shapegen.seeding import is_held_out
    from dora_shapegen.vae.bench.metrics import count_sharp_edges

    fraction = float(load_yaml(SALIENT)["data"]["val_fraction"])
    rows = [json.loads(line) for line in args.index.read_text().splitlines() if line.strip()]
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row["path"] = str((args.index.parent / row["path"]).resolve())
        if is_held_out(row["id"], fraction):
            by_category.setdefault(row.get("category", ""), []).append(row)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < args.heldout_shapes and any(by_category.values()):
        for category in sorted(by_category):
            if by_category[category] and len(chosen) < args.heldout_shapes:
                row = by_category[category].pop(0)
                if count_sharp_edges(load_mesh(row["path"])) >= args.min_sharp_edges:
                    chosen.append(row)
    path = args.out / "heldout_index.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return path


def bench(name: str, meshes: str, runs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One `dora bench` of every run on ``meshes`` (all models share the ground truth); its results.json."""
    out = args.out / f"bench-{name}"
    if not (out / "results.json").is_file():
        config = load_yaml("bench/cpu.yaml")
        config.update(tokens=[args.tokens], resolution=args.resolution)
        config["metrics"].update(surface_points=args.surface_points, volume_points=args.surface_points)
        config["report"]["contact_sheet_shapes"] = 3
        config_path = args.out / "configs" / "bench.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            "nice",
            "-n",
            str(args.nice),
            sys.executable,
            "-m",
            "dora_shapegen.vae.bench",
            "--vae",
            *[str(args.out / "runs" / run / "final") for run in runs],
            "--names",
            *runs,
            "--meshes",
            meshes,
            "--out",
            str(out),
            "--config",
            str(config_path),
            "--no-latent-quality",
        ]
        with open(args.out / "logs" / f"bench-{name}.log", "w") as log:
            subprocess.run(
                command,
                cwd=PROJECT_ROOT,
                check=True,
                stdout=log,
                stderr=log,
                env={**os.environ, "OMP_NUM_THREADS": str(args.parallel * args.threads)},
            )
    return json.loads((out / "results.json").read_text())


def summarise(results: dict[str, Any], variants: list[str], seeds: list[int], tokens: int) -> dict[str, Any]:
    """Per variant and metric: per-seed means over shapes (sharp metrics over shapes with sharp edges), then
    mean, standard deviation and range over seeds; plus the per-shape win rate of the first variant over the
    second, pooled over seeds."""
    aggregates, summary = results["aggregates"], {}
    for variant in variants:
        per_metric = {}
        for key, *_ in METRICS:
            values = [aggregates[f"{variant}-s{seed}"][str(tokens)]["overall"].get(key) for seed in seeds]
            values = np.array([v if v is not None else math.nan for v in values], dtype=float)
            per_metric[key] = {
                "seeds": values.tolist(),
                "mean": float(np.nanmean(values)),
                "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.nanmin(values)),
                "max": float(np.nanmax(values)),
            }
        summary[variant] = per_metric
    shapes = [s for s in results["shapes"] if s["status"] == "ok"]
    summary["num_shapes"] = len(shapes)
    summary["num_sharp_shapes"] = sum(s["num_sharp_edges"] > 0 for s in shapes)
    if len(variants) >= 2:
        first, second = variants[:2]
        wins = {}
        for key, _, _, lower in METRICS:
            outcomes = []
            for shape in shapes:
                for seed in seeds:
                    a = shape["results"][f"{first}-s{seed}"][str(tokens)].get(key)
                    b = shape["results"][f"{second}-s{seed}"][str(tokens)].get(key)
                    if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and a != b:
                        outcomes.append((a < b) == lower)
            wins[key] = {
                "first_wins": float(np.mean(outcomes)) if outcomes else math.nan,
                "pairs": len(outcomes),
            }
        summary["per_shape_wins"] = {"first": first, "second": second, "metrics": wins}
    return summary


def table(name: str, summary: dict[str, Any], variants: list[str]) -> str:
    header = ["variant", *[title for _, title, _, _ in METRICS]]
    lines = [
        f"### {name} ({summary['num_shapes']} shapes, {summary['num_sharp_shapes']} with sharp edges)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for variant in variants:
        cells = [variant]
        for key, _, factor, _ in METRICS:
            m = summary[variant][key]
            cells.append(
                f"{m['mean'] * factor:.4g} ± {m['std'] * factor:.2g} "
                f"[{m['min'] * factor:.4g}, {m['max'] * factor:.4g}]"
            )
        lines.append("| " + " | ".join(cells) + " |")
    if "per_shape_wins" in summary:
        wins = summary["per_shape_wins"]
        lines += [
            "",
            f"Per-shape win rate of {wins['first']} over {wins['second']} (shape x seed pairs): "
            + ", ".join(f"{title} {wins['metrics'][key]['first_wins']:.2f}" for key, title, _, _ in METRICS),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared training data (dora prepare)")
    parser.add_argument(
        "--index", type=Path, required=True, help="the index.jsonl the data was prepared from"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", default=["salient+dual", "uniform-only"], choices=list(VARIANTS)
    )
    parser.add_argument("--real-meshes", default=str(PROJECT_ROOT.parent / "shared" / "meshes"))
    parser.add_argument("--heldout-shapes", type=int, default=14)
    parser.add_argument(
        "--min-sharp-edges", type=int, default=10, help="held-out shapes need at least this many"
    )
    parser.add_argument(
        "--tokens", type=int, default=512, help="token count of the evaluation (trained: 256/512)"
    )
    parser.add_argument("--resolution", type=int, default=96, help="marching cubes of the reconstructions")
    parser.add_argument("--surface-points", type=int, default=20000)
    parser.add_argument("--parallel", type=int, default=2, help="trainings at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Seed by seed, so that a run cut short still holds complete matched pairs.
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    train_seconds = train_all(jobs, args)
    runs = [f"{variant}-s{seed}" for variant, seed in jobs]
    held_out_iou = {
        run: json.loads((args.out / "runs" / run / "final" / "metrics.json").read_text()).get("iou@512")
        for run in runs
    }
    sets = {"heldout": str(heldout_index(args))}
    if Path(args.real_meshes).is_dir():
        sets["real"] = args.real_meshes
    report: dict[str, Any] = {
        "steps": args.steps,
        "seeds": args.seeds,
        "variants": args.variants,
        "tokens": args.tokens,
        "resolution": args.resolution,
        "train_seconds": train_seconds,
        "held_out_iou@512": held_out_iou,
        "sets": {},
    }
    for name, meshes in sets.items():
        start = time.perf_counter()
        results = bench(name, meshes, runs, args)
        report["sets"][name] = summarise(results, args.variants, args.seeds, args.tokens)
        report["sets"][name]["bench_seconds"] = time.perf_counter() - start
    report["seconds"] = time.perf_counter() - started
    print(
        f"\nSES ablation: {len(args.seeds)} seeds x {args.steps} steps, {args.tokens} tokens; mean ± std over "
        f"seeds [min, max]; sharp metrics over shapes with sharp edges\n"
    )
    for name in report["sets"]:
        print(table(name, report["sets"][name], args.variants) + "\n")
    iou = {v: [held_out_iou[f"{v}-s{s}"] for s in args.seeds] for v in args.variants}
    print(
        "held-out volume IoU @512 (training split): "
        + "; ".join(
            f"{v} {np.mean([x for x in values if x is not None]):.3f} {values}" for v, values in iou.items()
        )
    )
    document = json.dumps(report, indent=1, default=float)
    print(document)
    if args.json:
        args.json.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())

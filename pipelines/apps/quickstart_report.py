"""The quickstart's last stage (sample meshes + a PNG grid) and its short report of the figures measured on the way."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from dora_shapegen.pipelines.bench.report import scheduler_note
from dora_shapegen.report import format_figure, markdown_table


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "shape"


def read_json(path: Path) -> dict[str, Any]:
    """A results file of an earlier stage, or {} when it is missing or unreadable (the report says "-")."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def generate_samples(pipeline_dir: Path, out_dir: Path, cfg: Any) -> dict[str, Any]:
    """One mesh per prompt of ``cfg.prompts`` (a .glb each), a captioned PNG grid and a JSON index, at
    ``cfg.guidance`` (None: the pipeline's ``default_guidance_scale``)."""
    from dora_shapegen.pipelines.mesh_post import export_mesh, render_grid_png
    from dora_shapegen.pipelines.pipeline_text_to_3d import DoraTextTo3DPipeline

    if not cfg.prompts:
        raise ValueError("configs/quickstart/quickstart.yaml: generate.prompts is empty")
    pipeline = DoraTextTo3DPipeline.from_pretrained(str(pipeline_dir))
    pipeline.set_progress_bar_config(desc="generate", leave=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    output = pipeline(
        prompt=list(cfg.prompts),
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        generator=generator,
        mesh_resolution=cfg.resolution,
    )
    rows, meshes = [], []
    for index, (prompt, mesh) in enumerate(zip(cfg.prompts, output.meshes)):
        path = out_dir / f"{index:02d}-{_slug(prompt)}.glb"
        empty = mesh is None or len(mesh.faces) == 0
        if not empty:
            export_mesh(mesh, path)
        rows.append(
            {
                "prompt": prompt,
                "path": None if empty else path.name,
                "faces": 0 if empty else int(len(mesh.faces)),
                "watertight": False if empty else bool(mesh.is_watertight),
            }
        )
        meshes.append(mesh)
    render_grid_png(meshes, out_dir / "grid.png", titles=list(cfg.prompts), columns=4)
    (out_dir / "samples.json").write_text(json.dumps(rows, indent=2))
    # The guidance the call ran with (cfg.guidance None: the pipeline's stored one), kept in the stage's marker.
    return {
        "num_samples": len(rows),
        "non_empty": sum(1 for r in rows if r["path"]),
        "guidance": pipeline.guidance_scale,
    }


def _format_metrics(metrics: dict[str, Any]) -> str:
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    if not keys:
        return "_not available_\n"
    return (
        "\n".join(markdown_table(["metric", "value"], [[k, format_figure(metrics[k])] for k in keys])) + "\n"
    )


def write_report(out: Path, stage_times: dict[str, float]) -> Path:
    """``OUT/report.md``: timings per stage and the figures each stage measured, with links to its pictures."""
    lines = ["# Quickstart report", ""]
    rows = [[name, format_figure(seconds, spec=".0f")] for name, seconds in stage_times.items()]
    rows.append(["**total**", f"**{format_figure(sum(stage_times.values()), spec='.0f')}**"])
    lines += ["## Stages", "", *markdown_table(["stage", "seconds"], rows), ""]

    prepared = read_json(out / "prepared" / "summary.json")
    if prepared:
        lines += ["## Data", "", "```", json.dumps(prepared, indent=2), "```", ""]

    vae = read_json(out / "vae" / "summary.json")
    if vae:
        lines += [
            "## VAE (held-out reconstruction)",
            "",
            *_cut_warning(vae),
            f"Steps: {vae.get('steps')}; held-out shapes: {vae.get('held_out_shapes')}. "
            "IoU is volume IoU of occupancy on uniform points; Chamfer in the [-1, 1] frame.",
            "",
            _format_metrics(vae.get("final", {})),
            "![VAE curves](vae/curves.png)",
            "",
        ]

    bench = read_json(out / "bench" / "results.json")
    if bench.get("aggregates"):
        rows = []
        for model, per_tokens in bench["aggregates"].items():
            for tokens, groups in per_tokens.items():
                row = groups.get("overall", {})
                figures = [row.get(key) for key in ("chamfer_l1", "f_score@0.01", "volume_iou")]
                rows.append(
                    [model, str(tokens), str(row.get("num_shapes", 0))]
                    + [format_figure(v, spec=".4f") for v in figures]
                )
        header = ["model", "tokens", "shapes", "CD-L1", "F@0.01", "volume IoU (field)"]
        lines += ["## Dora-bench (brief, overall)", "", *markdown_table(header, rows)]
        lines += ["", "Per level, latent quality and plots: [bench/results.md](bench/results.md)", ""]

    manifest = read_json(out / "latents" / "manifest.json")
    if manifest:
        keys = ("num_samples", "num_tokens", "latent_channels", "dtype")
        lines += ["## Latent cache", "", ", ".join(f"{k}: {manifest.get(k)}" for k in keys), ""]

    dit = read_json(out / "dit" / "summary.json")
    if dit:
        lines += [
            "## DiT",
            "",
            *_cut_warning(dit),
            f"Steps: {dit.get('steps')}; final loss: {dit.get('final_loss')}",
            "",
        ]

    codes = read_json(out / "codes" / "codes.json")
    refined = read_json(out / "vae_refined" / "summary.json")
    if codes or refined:
        lines += ["## Decoder refined on the DiT's own codes", ""]
        if codes:
            distances = ", ".join(
                f"sigma {sigma}: {figures['rms_distance_std']:.2f}"
                for sigma, figures in (codes.get("distance_by_sigma") or {}).items()
            )
            lines += [
                f"{codes.get('num_codes')} codes of {codes.get('num_shapes')} training shapes; how far the DiT's "
                f"codes land from their source (RMS, latent std): {distances}",
                "",
            ]
        if refined:
            lines += [
                *_cut_warning(refined),
                f"Steps: {refined.get('steps')} (decoder only); held-out reconstruction after:",
                "",
                _format_metrics(refined.get("final", {})),
                "",
            ]

    samples = out / "samples" / "samples.json"
    if samples.exists():
        rows = json.loads(samples.read_text())
        table = [[r["prompt"], r["path"] or "(empty)", str(r["faces"]), str(r["watertight"])] for r in rows]
        lines += ["## Samples", "", "![samples](samples/grid.png)", ""]
        lines += [*markdown_table(["prompt", "mesh", "faces", "watertight"], table), ""]
    lines += _generation_section(out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cut_warning(summary: dict[str, Any]) -> list[str]:
    """A training cut by the wall-clock safety cap did not run its step budget: say so where its figures stand."""
    if not summary.get("stopped_by_time"):
        return []
    return [
        f"**Warning: the wall-clock cap stopped this training after {summary.get('steps')} steps, before its "
        "step budget: the figures below are not those of the configured run.**",
        "",
    ]


def _generation_section(out: Path) -> list[str]:
    """The "Generation" section: `dora bench-generation`'s overall figures per prompt set, if the stage ran."""
    results = read_json(out / "bench_generation" / "results.json")
    if not results.get("sets"):
        return []
    settings, judge = results.get("settings", {}), results.get("judge") or {}
    lines = [
        "## Generation",
        "",
        f"`dora bench-generation`: {settings.get('samples_per_prompt')} sample(s) per prompt, "
        f"{settings.get('steps')} steps, guidance {settings.get('guidance')}{scheduler_note(results)}, "
        f"{settings.get('resolution')}³, "
        f"{settings.get('points')} points per shape; reference: the {results['reference']['num_shapes']} "
        f"{results['reference']['split']} shapes.",
    ]
    if judge:
        lines[-1] += (
            f" Judge: {judge['method']}, {judge['accuracy_pct']:.0f}% on its {judge['num_held_out']} "
            f"held-out reference shapes (chance {judge['chance_pct']:.0f}%)."
        )
    header = ["prompts", "samples", "text accuracy %", "1-NNA-CD %", "COV-CD %", "MMD-CD ×1e3"]
    header += ["one component %", "floater share %", "empty/failed"]
    keys = ("text_accuracy_pct", "1-NNA-CD", "COV-CD", "MMD-CD")
    keys += ("structure_single_component_pct", "structure_mean_floater_share_pct")
    rows = []
    for name, figures in results["sets"].items():
        row = figures["overall"]
        cells = [format_figure(row.get(k), 1e3 if k == "MMD-CD" else 1.0, ".1f") for k in keys]
        rows.append([name, str(row.get("num_samples")), *cells, str(row.get("structure_empty_or_failed"))])
    lines += ["", *markdown_table(header, rows)]
    first = next(iter(results["sets"]))
    lines += [
        "",
        "Protocol and per-category tables: [bench_generation/results.md](bench_generation/results.md)",
        "",
        f"![{first}](bench_generation/contact_sheet_{first}.png)",
        "",
    ]
    return lines

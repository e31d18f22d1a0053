"""`dora bench-generation` results: aggregation per prompt set and category, results.json / .md, contact sheets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dora_shapegen.pipelines.bench.data import PromptItem, ReferenceShape
from dora_shapegen.pipelines.bench.images import summarize_source
from dora_shapegen.pipelines.bench.metrics import distribution_metrics, summarize_structure
from dora_shapegen.report import format_figure, json_ready, markdown_table

SAMPLE_KEYS = (
    "set",
    "prompt",
    "category",
    "prompt_index",
    "sample",
    "seed",
    "judged",
    "diversity",
    "error",
    "empty",
    "faces",
    "components",
    "single_component",
    "watertight",
    "floater_share",
    "floater_measure",
    "source",
    "source_cd",
    "source_cd_l1",
)


def protocol(config: Any, judge: Any) -> dict[str, Any]:
    """What was measured and how, in words and numbers (stated in results.json and results.md)."""
    emd = (
        f"exact EMD (optimal bijection by scipy's linear_sum_assignment) on {config.emd_points} of the points, "
        "mean matched Euclidean distance"
        if config.emd_points
        else "no EMD"
    )
    return {
        "points_per_shape": config.points,
        "normalisation": "per shape: bounding-box centre at the origin, largest half-extent 1 (LION's convention)",
        "surface_sampling": "area-uniform samples of each generated mesh; a prepared reference's stored samples of "
        "its watertight remesh (random subset); a mesh reference's normalised input surface",
        "distance": "CD = Chamfer-L2 of vae.bench.metrics (mean of both directions' mean squared nearest-neighbour "
        f"distance; PointFlow's sum is 2x); {emd}",
        "1-NNA": "leave-one-out 1-NN accuracy of generated vs reference (50% ideal, 100% separable, ~0% copies); "
        "on balanced sets (the larger one subsampled, 20 draws averaged)",
        "COV": "share of reference shapes that are the nearest reference of a generated shape",
        "MMD": "mean over reference shapes of the distance to the nearest generated shape",
        "judge": None
        if judge is None
        else f"{judge.k}-NN vote on CD to {len(judge.categories)} reference shapes of known category (the reference "
        f"set's training part); its accuracy on the {judge.num_held_out} held-out reference shapes: "
        f"{100 * judge.accuracy:.1f}%. Empty or failed samples count as wrong",
        "diversity": "per prompt, the mean pairwise CD of its samples divided by the mean pairwise CD of the judge's "
        "reference shapes of its category, averaged over prompts (1 = samples differ as much as real shapes; "
        "needs >= 2 samples per prompt)",
        "structure": "components edge-connected after merging vertices; floater share = 1 - largest component's "
        "share of the volume (area when a component is open); "
        + (
            "pipeline post-processing applied (remove_floaters)"
            if config.remove_floaters
            else "raw extraction (no floater removal)"
        ),
        "empty_samples": "excluded from the distribution metrics (num_generated says how many took part)",
        "image_prompts": "renders of each evaluated reference shape (`dora render-views`); category accuracy "
        "against the source shape's category; CD-L2 / CD-L1 and F-score at "
        f"{', '.join(f'{tau:g}' for tau in config.fscore_thresholds)} to the source shape (normalised clouds, no "
        "alignment search; an empty or failed sample counts F = 0 and no CD)",
    }


def _matrices_for(matrices: dict[str, tuple], g: list[int], r: list[int]) -> dict[str, tuple]:
    return {
        name: (gg[np.ix_(g, g)], gr[np.ix_(g, r)], rr[np.ix_(r, r)])
        for name, (gg, gr, rr) in matrices.items()
    }


def _group_metrics(
    rows: list[dict[str, Any]],
    positions: dict[int, int],
    matrices: dict[str, tuple],
    reference_index: list[int],
    seed: int,
    thresholds: list[float] = (),
) -> dict[str, Any]:
    g = [positions[id(row)] for row in rows if id(row) in positions]
    result: dict[str, Any] = {
        "num_samples": len(rows),
        "num_generated": len(g),
        "num_reference": len(reference_index),
    }
    if g and reference_index and matrices:
        result |= distribution_metrics(_matrices_for(matrices, g, reference_index), seed=seed)
    judged = [row for row in rows if row.get("category")]
    if judged:
        result["text_accuracy_pct"] = (
            100.0 * sum(row.get("judged") == row["category"] for row in judged) / len(judged)
        )
        result["num_judged"] = len(judged)
    ratios = [row["diversity"] for row in rows if row.get("diversity") is not None]
    if ratios:  # every prompt has the same number of samples, so a mean over samples is one over prompts
        result["diversity_ratio"] = float(np.mean(ratios))
    result |= {f"structure_{k}": v for k, v in summarize_structure(rows).items() if k != "num_samples"}
    result |= summarize_source(rows, thresholds)
    return result


def evaluate_samples(
    samples: list[dict[str, Any]],
    made: list[dict[str, Any]],
    evaluated: list[ReferenceShape],
    matrices: dict[str, tuple],
    prompt_sets: list[tuple[str, list[PromptItem]]],
    judge: Any,
    config: Any,
) -> dict[str, Any]:
    """The results dict: protocol, reference and judge facts, overall and per-category figures per prompt set."""
    positions = {id(row): index for index, row in enumerate(made)}
    by_category: dict[str, list[int]] = {}
    for index, shape in enumerate(evaluated):
        by_category.setdefault(shape.category, []).append(index)
    sets: dict[str, Any] = {}
    for name, items in prompt_sets:
        rows = [row for row in samples if row["set"] == name]
        per_category = {}
        for category in sorted({row["category"] for row in rows if row["category"]}):
            members = [row for row in rows if row["category"] == category]
            per_category[category] = _group_metrics(
                members,
                positions,
                matrices,
                by_category.get(category, []),
                config.seed,
                config.fscore_thresholds,
            )
        sets[name] = {
            "num_prompts": len(items),
            "overall": _group_metrics(
                rows, positions, matrices, list(range(len(evaluated))), config.seed, config.fscore_thresholds
            ),
            "per_category": per_category,
        }
    judge_facts = (
        None
        if judge is None
        else {
            "method": f"{judge.k}-NN vote on CD",
            "k": judge.k,
            "accuracy_pct": 100.0 * judge.accuracy,
            "num_train": len(judge.categories),
            "num_held_out": judge.num_held_out,
            "num_categories": len(set(judge.categories)),
            "chance_pct": 100.0 / max(len(set(judge.categories)), 1),
        }
    )
    results = {
        "protocol": protocol(config, judge),
        "reference": {
            "split": config.split,
            "num_shapes": len(evaluated),
            "per_category": dict(sorted(Counter(s.category or "(none)" for s in evaluated).items())),
        },
        "judge": judge_facts,
        "sets": sets,
        "samples": [
            {key: row.get(key) for key in SAMPLE_KEYS}
            | {k: v for k, v in row.items() if k.startswith("source_f@")}
            for row in samples
        ],
    }
    results["summary_text"] = summary_text(results)
    return json_ready(results)


# ---------------------------------------------------------------------------------------------- markdown
def _cells(figures: dict[str, Any], distances: list[str]) -> list[str]:
    cells = [
        str(figures.get("num_samples", 0)),
        format_figure(figures.get("text_accuracy_pct")),
        format_figure(figures.get("diversity_ratio")),
    ]
    for name in distances:
        cells += [
            format_figure(figures.get(f"1-NNA-{name}")),
            format_figure(figures.get(f"COV-{name}")),
            format_figure(figures.get(f"MMD-{name}"), 1e3 if name == "CD" else 1e2),
        ]
    cells += [
        format_figure(figures.get("structure_single_component_pct")),
        format_figure(figures.get("structure_mean_floater_share_pct")),
        str(figures.get("structure_empty_or_failed", "-")),
        format_figure(figures.get("structure_watertight_pct")),
        format_figure(figures.get("structure_median_faces")),
    ]
    return cells


def _header(distances: list[str], first: str) -> list[str]:
    header = [first, "samples", "text acc. %", "diversity (× real)"]
    for name in distances:
        header += [f"1-NNA-{name} %", f"COV-{name} %", f"MMD-{name} ×{'1e3' if name == 'CD' else '1e2'}"]
    return header + ["one component %", "floater share %", "empty/failed", "watertight %", "median faces"]


def summary_text(results: dict[str, Any]) -> str:
    lines = []
    judge = results.get("judge")
    if judge:
        lines.append(
            f"judge: {judge['method']}, held-out accuracy {judge['accuracy_pct']:.1f}% "
            f"({judge['num_held_out']} shapes, chance {judge['chance_pct']:.1f}%)"
        )
    for name, figures in results["sets"].items():
        overall = figures["overall"]
        lines.append(
            f"{name}: {overall['num_samples']} samples, text accuracy {format_figure(overall.get('text_accuracy_pct'))}%, "
            f"1-NNA-CD {format_figure(overall.get('1-NNA-CD'))}%, COV-CD {format_figure(overall.get('COV-CD'))}%, "
            f"MMD-CD {format_figure(overall.get('MMD-CD'), 1e3)}e-3, one component "
            f"{format_figure(overall.get('structure_single_component_pct'))}%, floaters "
            f"{format_figure(overall.get('structure_mean_floater_share_pct'))}%"
        )
        if "source_num_samples" in overall:
            scores = ", ".join(
                f"F@{key.split('@')[1]} {format_figure(value)}"
                for key, value in overall.items()
                if key.startswith("source_f@")
            )
            lines.append(
                f"{name} (to the source shape): CD-L2 {format_figure(overall.get('source_cd'), 1e3)}e-3, CD-L1 "
                f"{format_figure(overall.get('source_cd_l1'), 1e2)}e-2, {scores}"
            )
    return "\n".join(lines)


def _source_rows(figures_by_name: dict[str, dict[str, Any]], thresholds: list[float]) -> list[list[str]]:
    rows = []
    for name, figures in figures_by_name.items():
        if "source_num_samples" not in figures:
            continue
        rows.append(
            [
                name,
                str(figures["source_num_samples"]),
                format_figure(figures.get("text_accuracy_pct")),
                format_figure(figures.get("source_cd"), 1e3),
                format_figure(figures.get("source_cd_l1"), 1e2),
                *[format_figure(figures.get(f"source_f@{tau:g}")) for tau in thresholds],
                format_figure(figures.get("structure_single_component_pct")),
                format_figure(figures.get("structure_mean_floater_share_pct")),
            ]
        )
    return rows


def _source_header(first: str, thresholds: list[float]) -> list[str]:
    return (
        [first, "samples", "category acc. %", "CD-L2 ×1e3", "CD-L1 ×1e2"]
        + [f"F@{tau:g}" for tau in thresholds]
        + ["one component %", "floater share %"]
    )


def scheduler_note(results: dict[str, Any]) -> str:
    """The ", scheduler shift S" of a header line, for results that record their sampler (older ones do not)."""
    shift = (results.get("scheduler") or {}).get("shift")
    return "" if shift is None else f", scheduler shift {shift:g}"


def render_markdown(results: dict[str, Any]) -> str:
    settings, reference = results["settings"], results["reference"]
    distances = ["CD"] + (["EMD"] if settings["emd_points"] else [])
    lines = [
        "# Generation benchmark",
        "",
        f"Pipeline `{results['pipeline']}`; {settings['samples_per_prompt']} samples per prompt, "
        f"{settings['steps']} steps, guidance {settings['guidance']}{scheduler_note(results)}, "
        f"tokens {settings['tokens'] or 'default'}, "
        f"extraction {settings['resolution']}³, seed {settings['seed']}. Reference: `{results['reference_source']}`, "
        f"{reference['split']} split, {reference['num_shapes']} shapes "
        f"({', '.join(f'{k} {v}' for k, v in reference['per_category'].items())}).",
        "",
        "## Protocol",
        "",
    ]
    lines += [f"- **{key}**: {value}" for key, value in results["protocol"].items() if value is not None]
    lines += ["", "## Overall", ""]
    lines += markdown_table(
        _header(distances, "prompt set"),
        [[name] + _cells(figures["overall"], distances) for name, figures in results["sets"].items()],
    )
    lines += [
        "",
        "Text accuracy: share of samples the judge puts in the prompt's category (for image prompts: the category "
        "of the shape the image shows). Distribution metrics use the non-empty samples against the whole "
        "reference split.",
        "",
    ]
    thresholds = settings.get("fscore_thresholds") or []
    overall_rows = _source_rows({name: f["overall"] for name, f in results["sets"].items()}, thresholds)
    if overall_rows:
        lines += ["## Image prompts: fidelity to the source shape", ""]
        lines += markdown_table(_source_header("prompt set", thresholds), overall_rows)
        lines += [""]
        for name, figures in results["sets"].items():
            rows = _source_rows(figures["per_category"], thresholds)
            if rows:
                lines += [f"Per category ({name}):", ""]
                lines += markdown_table(_source_header("category", thresholds), rows)
                lines += [""]
    for name, figures in results["sets"].items():
        lines += [f"## Per category: {name}", ""]
        rows = [
            [category, str(values["num_reference"])] + _cells(values, distances)
            for category, values in figures["per_category"].items()
        ]
        header = _header(distances, "category")
        lines += (
            markdown_table(header[:1] + ["ref shapes"] + header[1:], rows)
            if rows
            else ["_no categorised prompts_"]
        )
        lines += ["", f"![{name}](contact_sheet_{name}.png)", ""]
    lines += [f"Seconds: {', '.join(f'{k} {v}' for k, v in results['seconds'].items())}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files
def _title(row: dict[str, Any]) -> str:
    if row.get("error"):
        verdict = "failed"
    elif row.get("empty"):
        verdict = "empty"
    else:
        verdict = f"judge: {row['judged']}" if row.get("judged") else f"{row['components']} part(s)"
    fidelity = sorted(key for key in row if key.startswith("source_f@"))
    if fidelity and row.get(fidelity[-1]) is not None:  # image prompts: how close to the shape shown
        verdict += f", F@{fidelity[-1].split('@')[1]} {row[fidelity[-1]]:.2f}"
    return f"{row['prompt']} [{verdict}]"


def write_outputs(
    out: Path,
    results: dict[str, Any],
    samples: list[dict[str, Any]],
    prompt_sets: list[tuple[str, list[PromptItem]]],
    config: Any,
) -> None:
    """results.json, results.md, contact_sheet_<set>.png (and meshes/ with ``save_meshes``) under ``out``."""
    from dora_shapegen.data.render import render_grid_png, render_pairs_png

    out.mkdir(parents=True, exist_ok=True)
    for name, _ in prompt_sets:
        rows = [row for row in samples if row["set"] == name]
        meshes = [row["mesh"] if row["mesh"] is not None else _empty_mesh() for row in rows]
        if rows and rows[0].get("image") is not None:  # image prompts: input image | generated mesh
            render_pairs_png(
                [row["image"] for row in rows],
                meshes,
                out / f"contact_sheet_{name}.png",
                titles=[_title(row) for row in rows],
                columns=max(1, config.contact_sheet_columns // 2),
                size=config.contact_sheet_size,
            )
        else:
            render_grid_png(
                meshes,
                out / f"contact_sheet_{name}.png",
                titles=[_title(row) for row in rows],
                columns=config.contact_sheet_columns,
                size=config.contact_sheet_size,
            )
        if config.save_meshes:
            from dora_shapegen.pipelines.mesh_post import export_mesh

            for index, row in enumerate(rows):
                if row["mesh"] is not None and len(row["mesh"].faces):
                    export_mesh(row["mesh"], out / "meshes" / name / f"{index:03d}.glb")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(render_markdown(results))


def _empty_mesh() -> Any:
    import trimesh

    return trimesh.Trimesh()

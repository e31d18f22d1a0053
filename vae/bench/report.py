"""Dora-bench outputs: aggregates, ``results.json``, ``results.md``, token-scaling plots and the contact sheet.

Aggregates are means over the shapes that produced a metric (NaN-aware: the sharp-edge metrics exist only for
shapes with sharp edges, hence their own count), per model, token count, and complexity level plus "overall".
An empty reconstruction is not dropped: ``vae.bench.metrics.mesh_metrics`` gives it the worst value of every metric.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import trimesh

from dora_shapegen.report import format_figure, json_ready, markdown_table
from dora_shapegen.vae.bench.data import BenchConfig
from dora_shapegen.vae.bench.latent import mean_dicts

LEVELS = ("L1", "L2", "L3", "L4")
SMOOTHNESS_KEYS = ["iou", "iou_change", "chamfer_l1", "empty_fraction"]
INTERPOLATION_KEYS = [
    "single_watertight_fraction",
    "endpoint_single_watertight",
    "monotonic_fraction",
    "max_second_difference",
    "max_linearity_deviation",
    "endpoint_distance",
]


def metric_columns(config: BenchConfig) -> list[tuple[str, str, float]]:
    """(key, table header, display factor) of the columns of every reconstruction table."""
    columns = [("chamfer_l1", "CD-L1 x1e3", 1e3), ("chamfer_l2", "CD-L2 x1e4", 1e4)]
    columns += [(f"f_score@{tau:g}", f"F@{tau:g}", 1.0) for tau in config.metrics.fscore_thresholds]
    columns += [
        ("normal_consistency", "NC", 1.0),
        ("sharp_chamfer_l1", "sharp CD-L1 x1e3", 1e3),
        ("sharp_normal_error_deg", "sharp NE deg", 1.0),
    ]
    if config.metrics.rendered_sne:
        columns.append(("rendered_sharp_normal_error_deg", "rendered SNE deg", 1.0))
    columns += [("volume_iou", "IoU field", 1.0), ("mesh_volume_iou", "IoU mesh", 1.0)]
    if config.metrics.roughness:
        columns += [("roughness_deg", "roughness deg", 1.0), ("gt_roughness_deg", "gt roughness deg", 1.0)]
    return columns


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [row for row in rows if "error" not in row]
    keys = sorted(
        {k for row in ok for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    stats = mean_dicts(ok, keys)
    stats.pop("num")
    finite_sharp = [
        row
        for row in ok
        if isinstance(row.get("sharp_chamfer_l1"), float) and math.isfinite(row["sharp_chamfer_l1"])
    ]
    return {
        "num_shapes": len(ok),
        "num_errors": len(rows) - len(ok),
        "num_empty": sum(bool(row.get("empty_prediction")) for row in ok),
        "num_sharp_shapes": len(finite_sharp),
    } | stats


def aggregate(shapes: list[dict[str, Any]], model_names: list[str], tokens: list[int]) -> dict[str, Any]:
    """{model: {tokens: {"overall" | "L1".."L4": stats}}} over the shapes that prepared fine."""
    ok = [shape for shape in shapes if shape["status"] == "ok"]
    out: dict[str, Any] = {}
    for name in model_names:
        for num_tokens in tokens:
            groups: dict[str, list[dict[str, Any]]] = {"overall": []}
            for shape in ok:
                row = shape["results"].get(name, {}).get(str(num_tokens))
                if row is not None:
                    groups["overall"].append(row)
                    groups.setdefault(f"L{shape['level']}", []).append(row)
            out.setdefault(name, {})[str(num_tokens)] = {
                group: _stats(rows) for group, rows in groups.items()
            }
    return out


def aggregate_latent(shapes: list[dict[str, Any]], interpolations: dict[str, Any]) -> dict[str, Any]:
    """{model: {tokens: {"smoothness": {scale: means}, "interpolation": means}}}."""
    out: dict[str, Any] = {}
    for shape in shapes:
        for name, per_tokens in shape.get("latent", {}).items():
            for num_tokens, result in per_tokens.items():
                if "error" in result:
                    continue
                slot = out.setdefault(name, {}).setdefault(num_tokens, {}).setdefault("smoothness", {})
                for scale, values in result.items():
                    slot.setdefault(scale, []).append(values)
    for per_tokens in out.values():
        for slot in per_tokens.values():
            slot["smoothness"] = {scale: mean_dicts(rows) for scale, rows in slot["smoothness"].items()}
    for name, per_tokens in interpolations.items():
        for num_tokens, rows in per_tokens.items():
            good = [row for row in rows if "error" not in row]
            out.setdefault(name, {}).setdefault(num_tokens, {})["interpolation"] = mean_dicts(
                good, INTERPOLATION_KEYS
            ) | {"num_errors": len(rows) - len(good)}
    return out


def _level_notes(config: BenchConfig) -> str:
    t, unit = config.levels.thresholds, "sharp edges" if config.levels.by == "count" else "sharp-edge length"
    return (
        f"L1: < {t[0]:g} {unit}; L2: < {t[1]:g}; L3: < {t[2]:g}; L4: >= {t[2]:g} (edges of the clean input "
        f"with dihedral angle > {config.levels.sharp_angle_deg:g} deg)"
    )


def render_markdown(
    config: BenchConfig,
    args: dict[str, Any],
    models: list[dict[str, Any]],
    shapes: list[dict[str, Any]],
    aggregates: dict[str, Any],
    latent: dict[str, Any],
    seconds: float,
) -> str:
    columns = metric_columns(config)
    failed = [s for s in shapes if s["status"] != "ok"]
    m = config.metrics
    lines = [
        "# Dora-bench results",
        "",
        f"Meshes `{args.get('meshes')}`: {len(shapes) - len(failed)} shapes measured, {len(failed)} failed; "
        f"token counts {config.tokens}; marching cubes {config.resolution}^3 (hierarchical); {seconds:.0f} s. "
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        *markdown_table(
            [
                "model",
                "path",
                "use_salient",
                "epsilon",
                "trained points (uniform/salient)",
                "bench points",
                "parameters",
                "latents",
            ],
            [
                [
                    x["name"],
                    f"`{x['path']}`",
                    str(x["use_salient"]),
                    f"{x['epsilon']:.6g}",
                    f"{x['n_uniform']}/{x['n_salient']}",
                    f"{x['sampled_n_uniform']}/{x['sampled_n_salient']}",
                    f"{x['num_parameters']:,}",
                    "posterior sample (seeded)" if x.get("sample_posterior") else "posterior mean",
                ]
                for x in models
            ],
        ),
        "",
        "Metrics (all distances in the [-1, 1]^3 normalisation; ground truth = watertight remesh at the model's "
        "epsilon):",
        f"- CD-L1: Chamfer distance with Euclidean (not squared) nearest-neighbour distances, mean of both "
        f"directions, {m.surface_points:,} area-uniform points per surface; CD-L2: the same with squared distances.",
        "- F@tau: F-score of those samples at distance tau. NC: normal consistency (mean |cos| of nearest "
        "neighbours' normals, 1 = perfect).",
        f"- Sharp-edge error, **geometric variant**: sharp CD-L1 = the "
        f"Chamfer-L1 restricted to points within {m.sharp_radius:g} of the ground truth's sharp edges; sharp NE = "
        f"mean angle between gt and reconstructed surface normals there (degrees). Only shapes with sharp edges "
        f"count (column n sharp).",
        *(
            [
                f"- Rendered SNE (Dora-bench's Sharp Normal Error, rendered): normal maps of gt and reconstruction from "
                f"{len(m.render_views)} fixed orthographic views at {m.render_resolution} px; mean angle (degrees) over "
                f"the gt's visible sharp-edge pixels dilated by "
                f"{m.render_dilation_px if m.render_dilation_px is not None else 'ceil(' + format(m.sharp_radius, 'g') + ' / pixel)'}"
                f" px; a pixel only one mesh covers counts 90 (protocol: `vae/bench/rendered.py`)."
            ]
            if m.rendered_sne
            else []
        ),
        f"- IoU field: volume IoU of the decoded occupancy (> {config.threshold:g}) against the ground truth's "
        f"winding-number occupancy on {m.volume_points:,} uniform points in [-{config.bounds:g}, "
        f"{config.bounds:g}]^3; IoU mesh: the same for the extracted mesh.",
        f"- Levels: {_level_notes(config)}.",
        "",
    ]
    header = ["model", "tokens", "n", "n sharp", "empty"] + [c[1] for c in columns]
    for group in ("overall", *LEVELS):
        rows = []
        for name, per_tokens in aggregates.items():
            for num_tokens, groups in per_tokens.items():
                if group in groups and groups[group]["num_shapes"]:
                    g = groups[group]
                    rows.append(
                        [
                            name,
                            num_tokens,
                            str(g["num_shapes"]),
                            str(g["num_sharp_shapes"]),
                            str(g["num_empty"]),
                        ]
                        + [format_figure(g.get(key), f) for key, _, f in columns]
                    )
        if rows:
            lines += [
                f"## {'Overall' if group == 'overall' else 'Level ' + group}",
                "",
                *markdown_table(header, rows),
                "",
            ]
    lines += ["## Token scaling (overall)", ""]
    for key, title, factor in columns:
        rows = [
            [name] + [format_figure(per_tokens[str(k)]["overall"].get(key), factor) for k in config.tokens]
            for name, per_tokens in aggregates.items()
        ]
        lines += [f"**{title}**", "", *markdown_table(["model"] + [str(k) for k in config.tokens], rows), ""]
    if latent:
        lines += [
            "## Latent-space quality",
            "",
            "Smoothness: latents + s * std(latents) * N(0, I); change of the decode against the unperturbed "
            "decode (IoU on volume points, 1 = unchanged; CD-L1 between the extracted meshes at "
            f"{config.latent.resolution}^3).",
            "",
        ]
        rows = [
            [
                name,
                k,
                scale,
                format_figure(v.get("iou")),
                format_figure(v.get("chamfer_l1"), 1e3),
                format_figure(v.get("empty_fraction")),
                str(v.get("num")),
            ]
            for name, per_tokens in latent.items()
            for k, slot in per_tokens.items()
            for scale, v in slot.get("smoothness", {}).items()
            if scale != "clean"
        ]
        lines += [
            *markdown_table(["model", "tokens", "noise scale", "IoU", "CD-L1 x1e3", "empty", "shapes"], rows),
            "",
        ]
        lines += [
            "Interpolation: z(t) = (1 - t) z_a + t z_b; single = interior interpolants that are one watertight "
            "piece; monotonic = steps where CD to A grows and CD to B shrinks; 2nd diff = max |second "
            "difference| of those curves / CD(A, B) (0 = even pace); lin dev = max |d_A / (d_A + d_B) - t|.",
            "",
        ]
        rows = [
            [
                name,
                k,
                str(v.get("num")),
                format_figure(v.get("single_watertight_fraction")),
                format_figure(v.get("monotonic_fraction")),
                format_figure(v.get("max_second_difference")),
                format_figure(v.get("max_linearity_deviation")),
            ]
            for name, per_tokens in latent.items()
            for k, slot in per_tokens.items()
            if (v := slot.get("interpolation"))
        ]
        lines += [
            *markdown_table(["model", "tokens", "pairs", "single", "monotonic", "2nd diff", "lin dev"], rows),
            "",
        ]
    errors = [[s["shape_id"], "-", "-", s["reason"]] for s in failed]
    errors += [
        [s["shape_id"], name, k, r["error"]]
        for s in shapes
        if s["status"] == "ok"
        for name, per_tokens in s["results"].items()
        for k, r in per_tokens.items()
        if "error" in r
    ]
    if errors:
        lines += [
            "## Failures",
            "",
            *markdown_table(
                ["shape", "model", "tokens", "reason"], [[c.replace("|", "/") for c in row] for row in errors]
            ),
            "",
        ]
    return "\n".join(lines)


SCALING_PANEL_KEYS = ("chamfer_l1", "f_score@0.01", "sharp_chamfer_l1", "volume_iou")


def plot_token_scaling(
    path: Path,
    config: BenchConfig,
    aggregates: dict[str, Any],
    groups: tuple[str, ...] = ("overall",),
    keys: tuple[str, ...] | None = None,
) -> None:
    """Each metric against the token count (log2 axis), one line per model; one row of panels per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in metric_columns(config) if keys is None or c[0] in keys]
    cols = min(len(columns), 5) if len(groups) == 1 else len(columns)
    rows_per_group = math.ceil(len(columns) / cols)
    figure, axes = plt.subplots(
        rows_per_group * len(groups),
        cols,
        figsize=(3.2 * cols, 2.6 * rows_per_group * len(groups)),
        squeeze=False,
    )
    for g, group in enumerate(groups):
        panels = list(axes[g * rows_per_group : (g + 1) * rows_per_group].flat)
        for axis, (key, title, factor) in zip(panels, columns):
            for name, per_tokens in aggregates.items():
                xs = [k for k in config.tokens if per_tokens[str(k)].get(group, {}).get("num_shapes")]
                ys = [per_tokens[str(k)][group].get(key, math.nan) * factor for k in xs]
                axis.plot(xs, ys, marker="o", ms=3, label=name)
            axis.set_xscale("log", base=2)
            axis.set_xticks(config.tokens, [str(k) for k in config.tokens])
            axis.minorticks_off()
            axis.set_title(f"{title} ({group})" if len(groups) > 1 else title, fontsize=8)
            axis.tick_params(labelsize=6)
        for axis in panels[len(columns) :]:
            axis.set_axis_off()
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=6)
    # Fixed margins instead of tight_layout, which costs seconds per figure on a loaded CPU.
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.92, wspace=0.35, hspace=0.55)
    figure.suptitle("Dora-bench: metric against token count (x axis: tokens)", fontsize=9)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_smoothness(path: Path, latent: dict[str, Any]) -> None:
    """IoU and Chamfer change of the decode against the noise scale, one line per model and token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (iou_axis, cd_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, per_tokens in latent.items():
        for num_tokens, slot in per_tokens.items():
            scales = sorted((float(s), v) for s, v in slot.get("smoothness", {}).items() if s != "clean")
            if scales:
                xs = [s for s, _ in scales]
                iou_axis.plot(
                    xs, [v["iou_change"] for _, v in scales], marker="o", ms=3, label=f"{name} @{num_tokens}"
                )
                cd_axis.plot(
                    xs, [v["chamfer_l1"] for _, v in scales], marker="o", ms=3, label=f"{name} @{num_tokens}"
                )
    iou_axis.set_title("1 - IoU(perturbed, clean)", fontsize=9)
    cd_axis.set_title("CD-L1(perturbed, clean)", fontsize=9)
    for axis in (iou_axis, cd_axis):
        axis.set_xlabel("noise scale (x latent std)", fontsize=8)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.3)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_contact_sheet(
    path: Path,
    config: BenchConfig,
    model_names: list[str],
    sheet: list[tuple[dict[str, Any], dict[Any, trimesh.Trimesh]]],
    epsilons: dict[str, str],
) -> None:
    """Rows: shapes; columns: ground truth, then each model's reconstruction at the largest token count."""
    from dora_shapegen.data.render import render_grid_png

    num_tokens = config.tokens[-1]
    meshes, titles = [], []
    for entry, by_key in sheet:
        gt = by_key["gt"][epsilons[model_names[0]]]
        meshes.append(gt)
        titles.append(f"{entry['shape_id']} ground truth (L{entry['level']})")
        for name in model_names:
            mesh = by_key.get((name, num_tokens))
            result = entry["results"].get(name, {}).get(str(num_tokens), {})
            meshes.append(mesh if mesh is not None else trimesh.Trimesh())
            cd = format_figure(result.get("chamfer_l1"), 1e3)
            titles.append(
                f"{name} @{num_tokens}: CD-L1 x1e3 {cd}" if "error" not in result else f"{name}: error"
            )
    render_grid_png(
        meshes, path, titles=titles, columns=1 + len(model_names), size=config.report.contact_sheet_size
    )


def write_outputs(
    out: Path,
    config: BenchConfig,
    args: dict[str, Any],
    models: list[dict[str, Any]],
    shapes: list[dict[str, Any]],
    interpolations: dict[str, Any],
    sheet: list[Any],
    seconds: float,
) -> dict[str, Any]:
    """results.json, results.md, plots/*.png, contact_sheet.png under ``out``; returns the JSON document."""
    from dataclasses import asdict

    from dora_shapegen.vae.bench.data import epsilon_key

    names = [m["name"] for m in models]
    aggregates = aggregate(shapes, names, config.tokens)
    latent = aggregate_latent(shapes, interpolations)
    document = {
        "config": asdict(config),
        "args": args,
        "models": models,
        "token_counts": config.tokens,
        "num_shapes": len(shapes),
        "num_failed": sum(s["status"] != "ok" for s in shapes),
        "seconds": seconds,
        "shapes": shapes,
        "aggregates": aggregates,
        "latent_quality": {"aggregates": latent, "interpolations": interpolations},
        "failures": [
            {k: s[k] for k in ("shape_id", "source", "reason")} for s in shapes if s["status"] != "ok"
        ],
        "notes": {
            "sharp_edge_error": "geometric variant (sharp_chamfer_l1, sharp_normal_error_deg) and rendered "
            "variant (rendered_sharp_normal_error_deg over rendered_sharp_pixels; "
            "protocol in vae/bench/rendered.py)",
            "volume_iou": "decoded field vs gt winding-number occupancy; mesh_volume_iou: extracted mesh",
            "chamfer": f"L1 = mean Euclidean NN distance (L2 squared), {config.metrics.surface_points} points",
        },
    }
    (out / "results.json").write_text(json.dumps(json_ready(document), indent=1, allow_nan=False))
    (out / "results.md").write_text(
        render_markdown(config, args, models, shapes, aggregates, latent, seconds)
    )
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_token_scaling(plots / "token_scaling.png", config, aggregates)
    levels = tuple(
        level
        for level in LEVELS
        if any(level in groups for per_tokens in aggregates.values() for groups in per_tokens.values())
    )
    if levels:
        plot_token_scaling(
            plots / "token_scaling_by_level.png", config, aggregates, groups=levels, keys=SCALING_PANEL_KEYS
        )
    if any(slot.get("smoothness") for per_tokens in latent.values() for slot in per_tokens.values()):
        plot_smoothness(plots / "latent_smoothness.png", latent)
    if sheet:
        write_contact_sheet(
            out / "contact_sheet.png",
            config,
            names,
            sheet,
            {m["name"]: epsilon_key(m["epsilon"]) for m in models},
        )
    return document

"""Geometry of the built-in procedural dataset, part one: shared primitives, furniture and vessels.

Each builder takes a numpy ``Generator`` and returns ``(solid, params)``: a manifold3d solid and the plain,
JSON-able parameters it drew (procedural.py writes the captions from them). Parts are unioned with manifold3d
rather than concatenated so every sample is one clean watertight solid (the remesher of the data stage is then
exact and fast), and booleans cut the holes (gear bores, mug cavities, house windows) robustly.

Builders work Z-up, front = -Y, in rough metres, because manifold's cylinders, extrusions and revolutions run
along Z; procedural.py turns the result Y-up (glTF convention). Categories are kept apart by silhouette (the
text-conditioned model is judged by which training category its samples are nearest to), so within-category
ranges are moderate and chosen not to overlap another category's look.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from manifold3d import CrossSection, FillRule, Manifold, OpType
from scipy.interpolate import PchipInterpolator

Params = dict[str, Any]
Builder = Callable[[np.random.Generator], tuple[Manifold, Params]]


# ---------------------------------------------------------------------------------------------- primitives
def box(size: Sequence[float], center: Sequence[float] = (0.0, 0.0, 0.0)) -> Manifold:
    return Manifold.cube(tuple(float(s) for s in size), True).translate(tuple(float(c) for c in center))


def _rotation_z_to(direction: np.ndarray) -> np.ndarray:
    """3x3 rotation taking +Z onto the unit vector ``direction`` (Rodrigues)."""
    z_axis = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z_axis, direction)
    cos_angle = float(direction @ z_axis)
    if np.linalg.norm(axis) < 1e-9:
        return np.eye(3) if cos_angle > 0 else np.diag([1.0, -1.0, -1.0])
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + skew + skew @ skew / (1.0 + cos_angle)


def rod(
    p0: Sequence[float],
    p1: Sequence[float],
    radius: float,
    radius_top: float | None = None,
    segments: int = 20,
) -> Manifold:
    """Cylinder (or cone frustum) from ``p0`` to ``p1``."""
    start, end = np.asarray(p0, dtype=float), np.asarray(p1, dtype=float)
    length = float(np.linalg.norm(end - start))
    top = radius if radius_top is None else radius_top
    solid = Manifold.cylinder(length, float(radius), float(top), segments)
    matrix = np.hstack([_rotation_z_to((end - start) / length), start[:, None]])  # (3, 4)
    return solid.transform(matrix)


def revolve(profile: Sequence[Sequence[float]], segments: int = 40) -> Manifold:
    """Solid of revolution about Z of a closed (radius, height) polygon."""
    section = CrossSection([np.asarray(profile, dtype=float)], FillRule.NonZero)
    return Manifold.revolve(section, segments)


def hull(points: Sequence[Sequence[float]]) -> Manifold:
    return Manifold.hull_points(np.asarray(points, dtype=float))


def union(parts: Sequence[Manifold]) -> Manifold:
    return Manifold.batch_boolean(list(parts), OpType.Add)


def _smooth_profile(knots_t: Sequence[float], knots_r: Sequence[float], num: int = 24) -> np.ndarray:
    """(num, 2) radius/height-fraction samples of a monotone cubic through the knots (no overshoot)."""
    t = np.linspace(0.0, 1.0, num)
    return np.stack([PchipInterpolator(knots_t, knots_r)(t), t], axis=1)


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


# ---------------------------------------------------------------------------------------------- furniture
def build_chair(rng: np.random.Generator) -> tuple[Manifold, Params]:
    width, depth = uniform(rng, 0.42, 0.54), uniform(rng, 0.40, 0.50)
    seat_height, seat_thick = uniform(rng, 0.40, 0.50), uniform(rng, 0.04, 0.07)
    back_height = uniform(rng, 0.25, 0.75)
    leg_thick = uniform(rng, 0.022, 0.06)
    leg_shape = str(rng.choice(["round", "square"]))
    back_style = str(rng.choice(["solid", "slatted"]))
    armrests = bool(rng.random() < 0.35)
    parts = [box((width, depth, seat_thick), (0, 0, seat_height - seat_thick / 2))]
    x_leg, y_leg = width / 2 - leg_thick / 2, depth / 2 - leg_thick / 2
    top = seat_height + back_height
    for sx in (-1, 1):
        for sy in (-1, 1):
            leg_top = top if sy > 0 else seat_height - seat_thick / 2  # rear legs run up as back posts
            if leg_shape == "round":
                parts.append(
                    rod((sx * x_leg, sy * y_leg, 0), (sx * x_leg, sy * y_leg, leg_top), leg_thick / 2)
                )
            else:
                parts.append(box((leg_thick, leg_thick, leg_top), (sx * x_leg, sy * y_leg, leg_top / 2)))
    back_y = depth / 2 - 0.02
    if back_style == "solid":
        parts.append(box((width, 0.035, back_height), (0, back_y, seat_height + back_height / 2)))
    else:
        parts.append(box((width, 0.035, 0.07), (0, back_y, top - 0.035)))
        num_slats = int(rng.integers(3, 6))
        for x in np.linspace(-width / 2, width / 2, num_slats + 2)[1:-1]:
            parts.append(box((0.025, 0.025, back_height), (x, back_y, seat_height + back_height / 2)))
    if armrests:
        for sx in (-1, 1):
            x = sx * (width / 2 - 0.02)
            parts.append(box((0.03, 0.03, 0.22), (x, -depth / 2 + 0.04, seat_height + 0.11)))
            parts.append(box((0.05, depth, 0.03), (x, 0, seat_height + 0.22)))
    return union(parts), {
        "seat_width": width,
        "seat_depth": depth,
        "seat_height": seat_height,
        "back_height": back_height,
        "leg_thickness": leg_thick,
        "leg_shape": leg_shape,
        "back_style": back_style,
        "armrests": armrests,
    }


def build_table(rng: np.random.Generator) -> tuple[Manifold, Params]:
    style = str(rng.choice(["dining", "coffee"], p=[0.75, 0.25]))
    height = uniform(rng, 0.70, 0.78) if style == "dining" else uniform(rng, 0.38, 0.46)
    top_shape = str(rng.choice(["rectangular", "round"]))
    if top_shape == "round":
        width = depth = uniform(rng, 0.9, 1.25)
    else:
        width, depth = uniform(rng, 1.1, 1.7), uniform(rng, 0.65, 0.95)
    top_thick, leg_thick = uniform(rng, 0.03, 0.06), uniform(rng, 0.04, 0.08)
    support = "pedestal" if top_shape == "round" and rng.random() < 0.6 else "four legs"
    z_top = height - top_thick / 2
    if top_shape == "round":
        parts = [rod((0, 0, height - top_thick), (0, 0, height), width / 2, segments=48)]
    else:
        parts = [box((width, depth, top_thick), (0, 0, z_top))]
    if support == "pedestal":
        parts.append(rod((0, 0, 0), (0, 0, height), uniform(rng, 0.05, 0.08)))
        parts.append(rod((0, 0, 0), (0, 0, 0.04), width * 0.28, width * 0.22, segments=40))
    else:
        # Round tops put the legs on a square inscribed well inside the rim.
        inset = width * 0.30 if top_shape == "round" else None
        for sx in (-1, 1):
            for sy in (-1, 1):
                x = sx * (inset if inset else width / 2 - 0.06)
                y = sy * (inset if inset else depth / 2 - 0.06)
                parts.append(box((leg_thick, leg_thick, height), (x, y, height / 2)))
    return union(parts), {
        "style": style,
        "height": height,
        "top_shape": top_shape,
        "width": width,
        "depth": depth,
        "top_thickness": top_thick,
        "support": support,
    }


def build_stool(rng: np.random.Generator) -> tuple[Manifold, Params]:
    seat_radius, height = uniform(rng, 0.15, 0.21), uniform(rng, 0.45, 0.80)
    num_legs = int(rng.choice([3, 4]))
    leg_radius, seat_thick = uniform(rng, 0.013, 0.024), uniform(rng, 0.035, 0.06)
    splay = uniform(rng, 0.03, 0.09)
    footrest = bool(height > 0.6 and rng.random() < 0.7)
    parts = [rod((0, 0, height - seat_thick), (0, 0, height), seat_radius, segments=40)]
    tops, feet = [], []
    for k in range(num_legs):
        angle = 2 * np.pi * k / num_legs + np.pi / 4
        direction = np.array([np.cos(angle), np.sin(angle), 0.0])
        tops.append(direction * seat_radius * 0.65 + [0, 0, height - seat_thick / 2])
        feet.append(direction * (seat_radius * 0.65 + splay + 0.06 * height))
        parts.append(rod(feet[-1], tops[-1], leg_radius))
    if footrest:
        ring = [f + (t - f) * 0.3 for f, t in zip(feet, tops)]
        for k in range(num_legs):
            parts.append(rod(ring[k], ring[(k + 1) % num_legs], leg_radius * 0.7))
    return union(parts), {
        "seat_radius": seat_radius,
        "height": height,
        "num_legs": num_legs,
        "leg_radius": leg_radius,
        "footrest": footrest,
    }


def build_shelf(rng: np.random.Generator) -> tuple[Manifold, Params]:
    width, height, depth = uniform(rng, 0.6, 1.2), uniform(rng, 0.9, 2.0), uniform(rng, 0.25, 0.4)
    num_shelves = int(rng.integers(3, 6))
    board = uniform(rng, 0.02, 0.035)
    back_panel = bool(rng.random() < 0.6)
    parts = [box((board, depth, height), (sx * (width / 2 - board / 2), 0, height / 2)) for sx in (-1, 1)]
    for z in np.linspace(board / 2, height - board / 2, num_shelves + 1):
        parts.append(box((width, depth, board), (0, 0, z)))
    if back_panel:
        parts.append(box((width, 0.012, height), (0, depth / 2 - 0.006, height / 2)))
    return union(parts), {
        "width": width,
        "height": height,
        "depth": depth,
        "num_shelves": num_shelves,
        "back_panel": back_panel,
    }


def build_bed(rng: np.random.Generator) -> tuple[Manifold, Params]:
    size = str(rng.choice(["single", "double"]))
    width = uniform(rng, 0.95, 1.05) if size == "single" else uniform(rng, 1.4, 1.8)
    length, leg_height = uniform(rng, 1.95, 2.15), uniform(rng, 0.08, 0.2)
    frame, mattress = uniform(rng, 0.12, 0.2), uniform(rng, 0.16, 0.24)
    headboard = uniform(rng, 0.3, 0.8)
    footboard = bool(rng.random() < 0.5)
    num_pillows = 1 if size == "single" else 2
    z_frame = leg_height + frame
    z_mattress = z_frame + mattress
    parts = [
        box((width, length, frame), (0, 0, leg_height + frame / 2)),
        box((width - 0.06, length - 0.1, mattress), (0, -0.02, z_frame + mattress / 2)),
        box((width + 0.06, 0.06, z_mattress + headboard), (0, length / 2, (z_mattress + headboard) / 2)),
    ]
    if footboard:
        foot_height = z_mattress + uniform(rng, 0.08, 0.25)
        parts.append(box((width + 0.06, 0.05, foot_height), (0, -length / 2, foot_height / 2)))
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(
                box(
                    (0.06, 0.06, leg_height + 0.01),
                    (sx * (width / 2 - 0.05), sy * (length / 2 - 0.05), (leg_height + 0.01) / 2),
                )
            )
    pillow_width = (width - 0.2) / num_pillows
    for k in range(num_pillows):
        x = -width / 2 + 0.1 + pillow_width * (k + 0.5)
        parts.append(box((pillow_width - 0.06, 0.35, 0.1), (x, length / 2 - 0.3, z_mattress + 0.04)))
    return union(parts), {
        "size": size,
        "width": width,
        "length": length,
        "headboard_height": headboard,
        "footboard": footboard,
        "num_pillows": num_pillows,
    }


def build_lamp(rng: np.random.Generator) -> tuple[Manifold, Params]:
    kind = str(rng.choice(["floor", "desk"]))
    scale = 1.0 if kind == "floor" else 0.45
    pole_height = uniform(rng, 1.2, 1.6) * scale + (0.0 if kind == "floor" else 0.05)
    base_shape = str(rng.choice(["round", "square"]))
    base_radius = uniform(rng, 0.13, 0.18) * (1.0 if kind == "floor" else 0.7)
    pole_radius = 0.016 * (1.0 if kind == "floor" else 0.7)
    shade_shape = str(rng.choice(["cone", "drum"]))
    shade_bottom = uniform(rng, 0.18, 0.26) * (1.0 if kind == "floor" else 0.6)
    shade_top = shade_bottom * (uniform(rng, 0.45, 0.65) if shade_shape == "cone" else uniform(rng, 0.9, 1.0))
    shade_height = shade_bottom * uniform(rng, 0.8, 1.1)
    wall = shade_bottom * 0.07
    if base_shape == "round":
        parts = [rod((0, 0, 0), (0, 0, 0.035), base_radius, segments=40)]
    else:
        parts = [box((base_radius * 1.8, base_radius * 1.8, 0.035), (0, 0, 0.0175))]
    shade_z = pole_height - shade_height * 0.35
    parts.append(rod((0, 0, 0.02), (0, 0, shade_z + shade_height - wall / 2), pole_radius))
    # A bell: closed top (the pole holds it there), open bottom.
    zb, zt = shade_z, shade_z + shade_height
    parts.append(
        revolve(
            [
                (0, zt),
                (0, zt - wall),
                (shade_top - wall, zt - wall),
                (shade_bottom - wall, zb),
                (shade_bottom, zb),
                (shade_top, zt),
            ]
        )
    )
    return union(parts), {
        "kind": kind,
        "height": zt,
        "base_shape": base_shape,
        "shade_shape": shade_shape,
        "shade_radius": shade_bottom,
    }


# ---------------------------------------------------------------------------------------------- vessels
def build_mug(rng: np.random.Generator) -> tuple[Manifold, Params]:
    radius, height = uniform(rng, 0.038, 0.055), uniform(rng, 0.075, 0.12)
    wall = uniform(rng, 0.005, 0.009)
    handle_shape = str(rng.choice(["round", "square"]))
    body = revolve(
        [(0, 0), (radius, 0), (radius, height), (radius - wall, height), (radius - wall, 0.008), (0, 0.008)]
    )
    grip = height * uniform(rng, 0.3, 0.38)  # half the handle's inner height
    thick = uniform(rng, 0.006, 0.009)
    if handle_shape == "round":
        ring = revolve(
            [(grip + thick * np.cos(a), thick * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 16)[:-1]],
            segments=32,
        )
        handle = ring.rotate((90.0, 0.0, 0.0)).translate((radius, 0.0, height / 2))
    else:
        reach = grip * 1.1
        handle = union(
            [
                box((reach + wall, thick * 2, thick * 2), (radius + reach / 2, 0, height / 2 + grip)),
                box((reach + wall, thick * 2, thick * 2), (radius + reach / 2, 0, height / 2 - grip)),
                box((thick * 2, thick * 2, 2 * grip + thick * 2), (radius + reach, 0, height / 2)),
            ]
        )
    # Cut the handle back to the outer wall so nothing pokes into the cavity.
    handle = handle - rod((0, 0, -0.01), (0, 0, height + 0.01), radius - wall / 2, segments=40)
    return union([body, handle]), {
        "radius": radius,
        "height": height,
        "wall": wall,
        "handle_shape": handle_shape,
    }


def build_bottle(rng: np.random.Generator) -> tuple[Manifold, Params]:
    radius, body_height = uniform(rng, 0.03, 0.045), uniform(rng, 0.14, 0.24)
    shoulder, neck_length = uniform(rng, 0.025, 0.06), uniform(rng, 0.03, 0.09)
    neck_radius = radius * uniform(rng, 0.28, 0.4)
    cap = bool(rng.random() < 0.7)
    shoulder_t = np.linspace(0, 1, 8)
    profile = [(0.0, 0.0), (radius, 0.0)]
    profile += [
        (neck_radius + (radius - neck_radius) * np.cos(t * np.pi / 2), body_height + shoulder * t)
        for t in shoulder_t
    ]
    top = body_height + shoulder + neck_length
    profile += [
        (neck_radius, top - 0.008),
        (neck_radius * 1.18, top - 0.006),
        (neck_radius * 1.18, top),
        (0.0, top),
    ]
    parts = [revolve(profile)]
    if cap:
        parts.append(rod((0, 0, top - 0.018), (0, 0, top + 0.008), neck_radius * 1.3, segments=32))
    return union(parts), {
        "radius": radius,
        "body_height": body_height,
        "neck_length": neck_length,
        "neck_radius": neck_radius,
        "cap": cap,
        "height": top + (0.008 if cap else 0.0),
    }


def build_vase(rng: np.random.Generator) -> tuple[Manifold, Params]:
    style = str(rng.choice(["round", "slender", "flared"]))
    height = uniform(rng, 0.25, 0.45)

    def jitter() -> float:
        return uniform(rng, 0.9, 1.1)

    if style == "round":
        knots = ([0, 0.35, 0.8, 1.0], [0.22 * jitter(), 0.45 * jitter(), 0.17 * jitter(), 0.22 * jitter()])
    elif style == "slender":
        knots = ([0, 0.3, 0.75, 1.0], [0.13 * jitter(), 0.18 * jitter(), 0.12 * jitter(), 0.15 * jitter()])
    else:
        knots = ([0, 0.45, 1.0], [0.15 * jitter(), 0.1 * jitter(), 0.32 * jitter()])
    outer = _smooth_profile(knots[0], np.asarray(knots[1]) * height) * [1.0, height]  # (24, 2)
    wall, floor = height * 0.025, height * 0.05
    inner = outer[::-1].copy()
    inner[:, 0] -= wall
    inner = inner[inner[:, 1] >= floor]
    profile = [(0.0, 0.0), *outer.tolist(), *inner.tolist(), (inner[-1, 0], floor), (0.0, floor)]
    return revolve(profile, segments=48), {
        "style": style,
        "height": height,
        "max_radius": float(outer[:, 0].max()),
        "rim_radius": float(outer[-1, 0]),
    }


FURNITURE_AND_VESSELS: dict[str, Builder] = {
    "chair": build_chair,
    "table": build_table,
    "stool": build_stool,
    "shelf": build_shelf,
    "bed": build_bed,
    "lamp": build_lamp,
    "mug": build_mug,
    "bottle": build_bottle,
    "vase": build_vase,
}

"""Geometry of the built-in procedural dataset, part two: gears, vehicles and houses.

Same contract as data/procedural_shapes.py (Z-up while building, front = -Y, ``(solid, params)`` per builder);
split off to keep each file short.
"""

from __future__ import annotations

import numpy as np
from manifold3d import CrossSection, Manifold, OpType

from dora_shapegen.data.procedural_shapes import Builder, Params, box, hull, revolve, rod, uniform, union


def build_gear(rng: np.random.Generator) -> tuple[Manifold, Params]:
    radius = 0.1
    num_teeth = int(rng.integers(8, 25))
    tooth_depth, thickness = radius * uniform(rng, 0.12, 0.2), radius * uniform(rng, 0.15, 0.4)
    bore = radius * uniform(rng, 0.1, 0.28)
    num_holes = int(rng.choice([0, 4, 5, 6]))
    hub = bool(rng.random() < 0.5)
    pitch = 2 * np.pi * radius / num_teeth
    tooth = CrossSection(
        [
            np.array(
                [
                    [-0.02 * radius, -0.3 * pitch],
                    [tooth_depth, -0.18 * pitch],
                    [tooth_depth, 0.18 * pitch],
                    [-0.02 * radius, 0.3 * pitch],
                ]
            )
        ]
    )
    sections = [CrossSection.circle(radius, 64)]
    sections += [tooth.translate((radius, 0.0)).rotate(360.0 * k / num_teeth) for k in range(num_teeth)]
    profile = CrossSection.batch_boolean(sections, OpType.Add)
    # Lightening holes sit on the ring between the hub and the tooth root.
    inner, outer = bore + 0.14 * radius, 0.85 * radius
    hole_radius = min(0.14 * radius, 0.4 * (outer - inner))
    for k in range(num_holes):
        angle = 2 * np.pi * k / num_holes
        centre = 0.5 * (inner + outer) * np.array([np.cos(angle), np.sin(angle)])
        profile = profile - CrossSection.circle(hole_radius, 24).translate(tuple(centre))
    parts = [Manifold.extrude(profile, thickness)]
    if hub:
        parts.append(
            rod((0, 0, -0.3 * thickness), (0, 0, 1.3 * thickness), bore + 0.12 * radius, segments=40)
        )
    solid = union(parts) - rod((0, 0, -thickness), (0, 0, 2 * thickness), bore, segments=32)
    return solid, {
        "num_teeth": num_teeth,
        "tooth_depth": tooth_depth / radius,
        "thickness": thickness / radius,
        "bore_radius": bore / radius,
        "num_holes": num_holes,
        "hub": hub,
    }


def build_rocket(rng: np.random.Generator) -> tuple[Manifold, Params]:
    radius = 0.5
    body_length = radius * uniform(rng, 4.0, 8.0)
    nose_shape = str(rng.choice(["pointed", "rounded"]))
    nose_length = radius * (uniform(rng, 2.0, 3.0) if nose_shape == "pointed" else uniform(rng, 1.0, 1.4))
    num_fins = int(rng.choice([3, 4]))
    fin_height, fin_span = radius * uniform(rng, 1.2, 2.2), radius * uniform(rng, 0.8, 1.4)
    num_boosters = int(rng.choice([0, num_fins], p=[0.65, 0.35]))  # one between each pair of fins
    power = 1.0 if nose_shape == "pointed" else 2.5  # r(s) = radius * (1 - s^p): cone vs ogive-like dome
    nose = [(radius * (1 - s**power), body_length + nose_length * s) for s in np.linspace(0, 1, 12)]
    parts = [revolve([(0.0, 0.0), (radius, 0.0), *nose[:-1], (0.0, body_length + nose_length)])]
    parts.append(rod((0, 0, -0.5 * radius), (0, 0, 0.05), 0.6 * radius, 0.35 * radius, segments=32))
    half = 0.06 * radius
    for k in range(num_fins):
        fin = hull(
            [(0.8 * radius, s * half, 0.0) for s in (-1, 1)]
            + [(0.8 * radius, s * half, fin_height) for s in (-1, 1)]
            + [(radius + fin_span, s * half, -0.3 * radius) for s in (-1, 1)]
            + [(radius + fin_span, s * half, 0.25 * fin_height) for s in (-1, 1)]
        )
        parts.append(fin.rotate((0.0, 0.0, 360.0 * k / num_fins)))
    for k in range(num_boosters):
        angle = 2 * np.pi * k / num_boosters + np.pi / num_fins
        centre = 1.3 * radius * np.array([np.cos(angle), np.sin(angle), 0.0])
        length = 0.55 * body_length
        parts.append(rod(centre, centre + [0, 0, length], 0.32 * radius, segments=24))
        parts.append(
            rod(
                centre + [0, 0, length],
                centre + [0, 0, length + 0.8 * radius],
                0.32 * radius,
                0.0,
                segments=24,
            )
        )
    return union(parts), {
        "body_length": body_length / radius,
        "nose_shape": nose_shape,
        "num_fins": num_fins,
        "num_boosters": num_boosters,
        "height": (body_length + nose_length) / radius,
    }


def build_car(rng: np.random.Generator) -> tuple[Manifold, Params]:
    body_type = str(rng.choice(["sedan", "hatchback", "van"]))
    length, width = uniform(rng, 3.9, 4.8), uniform(rng, 1.65, 1.9)
    wheel_radius = uniform(rng, 0.3, 0.4)
    body_bottom, body_height = wheel_radius * 0.6, uniform(rng, 0.45, 0.6)
    body_top = body_bottom + body_height
    spoiler = bool(body_type != "van" and rng.random() < 0.3)
    half_l = length / 2
    # Cabin side profile (x along the car, front = +x) extruded across the width by taking a hull.
    if body_type == "sedan":
        roof = uniform(rng, 0.42, 0.52)
        xs = (-0.3 * length, -0.18 * length, 0.1 * length, 0.25 * length)
    elif body_type == "hatchback":
        roof = uniform(rng, 0.45, 0.55)
        xs = (-0.46 * length, -0.42 * length, 0.08 * length, 0.25 * length)
    else:
        roof = uniform(rng, 0.8, 1.0)
        xs = (-0.49 * length, -0.47 * length, 0.22 * length, 0.32 * length)
    cabin_half_w = width * 0.44
    cabin = hull(
        [
            (x, s * cabin_half_w, z)
            for s in (-1, 1)
            for x, z in (
                (xs[0], body_top - 0.05),
                (xs[1], body_top + roof),
                (xs[2], body_top + roof),
                (xs[3], body_top - 0.05),
            )
        ]
    )
    parts = [box((length, width, body_height), (0, 0, body_bottom + body_height / 2)), cabin]
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (half_l - 0.8 * wheel_radius - 0.35), sy * (width / 2 - 0.1)
            parts.append(
                rod((x, y - 0.12, wheel_radius), (x, y + 0.12, wheel_radius), wheel_radius, segments=32)
            )
    if spoiler:
        parts.append(box((0.25, width * 0.9, 0.04), (-half_l + 0.15, 0, body_top + 0.18)))
        for sy in (-1, 1):
            parts.append(box((0.06, 0.06, 0.2), (-half_l + 0.15, sy * width * 0.3, body_top + 0.08)))
    return union(parts), {
        "body_type": body_type,
        "length": length,
        "width": width,
        "wheel_radius": wheel_radius,
        "roof_height": roof,
        "spoiler": spoiler,
    }


def build_airplane(rng: np.random.Generator) -> tuple[Manifold, Params]:
    length, radius = 1.0, uniform(rng, 0.045, 0.065)
    wing_style = str(rng.choice(["straight", "swept"]))
    span, root_chord = uniform(rng, 0.8, 1.15), uniform(rng, 0.14, 0.22)
    tip_chord = root_chord * uniform(rng, 0.35, 0.6)
    sweep = uniform(rng, 0.0, 0.05) if wing_style == "straight" else uniform(rng, 0.18, 0.3)
    num_engines = int(rng.choice([0, 2, 4]))
    half = 0.012
    # Fuselage along x (nose = +x): rounded nose, tail cone.
    profile = [
        (
            radius * np.sqrt(max(0.0, 1 - ((t - 0.1) / 0.1) ** 2))
            if t < 0.1
            else radius
            if t < 0.7
            else radius * (1 - 0.75 * (t - 0.7) / 0.3),
            t * length,
        )
        for t in np.linspace(0, 1, 24)
    ]
    fuselage = revolve([(0.0, 0.0), *profile[1:-1], (0.0, length)], segments=32)
    parts = [fuselage.rotate((0.0, -90.0, 0.0)).translate((length / 2, 0, 0))]

    def wing(
        x_root: float, half_span: float, chord: float, tip: float, sweep_x: float, z: float
    ) -> list[Manifold]:
        halves = []
        for sy in (-1, 1):
            points = [
                (x_root, 0.0, z),
                (x_root - chord, 0.0, z),
                (x_root - sweep_x, sy * half_span, z),
                (x_root - sweep_x - tip, sy * half_span, z),
            ]
            halves.append(hull([(x, y, zz + dz) for x, y, zz in points for dz in (-half, half)]))
        return halves

    wing_x = uniform(rng, 0.05, 0.12)
    parts += wing(wing_x + root_chord / 2, span / 2, root_chord, tip_chord, sweep, -0.3 * radius)
    parts += wing(-0.32, 0.17, 0.11, 0.05, 0.06 if wing_style == "swept" else 0.02, 0.2 * radius)
    parts.append(
        hull(
            [
                (x, s * half, z)
                for s in (-1, 1)
                for x, z in ((-0.5, 0.5 * radius), (-0.36, 0.5 * radius), (-0.47, 0.2), (-0.5, 0.2))
            ]
        )
    )
    if num_engines:
        offsets = [0.33] if num_engines == 2 else [0.24, 0.42]
        for fraction in offsets:
            y_span = fraction * span  # distance from the axis: fraction * 2 of the half span
            x = wing_x + root_chord / 2 - sweep * fraction * 2 + 0.05  # follow the swept leading edge
            for sy in (-1, 1):
                parts.append(
                    rod(
                        (x, sy * y_span, -0.3 * radius - 0.045),
                        (x - 0.13, sy * y_span, -0.3 * radius - 0.045),
                        0.028,
                        segments=20,
                    )
                )
    return union(parts), {
        "wing_style": wing_style,
        "wingspan": span,
        "num_engines": num_engines,
        "sweep": sweep,
    }


def build_house(rng: np.random.Generator) -> tuple[Manifold, Params]:
    width, depth = uniform(rng, 1.0, 1.6), uniform(rng, 0.8, 1.2)
    stories = int(rng.choice([1, 2]))
    wall_height = 0.6 * stories
    roof_type = str(rng.choice(["gabled", "hipped", "flat"], p=[0.45, 0.35, 0.2]))
    roof_height = depth * uniform(rng, 0.35, 0.6)
    chimney = bool(roof_type != "flat" and rng.random() < 0.5)
    overhang = 0.06
    w2, d2 = width / 2 + overhang, depth / 2 + overhang
    parts = [box((width, depth, wall_height), (0, 0, wall_height / 2))]
    if roof_type == "gabled":
        parts.append(
            hull(
                [(sx * w2, sy * d2, wall_height) for sx in (-1, 1) for sy in (-1, 1)]
                + [(sx * w2, 0.0, wall_height + roof_height) for sx in (-1, 1)]
            )
        )
    elif roof_type == "hipped":
        ridge = max(width / 2 - depth / 2, 0.05)
        parts.append(
            hull(
                [(sx * w2, sy * d2, wall_height) for sx in (-1, 1) for sy in (-1, 1)]
                + [(sx * ridge, 0.0, wall_height + roof_height) for sx in (-1, 1)]
            )
        )
    else:
        parts.append(box((width + 0.04, depth + 0.04, 0.08), (0, 0, wall_height + 0.04)))
    if chimney:
        parts.append(
            box(
                (0.12, 0.12, roof_height + 0.2),
                (width * 0.3, depth * 0.18, wall_height + roof_height / 2 + 0.1),
            )
        )
    solid = union(parts)
    # Door and windows are shallow recesses in the front (-y) wall.
    cuts = [box((0.2, 0.08, 0.38), (0, -depth / 2, 0.19))]
    num_windows = int(rng.integers(1, 3)) * 2
    for story in range(stories):
        for k in range(num_windows):
            x = (k + 0.5) / num_windows * width - width / 2
            if abs(x) < 0.18 and story == 0:
                continue
            cuts.append(box((0.16, 0.08, 0.16), (x, -depth / 2, 0.6 * story + 0.36)))
    return solid - union(cuts), {
        "width": width,
        "depth": depth,
        "stories": stories,
        "roof_type": roof_type,
        "chimney": chimney,
        "num_windows": len(cuts) - 1,
    }


MACHINES_AND_BUILDINGS: dict[str, Builder] = {
    "gear": build_gear,
    "rocket": build_rocket,
    "car": build_car,
    "airplane": build_airplane,
    "house": build_house,
}

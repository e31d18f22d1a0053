"""argparse types for numeric options: each checks its value against the range where it means something.

A value outside the range stops the command before any work with argparse's usage line and a message that says
the range (``argument --steps: must be an integer in [1, 1000], got 0``); NaN and infinities are never a valid
float. ``--x nan`` or ``--resolution 3`` would otherwise run and fail later with a message that sends the user
the wrong way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# Seeds go to torch.Generator.manual_seed, which takes unsigned 64-bit values.
SEED_MAX = 2**64 - 1
# Marching-cubes grid of mesh extraction: below 16 cells per axis a shape is a few voxels (and often nothing at
# all); 1024 is already a ~4 GB grid of field values.
RESOLUTION_RANGE = (16, 1024)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """``in [low, high]``, ``in (low, high)``, ``>= low``, ``<= high`` ..."""
    if high is None:
        return f"{'>' if low_open else '>='} {_number(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_number(high)}"
    return f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"


def int_in(low: int | None, high: int | None = None, *, also: tuple[int, ...] = ()) -> Callable[[str], int]:
    """An integer in [low, high] (either end None: unbounded), or one of ``also`` (e.g. 0 = "off")."""
    extra = "".join(f" or {value}" for value in also)
    where = f"an integer {_bounds(low, high)}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {where}{extra}, got {text!r}") from None
        if value in also:
            return value
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {where}{extra}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid <name> value" messages
    return parse


def float_in(
    low: float | None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite float in the range (ends closed unless ``*_open``; None = unbounded on that side)."""
    where = f"a number {_bounds(low, high, low_open, high_open)}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {where}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {where}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed = int_in(0, SEED_MAX)
positive_float = float_in(0.0, low_open=True)
resolution = int_in(*RESOLUTION_RANGE)
fraction = float_in(0.0, 1.0)
EPSILON = float_in(0.0, 0.25, low_open=True)  # voxel size in units of [-1, 1]^3; Dora uses 2/256

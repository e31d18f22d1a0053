"""Markdown and JSON helpers of every results file (Dora-bench, the generation benchmark, the quickstart report).

Convention: a figure is printed with 4 significant digits (``format_figure``; a report may ask for another format
spec, such as the quickstart report's one decimal), after an optional scale factor (the tables print Chamfer x1e3
and say so in their headers); a missing or non-finite value prints as "-". JSON results
hold NaN/inf as null (strict JSON), numpy scalars as Python numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def format_figure(value: Any, factor: float = 1.0, spec: str = ".4g") -> str:
    """``value * factor`` formatted with ``spec`` (4 significant digits by default); "-" for a missing
    (non-numeric) or non-finite value."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return format(value * factor, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: header, separator, one line per row (cells already formatted)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def json_ready(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value

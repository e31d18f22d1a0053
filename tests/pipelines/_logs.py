"""What a command printed that is not ours: the check behind "no foreign warning" in the CLI tests."""

from __future__ import annotations


def foreign_warnings(stderr: str) -> list[str]:
    """Warning lines of stderr that are not ours: transformers' / diffusers' own ("[transformers] ...", their load
    reports), Python warnings ("...Warning: ..."), or logging records of another library than ours."""
    ours = ("dora_shapegen.", "dora")
    found = []
    for line in stderr.splitlines():
        record = line.split(":", 1)[0].split()
        if line.startswith(("[transformers]", "[diffusers]")) or "Warning: " in line or "LOAD REPORT" in line:
            found.append(line)
        elif len(record) == 2 and record[0] in {"WARNING", "ERROR"} and not record[1].startswith(ours):
            found.append(line)
    return found

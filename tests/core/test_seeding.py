"""The seed scheme and the held-out split (dora_shapegen.seeding): stable values, the documented equivalences."""

from __future__ import annotations

import ast
import zlib
from pathlib import Path

import numpy as np
import pytest

from dora_shapegen.seeding import derive_seed, is_held_out, rng, seed_sequence, split_indices


def test_rng_is_default_rng_over_the_keys_with_strings_as_crc32():
    expected = np.random.default_rng([3, zlib.crc32(b"chair"), 7]).random(5)
    assert (rng(3, "chair", 7).random(5) == expected).all()
    assert seed_sequence(3, "chair", 7).entropy == [3, zlib.crc32(b"chair"), 7]


def test_derived_seeds_are_stable_and_distinct():
    # Pinned values: a change here changes every derived draw (procedural shapes, sample noise, ...).
    assert derive_seed(0, "a chair", 0) == 1834754909
    assert derive_seed(7, "chair-0003", 1, "uniform") == 4076386898
    assert len({derive_seed(0, "a chair", index) for index in range(100)}) == 100
    with pytest.raises(ValueError, match=">= 0"):
        derive_seed(-1)


def test_held_out_split_is_a_fixed_property_of_the_shape_id():
    ids = [f"chair-{i:04d}" for i in range(40)]
    train, held = split_indices(ids, 0.1)
    assert held == [0, 8, 20, 23]  # pinned: every held-out figure of the project is measured on this split
    assert sorted(train + held) == list(range(40))
    assert all(is_held_out(ids[i], 0.1) for i in held)
    assert split_indices(ids[:2], 0.0) == ([0, 1], [])
    assert split_indices(["a", "b"], 0.001) in (([0], [1]), ([1], [0]))  # tiny sets keep one of each


# ------------------------------------------------------------------------------------- one way to derive a seed
# The project's code and the benchmark scripts behind docs/RESULTS.md: every seed they derive comes from seeding.py.
ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("core", "data", "vae", "diffusion", "training", "pipelines", "tests/benchmarks")
SEEDING_MODULE = ROOT / "core" / "seeding.py"
# Calls whose argument is a seed (numpy, torch, random, point-cloud-utils) and keywords that carry one.
SEED_SINKS = {"manual_seed", "default_rng", "Random", "SeedSequence", "PCG64", "MT19937", "Philox", "seed"}
SEED_KEYWORDS = {"seed", "random_seed"}
# What derives a seed properly: seeding's functions and the project's thin wrappers over them.
DERIVERS = {"derive_seed", "rng", "seed_sequence", "step_seed", "shape_seed", "_worker_seed"}
ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Mod, ast.Pow, ast.BitXor, ast.BitOr, ast.BitAnd, ast.LShift)


def _sources() -> list[Path]:
    files = [path for folder in SOURCE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50, "the source folders moved: point SOURCE_DIRS at them again"
    return [path for path in files if path != SEEDING_MODULE]


def _name(node: ast.AST) -> str:
    """``x`` of ``x``, ``a.x`` and ``a.x(...)``; '' for anything else."""
    if isinstance(node, ast.Call):
        node = node.func
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _is_hashing(node: ast.AST) -> bool:
    """A call of zlib's checksums, hashlib, Python's ``hash()`` or ``int.from_bytes`` (a digest read as a number)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in ("hash", "crc32", "adler32")
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else ""
        return owner in ("zlib", "hashlib") or (owner == "int" and func.attr == "from_bytes")
    return False


def _derivations_in(expression: ast.AST) -> list[ast.AST]:
    """Arithmetic or hashing inside a seed argument, not looking into calls of the derivers (their keys may be
    computed: ``derive_seed(seed, "shard-samples", epoch + 1)``)."""
    found, stack = [], [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Call) and _name(node) in DERIVERS:
            continue
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ARITHMETIC)) or _is_hashing(node):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _seed_derivations(tree: ast.AST) -> list[tuple[int, str]]:
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (_is_hashing(node) and _name(node) in ("hash", "crc32", "adler32")):
            problems.append((node.lineno, "a CRC / hash() outside seeding.py"))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ARITHMETIC):
            if any("seed" in _name(side).lower() for side in (node.left, node.right)):
                problems.append((node.lineno, "arithmetic on a seed"))
        if isinstance(node, ast.Call):
            arguments = [k.value for k in node.keywords if k.arg in SEED_KEYWORDS]
            if _name(node) in SEED_SINKS and node.args:
                arguments.append(node.args[0])
            problems += [(d.lineno, "a seed computed by hand") for a in arguments for d in _derivations_in(a)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "seed" in node.name.lower():
            problems += [(d.lineno, f"{node.name}() hashes") for d in ast.walk(node) if _is_hashing(d)]
    return problems


def test_no_module_derives_a_seed_of_its_own():
    found = []
    for path in _sources():
        found += [
            f"{path.relative_to(ROOT)}:{line}: {what}"
            for line, what in _seed_derivations(ast.parse(path.read_text()))
        ]
    assert not found, "derive seeds with dora_shapegen.seeding (derive_seed / rng):\n" + "\n".join(
        sorted(set(found))
    )


@pytest.mark.parametrize(
    "snippet",
    [
        "generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)",
        "random.Random(seed * 1_000_003 + epoch).shuffle(urls)",
        "rng = np.random.default_rng(seed + 1)",
        "pcu.sample_mesh_random(v, f, n, random_seed=seed + 1)",
        "process(mesh, seed=config.seed + index)",
        "manual_seed(1000 * start + chunk[0][2])",
        "def shape_seed(seed, shape_id):\n    return zlib.crc32(f'{seed}:{shape_id}'.encode())",
        "def stable_seed(*parts):\n    return int.from_bytes(hashlib.sha256(b'/'.join(parts)).digest()[:8], 'little')",
        "def _worker_seed(seed, epoch):\n    return hash((seed, epoch)) & 0x7FFFFFFF",
    ],
)
def test_the_source_check_catches_each_old_convention(snippet):
    assert _seed_derivations(ast.parse(snippet))


def test_the_source_check_leaves_other_hashing_and_seeding_calls_alone():
    fine = """
digest = hashlib.sha256(data).hexdigest()            # a shard's checksum
key = hashlib.sha1(shape_id.encode()).hexdigest()[:8]
generator = torch.Generator().manual_seed(derive_seed(seed, "shard-samples", epoch + 1, rank))
rng = seeding.rng(seed, "bench-reference-cloud", len(shapes))
SEED_MAX = 2**64 - 1
generator = torch.Generator().manual_seed(self.step_seed("train-step", micro))
"""
    assert _seed_derivations(ast.parse(fine)) == []


def _purposes() -> dict[str, set[str]]:
    """Each string literal given as a key to a deriver -> the modules that use it."""
    used: dict[str, set[str]] = {}
    for path in [*_sources(), SEEDING_MODULE]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _name(node) in DERIVERS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        used.setdefault(arg.value, set()).add(str(path.relative_to(ROOT)))
    return used


def test_each_purpose_belongs_to_one_module_and_purposes_never_share_a_stream():
    used = _purposes()
    assert {"prepare-shape", "train-step", "vae-epoch-order", "dit-epoch-order", "shard-order"} <= set(used)
    shared = {purpose: modules for purpose, modules in used.items() if len(modules) > 1}
    assert not shared, f"one purpose string used by several modules: {shared}"
    # Purposes enter as their CRC-32: distinct strings must stay distinct keys, so distinct streams.
    assert len({zlib.crc32(p.encode()) for p in used}) == len(used)
    assert len({derive_seed(0, purpose, 0) for purpose in used}) == len(used)
    # Documented in seeding.py's list of purposes.
    documented = SEEDING_MODULE.read_text()
    assert [p for p in used if f'"{p}"' not in documented] == []

"""YAML run configs loaded into dataclasses.

Every stage keeps its run options in a dataclass; the YAML file (with its ``base:`` chain, see :func:`load_yaml`)
is the single source of truth for a run, and the complete, resolved config is stored next to every checkpoint. A
``model:`` section is passed unchanged to the model's constructor, so it stays a plain dict here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dora_shapegen.errors import ConfigError

T = TypeVar("T")

# The shipped configs: package data of dora_shapegen.configs, in a wheel install as in a checkout (an installed
# package is a folder on disk, so the resource is a real path that can be listed and copied).
CONFIG_DIR = Path(str(importlib.resources.files("dora_shapegen.configs")))


def resolve_config_path(path: str | Path) -> Path:
    """A config file or folder: the path as given when it exists, else the shipped one of that name.

    A shipped config can be named as in the repository (``configs/vae/small.yaml``) or inside the configs folder
    (``vae/small.yaml``); so a default such as ``configs/quickstart`` works from any folder, and a user's own
    file at that path, when there is one, wins.
    """
    candidate = Path(path)
    if candidate.exists():
        return candidate
    if not candidate.is_absolute():
        inside = Path(*candidate.parts[1:]) if candidate.parts[:1] == ("configs",) else candidate
        if inside.parts and (CONFIG_DIR / inside).exists():
            return CONFIG_DIR / inside
    raise FileNotFoundError(
        f"config file not found: {path} (also looked among the shipped configs, {CONFIG_DIR})"
    )


# A config may start from another: ``base: ../vae/small.yaml`` plus the keys that differ.
BASE_KEY = "base"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """yaml's multi-line report as one phrase: what is wrong and where (1-based line and column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, with its ``base:`` chain resolved (what a run actually uses).

    ``base: OTHER.yaml`` (a top-level key) loads OTHER first, then this file's keys override it: mappings merge key
    by key at every depth (``training: {max_steps: 560}`` changes that one key), anything else (numbers, strings,
    lists such as ``schedule.phases``) is replaced whole. OTHER is found relative to this file's folder, else among
    the shipped configs (leading ``../`` dropped), so a copied config folder still finds its bases. Bases may have
    bases; a loop is an error. The result holds no ``base`` key: stored run configs are complete. A broken file is
    a ConfigError naming the file, line and column.
    """
    return _load_chain(resolve_config_path(path), ())


def _read_mapping(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        try:
            content = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from error
    if not isinstance(content, dict):
        raise ConfigError(
            f"{path}: a config file must hold a mapping at the top level, got {type(content).__name__}"
        )
    return content


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"config bases form a loop: {chain}")
    content = _read_mapping(path)
    base = content.pop(BASE_KEY, None)
    if base is None:
        return content
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: '{BASE_KEY}' must name a config file, got {base!r}")
    return merge_configs(_load_chain(_base_path(path, base), (*seen, path.resolve())), content)


def _base_path(path: Path, base: str) -> Path:
    beside = path.parent / base
    if beside.exists():
        return beside
    parts = Path(base).parts
    while parts and parts[0] in ("..", "."):
        parts = parts[1:]
    try:
        return resolve_config_path(Path(*parts)) if parts else resolve_config_path(base)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: base config {base} not found beside it ({beside}) nor among the shipped configs"
        ) from None


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: nested mappings merged key by key, other values replaced (new dicts)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls) and isinstance(value, dict):
        return from_dict(cls, value, where)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(cls):
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return from_dict(option, value, where)
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys are an error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        guesses = {key: difflib.get_close_matches(str(key), names, n=1) for key in unknown}
        guesses = {key: guess[0] for key, guess in guesses.items() if guess}
        if len(unknown) == 1 and guesses:
            hint = f" (did you mean {next(iter(guesses.values()))!r}?)"
        elif guesses:
            hint = " (did you mean " + ", ".join(f"{v!r} for {k!r}" for k, v in guesses.items()) + "?)"
        else:
            hint = ""
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}{hint}; allowed: {sorted(names)}"
        )
    kwargs = {key: _build(hints[key], value, f"{where}.{key}") for key, value in values.items()}
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load YAML ``path`` into dataclass ``cls``; ``overrides`` (dotted keys) win over the file."""
    values = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(cls, values, str(path))


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain data, fit for YAML/JSON (stored beside every checkpoint)."""
    return dataclasses.asdict(config)


def save_yaml(values: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)

"""Progressive token-count schedule of both training stages: the schedule is data (a config section), not code.

Dora trains its VAE with short latent sequences first and shifts toward long ones (256 -> ... -> 4096 tokens); the
DiT trains on FPS prefixes of the cached latents with the same schedule. Two forms:

* ``phases``: a list of ``{until_step, tokens, probs}``; the first phase whose ``until_step`` is above the current
  step is used (``until_step: null`` = open-ended last phase); ``probs`` default to uniform over ``tokens``.
* ``mixture``: ``{tokens, start_probs, end_probs, ramp_steps}``; the probabilities move linearly from
  ``start_probs`` to ``end_probs`` over ``ramp_steps`` steps, then stay at ``end_probs``.

The token count of a step is drawn from a generator seeded by ``(seed, step)`` only, so every rank of a multi-process
run draws the same count (tensor shapes must match across processes for DDP) and a resumed run draws the same counts
as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dora_shapegen import seeding
from dora_shapegen.errors import ConfigError


@dataclass
class ScheduleConfig:
    """The ``schedule:`` section of a run config (`dora train-vae` and `dora train-dit`)."""

    phases: list[dict[str, Any]] = field(default_factory=lambda: [{"until_step": None, "tokens": [256]}])
    mixture: dict[str, Any] | None = None  # when set, replaces ``phases``


def _normalised(probs: list[float] | None, count: int, where: str) -> np.ndarray:
    if probs is None:
        return np.full(count, 1.0 / count)
    values = np.asarray(probs, dtype=np.float64)
    if values.shape != (count,) or (values < 0).any() or values.sum() <= 0:
        raise ConfigError(
            f"{where}: probs must be {count} non-negative numbers with a positive sum, got {probs}"
        )
    return values / values.sum()


class TokenSchedule:
    """Token counts and their probabilities per training step, built from a :class:`ScheduleConfig`."""

    def __init__(self, config: ScheduleConfig, seed: int = 0) -> None:
        self.seed = int(seed)
        self.mixture = None
        if config.mixture is not None:
            mix = dict(config.mixture)
            unknown = sorted(set(mix) - {"tokens", "start_probs", "end_probs", "ramp_steps"})
            if unknown:
                raise ConfigError(f"schedule.mixture: unknown key(s) {unknown}")
            tokens = [int(t) for t in mix["tokens"]]
            self.mixture = (
                tokens,
                _normalised(mix.get("start_probs"), len(tokens), "schedule.mixture.start_probs"),
                _normalised(mix.get("end_probs"), len(tokens), "schedule.mixture.end_probs"),
                max(int(mix.get("ramp_steps", 1)), 1),
            )
        self.phases: list[tuple[int | None, list[int], np.ndarray]] = []
        for index, phase in enumerate(config.phases or []):
            where = f"schedule.phases[{index}]"
            unknown = sorted(set(phase) - {"until_step", "tokens", "probs"})
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: until_step, tokens, probs")
            if not phase.get("tokens"):
                raise ConfigError(f"{where}: 'tokens' must be a non-empty list of token counts")
            tokens = [int(t) for t in phase["tokens"]]
            until = phase.get("until_step")
            self.phases.append(
                (
                    None if until is None else int(until),
                    tokens,
                    _normalised(phase.get("probs"), len(tokens), where),
                )
            )
        if self.mixture is None and not self.phases:
            raise ConfigError("schedule: give either 'phases' or 'mixture'")
        bounds = [until for until, _, _ in self.phases if until is not None]
        if bounds != sorted(bounds):
            raise ConfigError(f"schedule.phases: until_step values must increase, got {bounds}")

    def distribution(self, step: int) -> tuple[list[int], np.ndarray]:
        """The token counts allowed at ``step`` and their probabilities."""
        if self.mixture is not None:
            tokens, start, end, ramp = self.mixture
            alpha = min(max(step, 0) / ramp, 1.0)
            probs = (1.0 - alpha) * start + alpha * end
            return tokens, probs / probs.sum()
        for until, tokens, probs in self.phases:
            if until is None or step < until:
                return tokens, probs
        _, tokens, probs = self.phases[-1]  # past the last bound: keep the last phase
        return tokens, probs

    def sample(self, step: int) -> int:
        """The token count of ``step``: a pure function of (seed, step), identical on every rank."""
        tokens, probs = self.distribution(step)
        rng = seeding.rng(self.seed, int(step))
        return int(tokens[int(rng.choice(len(tokens), p=probs))])

    @property
    def max_tokens(self) -> int:
        pools = [tokens for _, tokens, _ in self.phases] + ([self.mixture[0]] if self.mixture else [])
        return max(max(tokens) for tokens in pools)

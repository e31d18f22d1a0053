"""Token-length schedules (training/schedules.py, used by both training stages): phases, a mixture shifting toward
long sequences, draws that depend only on (seed, step), and clear errors for bad configs."""

from __future__ import annotations

import numpy as np
import pytest

from dora_shapegen.training.schedules import ScheduleConfig, TokenSchedule


def test_schedule_follows_phases_and_is_rank_independent():
    config = ScheduleConfig(
        phases=[
            {"until_step": 10, "tokens": [256]},
            {"until_step": 20, "tokens": [256, 512], "probs": [0.25, 0.75]},
            {"until_step": None, "tokens": [1024]},
        ]
    )
    schedule = TokenSchedule(config, seed=3)
    assert {schedule.sample(step) for step in range(10)} == {256}
    draws = np.array(
        [schedule.sample(step) for step in range(10, 20)]
        + [TokenSchedule(config, seed=s).sample(15) for s in range(400)]
    )
    assert set(draws) == {256, 512}
    assert abs((draws == 512).mean() - 0.75) < 0.08
    assert {schedule.sample(step) for step in range(20, 40)} == {1024}
    # Same (seed, step) -> same count: what keeps tensor shapes equal on every rank and across a resume.
    assert [schedule.sample(s) for s in range(50)] == [
        TokenSchedule(config, seed=3).sample(s) for s in range(50)
    ]
    assert schedule.max_tokens == 1024


def test_schedule_mixture_shifts_toward_long_sequences():
    schedule = TokenSchedule(
        ScheduleConfig(
            mixture={"tokens": [256, 2048], "start_probs": [1, 0], "end_probs": [0.1, 0.9], "ramp_steps": 100}
        )
    )
    assert schedule.distribution(0)[1].tolist() == [1.0, 0.0]
    assert schedule.distribution(50)[1] == pytest.approx([0.55, 0.45])
    assert schedule.distribution(500)[1] == pytest.approx([0.1, 0.9])
    late = [schedule.sample(s) for s in range(1000, 1400)]
    assert 0.82 < np.mean(np.array(late) == 2048) < 0.97


def test_schedule_rejects_bad_config():
    with pytest.raises(ValueError, match="probs"):
        TokenSchedule(ScheduleConfig(phases=[{"until_step": None, "tokens": [256, 512], "probs": [1.0]}]))
    with pytest.raises(ValueError, match="unknown"):
        TokenSchedule(ScheduleConfig(phases=[{"until": 5, "tokens": [256]}]))
    with pytest.raises(ValueError, match="increase"):
        TokenSchedule(
            ScheduleConfig(phases=[{"until_step": 9, "tokens": [8]}, {"until_step": 3, "tokens": [8]}])
        )

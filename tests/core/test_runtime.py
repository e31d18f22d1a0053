"""Process-wide settings of entry points: OpenMP's wait policy follows whether other work shares the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dora_shapegen import runtime


@pytest.fixture
def no_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


def test_free_cores_keep_openmps_spinning_default(no_policy, monkeypatch):
    monkeypatch.setattr(runtime, "other_runnable_tasks", lambda: 0)
    assert runtime.omp_wait_policy_environment() == {}


def test_busy_cores_make_idle_workers_sleep(no_policy, monkeypatch):
    monkeypatch.setattr(runtime, "other_runnable_tasks", lambda: 1)  # one other task on 2 cores
    assert runtime.omp_wait_policy_environment() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert runtime.omp_wait_policy_environment() == {}  # 1 task beside us on 8 cores: still free
    monkeypatch.setattr(runtime, "other_runnable_tasks", lambda: 4)
    assert runtime.omp_wait_policy_environment() == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_no_proc_loadavg_leaves_the_default(no_policy, monkeypatch):
    monkeypatch.setattr(runtime, "other_runnable_tasks", lambda: None)
    assert runtime.omp_wait_policy_environment() == {}


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(runtime, "other_runnable_tasks", lambda: 99)
    assert runtime.omp_wait_policy_environment() == {}


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux's /proc/loadavg")
def test_runnable_tasks_count_a_busy_sibling():
    """A process spinning beside us is counted (the reader itself is not)."""
    idle = runtime.other_runnable_tasks()
    assert idle is not None and idle >= 0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        counts = [runtime.other_runnable_tasks(samples=5, interval_s=0.05) for _ in range(3)]
    finally:
        spinner.kill()
        spinner.wait()
    assert max(counts) >= 1


def test_entry_points_apply_it_before_torch_loads():
    """`dora` and the training modules choose the policy before anything imports torch (OpenMP reads it once)."""
    code = (
        "import sys; import dora_shapegen.pipelines.apps.cli, dora_shapegen.runtime; "
        "print('torch' in sys.modules)"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"

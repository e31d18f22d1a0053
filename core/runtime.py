"""Process-wide settings that every entry point (`dora`, `python -m ...`, torchrun / accelerate launch) applies."""

from __future__ import annotations


def flush_denormals() -> bool:
    """Flush denormal floats to zero, process-wide: call it from an entry point, never from a model constructor.

    Local attention's distance terms drive most attention weights far below 1e-38; x86 CPUs handle such denormal
    floats in microcode, which made the attention backward ~6x slower on the CPU. Flushing them to zero changes
    no result that matters, and is a no-op where the CPU does not support it (then it returns False).
    """
    import torch

    return torch.set_flush_denormal(True)


def other_runnable_tasks(samples: int = 5, interval_s: float = 0.02) -> int | None:
    """How many runnable tasks besides this one the kernel reports right now (the median of a few reads of
    /proc/loadavg's "running/total" field, which counts the reading task itself); None where there is no
    /proc/loadavg (not Linux)."""
    import statistics
    import time

    counts = []
    for index in range(samples):
        try:
            with open("/proc/loadavg") as handle:
                running = int(handle.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - 1))
        if index + 1 < samples:
            time.sleep(interval_s)
    return int(statistics.median(counts))


def omp_wait_policy_environment() -> dict[str, str]:
    """How idle OpenMP workers should wait, as environment to apply before torch loads OpenMP: an entry point does
    ``os.environ.update(omp_wait_policy_environment())`` first thing.

    Spinning workers (OpenMP's default) are fastest on free cores but stall each other at every op when other work
    shares the cores: the quickstart's VAE step took 10-14 s instead of ~1 s on 2 cores with a test suite beside
    it, and a DiT step of batch 32 12-19 s instead of 0.3 s, with PASSIVE (sleeping workers) restoring both. On
    free cores PASSIVE costs time instead: 60 quickstart DiT steps took 64 s vs 48 s with ACTIVE, 60 VAE steps 74 s vs
    66 s (2 free cores). So: PASSIVE when other tasks are runnable as this process starts (at least half as many as
    the cores it may use), else nothing (OpenMP's default, which spins a while before it sleeps). A user's
    OMP_WAIT_POLICY always wins.
    """
    import os

    if "OMP_WAIT_POLICY" in os.environ:
        return {}
    others = other_runnable_tasks()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if others is not None and others >= max(1, cores // 2):
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}

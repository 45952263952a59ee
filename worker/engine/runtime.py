"""Process-level torch settings the worker applies: CPU threads matched to the cores it may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads`` (None: ``available_cores()``); returns the count.

    Call once per worker process, before the first job (torch otherwise uses every
    core of the machine, which oversubscribes a container with a CPU quota). Inter-op
    threads are set to the same count where torch still allows it (only before the
    first parallel op). A single job can also set its own count with
    ``RunInputs.num_threads``.
    """
    n = available_cores() if num_threads is None else int(num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already started: torch allows setting it once, before any inter-op work
        pass
    return n

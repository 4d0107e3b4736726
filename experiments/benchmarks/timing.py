"""Timing helpers shared by the benchmarks: every clock read waits for the device's queued work,
so a CUDA kernel launched before the read is counted where it ran, not where it was launched."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocks(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds, after the device's queued work has finished."""
    synchronize(device)
    return time.perf_counter(), time.process_time()


def timed(function: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Wall seconds per call of ``function`` over ``repeats`` calls, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats

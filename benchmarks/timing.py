"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` seconds for ``fn`` after one untimed call, with device syncs around each."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def round_robin(
    fns: Sequence[Callable[[], Any]], device: torch.device, repeats: int, *, warm_up: bool = True
) -> list[list[float]]:
    """The seconds of each of ``repeats`` runs of every one of ``fns``, run in turns (so that load
    from other processes falls on all of them alike), with device syncs around each; after one
    untimed call of each unless ``warm_up`` is False."""
    if warm_up:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seen in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            seen.append(time.perf_counter() - t0)
    return times

"""Shared timing helpers: medians of repeated runs, and the memory-bandwidth floor."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn()`` (``setup()`` runs untimed before each call)."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(cases: dict[str, Callable[[], object]], rounds: int = 9, warmup: int = 2) -> dict[str, list[float]]:
    """Wall times of each case over ``rounds`` rounds, every round running every case once in
    turn, so that drifting machine load falls on all cases alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + rounds):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured bytes/s of a large copy (a read and a write of every byte)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=5)
    return 2 * nbytes / seconds


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (124M parameters, 148 tensors)."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]

"""Shared helpers for the benchmarks: timing in turns with warm-up and repeats, ratios per turn, the
matrix-multiply share of a step, and the hardware line."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable

import torch

OPS = {  # groups of profiler events, by a part of their names
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"),
    "softmax_loss": ("softmax", "nll_loss"),
}


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Time several functions in turns (a, b, a, b, ...) so that drifts of the machine hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timeit(fn, repeats=1, warmup=0)
    return times


def ratios(reference: list[float], ours: list[float]) -> dict[str, float]:
    """``reference / ours`` of the times of each turn of :func:`interleaved`: their median and their minimum."""
    per_turn = [r / o for r, o in zip(reference, ours)]
    return {"median": statistics.median(per_turn), "min": min(per_turn)}


def ratio_text(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.2f}x (min {ratio['min']:.2f}x)"


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def op_seconds(fn: Callable[[], object], repeats: int = 2) -> dict[str, float]:
    """Seconds one call of ``fn`` spends in each group of :data:`OPS` (torch profiler, self CPU time; the
    least over ``repeats`` profiled calls)."""
    from torch.profiler import profile

    seconds = {group: [] for group in OPS}
    for _ in range(repeats):
        with profile() as prof:
            fn()
        events = prof.key_averages()
        for group, names in OPS.items():
            seconds[group].append(sum(e.self_cpu_time_total for e in events if any(n in e.key for n in names)) / 1e6)
    return {group: min(values) for group, values in seconds.items()}


def hardware(device: str = "cpu") -> str:
    """The machine a measurement ran on: the GPU's name for ``"cuda"``, else the CPU's, with torch's threads."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''}"


def environment(device: str = "cpu") -> dict[str, str]:
    """Where and when a part ran: stored with its results and printed above its section."""
    import transformers

    return {"date": datetime.date.today().isoformat(), "hardware": hardware(device), "torch": torch.__version__,
            "transformers": transformers.__version__}

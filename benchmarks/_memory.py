"""Peak-memory measurement of one call, shared by the memory benchmarks.

Not a benchmark itself: ``bench_memory.py`` and ``bench_unroll.py`` import it. On CPU the
peak is the growth of the resident set during the call: the kernel's peak-RSS mark
(``VmHWM``) is reset to the current RSS just before it (``echo 5 > /proc/self/clear_refs``)
and read after it; where the reset is not allowed it falls back to ``ru_maxrss``, which only
sees growth past the process's earlier peak (the result says which). Run the measuring
process with :func:`child_env`: a fixed glibc mmap threshold makes big tensors mmapped, so
freed ones go back to the OS and RSS follows live memory. ``tracemalloc`` does not see
torch's allocations, and torch keeps no CPU allocator statistics. On CUDA the peak is
``torch.cuda.max_memory_allocated()`` minus the allocation before the call (exact).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

MiB = 2.0**20


def child_env() -> dict[str, str]:
    """The environment for a measuring subprocess (fixed mmap threshold)."""
    env = dict(os.environ)
    # A fixed threshold turns off glibc's dynamic one: big tensors are mmapped and returned.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    return env


def _status_kib(*fields: str) -> list[int | None]:
    """Fields of ``/proc/self/status`` in KiB, read at one instant (one read of the file)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return [None] * len(fields)
    values = {line.split(":")[0]: line.split() for line in lines}
    return [int(values[f][1]) if f in values else None for f in fields]


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    # Both from one read: two reads can straddle an allocation and disagree.
    hwm, rss = _status_kib("VmHWM", "VmRSS")
    return hwm is not None and hwm == rss


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_peak(fn: Callable[[], None], device: torch.device) -> dict[str, object]:
    """Run ``fn`` once and return its peak memory growth (bytes), the method and seconds.

    Call it after a warm-up call of ``fn`` in the same process, so that one-time
    allocations (thread pools, kernels' scratch space) are not counted.
    """
    gc.collect()
    _malloc_trim()
    result: dict[str, object] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        result["seconds"] = time.perf_counter() - start
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        result["method"] = "cuda max_memory_allocated"
        return result
    rss = (_status_kib("VmRSS")[0] or 0) * 1024
    exact = _reset_peak_rss()
    before = rss if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    fn()
    result["seconds"] = time.perf_counter() - start
    if exact:
        peak = (_status_kib("VmHWM")[0] or 0) * 1024
        result["method"] = "VmHWM after reset"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["method"] = "ru_maxrss delta (only growth past the earlier peak)"
    result["peak_bytes"] = peak - before
    result["rss_before_bytes"] = rss
    return result

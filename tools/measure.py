"""The timing and memory helpers every benchmark in tools/ uses.

    from measure import peak_rss_during, rss_bytes, timed

(`python tools/X.py` puts tools/ first on sys.path, from any working directory.)
"""

from __future__ import annotations

import ctypes
import functools
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], Any],
    repeats: int,
    device: str | torch.device = "cpu",
    warmup: int = 0,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> tuple[float, Any]:
    """(statistic of `repeats` timed calls in seconds, the last call's result), after
    `warmup` untimed calls (kernel selection, caches); each call is bracketed by a
    CUDA sync on a CUDA device."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistic(times), result


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_during(fn: Callable[[], Any], probe: Callable[[], int]) -> tuple[int, Any]:
    """Run fn while a thread samples `probe` every 0.2 ms (torch ops release the
    GIL); return the highest sample and fn's result."""
    peak, done = [probe()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], probe())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], probe()), result


def peak_rss_during(fn: Callable[[], Any]) -> tuple[int, Any]:
    """The highest resident set size while fn runs, and fn's result."""
    return peak_during(fn, rss_bytes)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def heap_bytes() -> int:
    """Bytes this process has malloc'd and not freed (glibc's mallinfo2: arena blocks
    in use plus mmap'd blocks), the CPU's counterpart of CUDA's memory_allocated: what
    tensors hold, without the runtime's code and the allocator's retained pages."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2]:
    """glibc's mallinfo2, loaded once (the sampler calls it in a tight loop)."""
    function = ctypes.CDLL("libc.so.6").mallinfo2
    function.restype = _MallInfo2
    return function


def peak_heap_during(fn: Callable[[], Any]) -> tuple[int, Any]:
    """The highest `heap_bytes` while fn runs, and fn's result."""
    return peak_during(fn, heap_bytes)

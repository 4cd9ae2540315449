"""Process-wide settings for a long mmdx job (the CLI and the benchmark harness call `tune_malloc`).

glibc's malloc hands memory back to the kernel eagerly. Above its mmap threshold a buffer is mapped
on each allocation and unmapped on each free, and freed heap space above the trim threshold is
returned at once. A CNN allocates activation buffers of several MB per layer for every batch, so
each batch faults every page in again. `mmdx predict` on HAM10000 validation (EfficientNet-Lite0,
2 cores) spent 13 of its 40 CPU-seconds in the kernel on 3.6 M page faults. With the settings below
it used 2.7 s, and the run took about 17.5 s instead of 24.5 (measured side by side, 2026-12-01).
Buffers above 32 MB are still mapped each time: ResNet-18 at batch 64 gains less (BENCHMARKS.md,
throughput: the `MMDX_MALLOC=default` row against `mmdx predict end to end`).

The cost is memory held rather than returned: up to the trim threshold of free heap stays with the
process. A user who sets any MALLOC_* variable keeps their own settings. MMDX_MALLOC=default turns
this off.
"""
from __future__ import annotations

import os
import sys

# mallopt(3) parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum: buffers up to 32 MB come from the heap
             (_M_TRIM_THRESHOLD, 1 << 30),  # keep up to 1 GB of freed heap instead of returning it
             (_M_TOP_PAD, 256 << 20))  # grow the heap in large steps
_USER_KNOBS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_",
               "MALLOC_ARENA_MAX", "LD_PRELOAD")


def tune_malloc() -> bool:
    """Keep freed memory for reuse (glibc only; a no-op elsewhere). True when the settings were applied."""
    if os.environ.get("MMDX_MALLOC", "").lower() == "default" or any(k in os.environ for k in _USER_KNOBS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(k, v) == 1 for k, v in _SETTINGS)
    except (OSError, ValueError, AttributeError):  # not glibc, or no confstr name on this platform
        return False

"""Process-wide settings: what the dependencies may do (`contain`, run when `multimodal` is imported)
and how a long mmdx job allocates memory (`tune_malloc`: the CLI and the benchmark harness call it).

`contain` is the egress rule. Dependencies read their switches from the environment once, when they
load, so they are set here, before anything under `multimodal` can import them:
- telemetry off, always (a user's own `0` is overridden: a medical tool may not call home). ONNX
  Runtime's uploader is native code that `onnxruntime.disable_telemetry_events()` does not stop;
  only ORT_DISABLE_TELEMETRY, seen before the library loads, keeps it from starting, and with it the
  device id and event queue it keeps under ~/.cache.
- the files a dependency keeps under $HOME go into mmdx's cache folder (`cache_root`) instead, unless
  the user named a place for them. The hub itself stays reachable: a hub model that a config names is
  still downloaded (into that folder), only the usage pings are off.

`tune_malloc`:

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

import logging
import os
import sys
from pathlib import Path

# Each dependency's own telemetry switch, and the cross-tool DO_NOT_TRACK convention for any other.
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1",  # ONNX Runtime (predict --onnx, export)
                 "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub, and transformers and timm through it
                 "HF_XET_TELEMETRY_ENABLED": "0",  # hf_xet's transfer reports, when the hub downloads a model
                 "RAY_USAGE_STATS_ENABLED": "0",  # Ray's usage reports (predict --engine ray's local cluster)
                 "RAY_USAGE_STATS_PROMPT_ENABLED": "0",  # and its prompt asking to turn them on
                 "FLWR_TELEMETRY_ENABLED": "0",  # Flower's usage events (mmdx federate), read when flwr loads
                 "DO_NOT_TRACK": "1"}
# Where a dependency would write under $HOME → a folder of mmdx's cache. The variable is set only if
# neither it nor a variable the library prefers (the names after it) is set by the user.
CACHES = (("MPLCONFIGDIR", "matplotlib", ()),  # matplotlib's font cache (evaluate and explain plots)
          ("TORCH_HOME", "torch", ()),  # torch.hub downloads (timm's URL-hosted weights)
          ("TORCHINDUCTOR_CACHE_DIR", "torchinductor", ()),  # torch makes it at import (else in the temp folder)
          ("CUDA_CACHE_PATH", "nv", ()),  # the NVIDIA driver's JIT cache, on a GPU the wheels lack code for
          ("HF_HUB_CACHE", "huggingface/hub", ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")),
          ("HF_ASSETS_CACHE", "huggingface/assets", ("HF_HOME", "HUGGINGFACE_ASSETS_CACHE")),
          ("HF_XET_CACHE", "huggingface/xet", ("HF_HOME",)),
          ("HF_MODULES_CACHE", "huggingface/modules", ("HF_HOME",)),
          ("FLWR_HOME", "flwr", ()))  # Flower's folder (mmdx federate makes ~/.flwr/source otherwise)


def cache_root() -> Path:
    """The one folder mmdx writes outside the paths a command is given: MMDX_CACHE, else ~/.cache/mmdx.
    Not created here: each user of it creates its own subfolder when it first writes."""
    return Path(os.environ.get("MMDX_CACHE") or Path.home() / ".cache" / "mmdx")


def contain() -> None:
    """Telemetry off and dependency caches into `cache_root`, for this process and its children. Runs
    at import of `multimodal`; idempotent. A dependency imported before it read its switches already:
    the hub's is set on the loaded module, ONNX Runtime's cannot be, so that case is logged."""
    ort_was_off = os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
    os.environ.update(TELEMETRY_OFF)
    root = cache_root()
    for var, sub, preferred in CACHES:
        if not any(os.environ.get(v) for v in (var, *preferred)):
            os.environ[var] = str(root / sub)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_DISABLE_TELEMETRY = True  # read at each request, so this still takes effect
    if "onnxruntime" in sys.modules and not ort_was_off:
        logging.getLogger(__name__).warning(
            "onnxruntime was imported before multimodal, so its telemetry is on for this process; "
            "import multimodal first, or set ORT_DISABLE_TELEMETRY=1")


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


def available_memory(device=None) -> int:
    """Bytes a job may still allocate on `device` before it is killed or fails: on CUDA the driver's free
    memory; on the CPU the kernel's MemAvailable, less where a cgroup (a container, a batch scheduler's
    job) caps the process lower, since that cap is where the OOM killer strikes without a word."""
    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(cap) - used)
    except (OSError, ValueError):
        pass
    return max(int(free), 0)

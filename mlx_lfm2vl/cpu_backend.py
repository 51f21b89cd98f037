"""Process settings for MLX's CPU backend on Linux.

MLX's CPU allocator keeps no cache of freed buffers: every large temporary (an attention score
matrix, an MLP activation) is a fresh `malloc`, which glibc serves with a fresh `mmap` above its
mmap threshold (at most 32 MiB, 128 KiB to start), so the kernel must page-fault every 4 KiB page
of it in again. Measured here, that costs ~0.6 ms per MiB: multiplying a 48 MiB array by 2 takes
31 ms, of which 28 ms are page faults. Raising glibc's mmap and trim thresholds makes freed
memory stay with the process and be reused (the same multiply: 3.5 ms).

The price: the process keeps up to `_TRIM_THRESHOLD` of freed memory instead of returning it to
the system at once. `load()` applies this when the model computes on the CPU; set
MLX_LFM2VL_KEEP_FREED_MEMORY=0 to leave the allocator alone. It is process-wide, so other MLX
code in the same process (another library's model) benefits too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Larger than any temporary of these models (the biggest are attention scores, ~60 MiB per
# block of queries), smaller than the largest weights, which should go back when unloaded.
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 512 << 20


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above; True if it took effect (Linux with glibc only)."""
    if os.environ.get("MLX_LFM2VL_KEEP_FREED_MEMORY", "1") == "0" or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # One arena: MLX allocates on its stream threads, and a thread's own arena lives in 64 MiB
    # heaps that cannot hold these buffers, so glibc would mmap them whatever the threshold.
    settings = [
        (_M_ARENA_MAX, 1),
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
    ]
    return all([mallopt(option, value) for option, value in settings])

"""glibc malloc settings for training on a CPU: keep freed memory for reuse instead of handing it back.

A CPU training step allocates and frees its activations (MBs each) over and over. By default glibc maps the large
ones with mmap and unmaps them on free, and trims the heap as it shrinks, so every step faults its pages in again:
8.5 M minor page faults and 15-18 s of kernel time in a 6-epoch CPU-scale training, loader workers included
(benchmarks/results/cpu-memory-2026-12-05.txt: 1.0 M and 5-6 s with these settings, epochs 0.90x). With the mmap
threshold at glibc's maximum (32 MiB) and no trimming below 1 GiB, the pages stay mapped and are reused. Tensors
above 32 MiB are still mapped per allocation; the process keeps up to 1 GiB of freed heap (its RSS does not shrink
back after a peak). Elsewhere than glibc (macOS, musl) nothing changes. ``MEDSEQFT_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "MEDSEQFT_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` to this process (and the loader workers it forks later); False where it cannot."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)

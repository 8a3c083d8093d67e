"""Keep the scorer's freed host memory for its next evaluation (glibc malloc settings).

A CPU evaluation allocates and frees the same activations for every candidate (170-210 MiB per candidate of
the digits CM demo at 2,000 samples). With glibc's defaults, a block above the mmap threshold (128 KiB at
first, raised by glibc as blocks are freed, up to 32 MiB) is mapped and unmapped around each use, and free
memory at the top of the heap beyond the trim threshold is handed back to the kernel. Each evaluation then
faults its buffers in again: on the demo 38,000-53,000 minor page faults and 0.07-0.1 s of kernel time for
an evaluation of 0.45 s, and the kernel's page zeroing is memory traffic, which made evaluations slow down
further whenever another process on the machine used memory bandwidth (a Ray Tune driver beside a trial).
How far glibc had raised its threshold also depended on the process's history, so a fresh trial worker
evaluated more slowly than a long-running process did (docs/RESULTS.md, "Page faults per evaluation").

Fixed thresholds (`mallopt`; setting one also stops glibc's own adjustment) keep the freed blocks in the heap
for reuse: 0.81x the time per evaluation on the digits demo, about 0.7x for InceptionV3 features on the CPU.
The cost is that a scoring process holds its peak evaluation memory between candidates, which it needs again
at the next one (for those Inception features 1.24-1.45 GiB resident between calls instead of 0.95 GiB).
Other C libraries (macOS, musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap and stay there when freed: above what the demo's evaluation frees
# and asks for again, below the blocks of a large batch that would be held for nothing between evaluations
KEEP_BYTES = 512 * 2 ** 20
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # the largest mmap threshold glibc's documentation promises to accept


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process (module docstring); False where the C library
    is not glibc or refuses the settings. Called by `CandidateScorer` before its first evaluation, by the
    training loop and by the reference statistics' feature pass."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # not glibc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) or mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX))

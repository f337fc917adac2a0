"""CPU memory: keep freed blocks in the process instead of handing them back to the OS each step.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults a block above a
(dynamic) size threshold is mapped fresh with ``mmap`` and unmapped when freed, and free memory at
the top of the heap is returned to the OS. A Bayesian training step allocates and frees tens of
megabytes of temporaries (sampled pre-activations, noise, their gradients), so a step can touch
thousands of new pages, each fault zero-filling 4 KiB in the kernel. How many depends on how far
glibc's dynamic threshold has risen in that process (it rises when a large mapped block is freed):
for LeNet-5-Caffe with the group NJ prior this project has counted from about 46,000 faults a step
(the threshold at its initial 128 KiB) to almost none. Raising the two thresholds keeps those
blocks for reuse, which is what a caching allocator (PyTorch's own on CUDA; jemalloc or tcmalloc, which PyTorch's CPU
tuning guide suggests preloading) does. ``python -m bclib bench layers`` and ``bench epochs`` run
with it, as :func:`bclib.train.fit` does.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory", "freed_memory_kept", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap, not from their own mmap: glibc's largest allowed value
# on 64-bit systems (half its 64 MiB heap size), above LeNet-5-Caffe's largest temporary (6 MiB).
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of the heap is returned to the OS only beyond this.
TRIM_THRESHOLD_BYTES = 1 << 30


# keep_freed_memory's answer once it has run in this process (None: not yet).
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed CPU memory in the process for reuse (process-wide).

    Sets ``M_MMAP_THRESHOLD`` to ``MMAP_THRESHOLD_BYTES`` and ``M_TRIM_THRESHOLD`` to
    ``TRIM_THRESHOLD_BYTES`` with ``mallopt``. The process then holds on to up to that much
    freed memory, as a caching allocator would, instead of faulting fresh pages in on every
    training step. Calling it again does nothing; there is no undo within the process.

    Returns:
        ``True`` when glibc accepted both settings; ``False`` where there is no glibc (macOS,
        Windows, musl), where nothing is changed.
    """
    global _kept
    if _kept is None:
        _kept = _set_glibc_thresholds()
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has changed this process's allocator."""
    return bool(_kept)


def _set_glibc_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the running process's symbols, the C library's among them
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differs or does nothing
        mallopt = libc.mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))

"""Reuse freed host memory on MLX's Linux CPU backend instead of faulting fresh pages in.

MLX's CPU allocator passes every buffer straight to ``malloc`` and ``free`` and caches nothing
(``mx.get_cache_memory()`` stays 0). glibc serves each block over its mmap threshold (at most
32 MB) with a fresh ``mmap`` and unmaps it on ``free``, so the next array of that size faults
its pages in one by one: about 2 µs per 4 KB page. Adding 1 to an 80 MB array took 40 ms that
way and 5.6 ms with the pages kept (docs/performance.md); a training pass at the Qwen2.5
shapes allocates arrays of that size thousands of times (logits chunks, MLP activations).

:func:`keep_freed_memory` asks glibc never to mmap a block and never to give the top of its
heap back, so freed blocks are reused by the next allocation. The process's resident memory
then stays near its peak instead of falling between steps, which is what MLX's own caching
allocators do on Metal and CUDA. Only on Linux with glibc, only while MLX computes on the CPU
(where it was measured); ``MLX_REASONER_KEEP_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

from .blas import OFF_VALUES

ENV_SWITCH = "MLX_REASONER_KEEP_MEMORY"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes: return the heap's top past 2 GB only

_state: str | None = None


def keep_freed_memory() -> str:
    """Tune glibc's malloc for MLX's CPU backend, once per process.

    Returns:
        ``"kept"`` when the tuning is in force, else why not (for ``config.json``).
    """
    global _state
    if _state is None:
        _state = _decide()
    return _state


def _decide() -> str:
    if not sys.platform.startswith("linux"):
        return f"not applied: {sys.platform} is not Linux"
    setting = os.environ.get(ENV_SWITCH, "")
    if setting.strip().lower() in OFF_VALUES:
        return f"not applied: {ENV_SWITCH}={setting}"
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return f"not applied: MLX computes on {mx.default_device()}"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not applied: the C library is not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        return "not applied: mallopt refused the settings"
    return "kept"

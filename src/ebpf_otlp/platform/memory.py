"""Hand the C allocator's free pages back to the kernel.

The agent's work comes in bursts (a ring batch decoded, an interval encoded):
glibc keeps the pages those bursts freed, spread over its per-thread arenas,
so without a trim RSS creeps towards the largest burst seen and stays there.
``malloc_trim(0)`` returns every whole free page (1-3 ms on this machine
kind's ~90 MB agent); the agent calls it once per export interval.
"""

from __future__ import annotations

import ctypes

_trim: object = None  # the C function once looked up; False where there is none


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); False elsewhere
    (musl), and when nothing was returned."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(None).malloc_trim  # the C library Python runs on
            _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    return bool(_trim and _trim(0))

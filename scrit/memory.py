"""Give freed heap memory back to the operating system.

glibc keeps memory a process has freed for its own reuse: after a training step or a burst of
generation, a process's resident size stays at its peak although most of it is free (measured on the
trainer: 1.34 GB resident at rest, 0.51 GB after ``malloc_trim``). Long-lived processes call
``release_free_memory`` when they go idle (the trainer waiting for data, an engine with no requests),
which costs a few milliseconds and nothing while they work. (A fixed ``MALLOC_MMAP_THRESHOLD_`` returns
it too, but made every training step 75 % slower here.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_memory"]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # glibc only (musl and macOS have none)
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where glibc has it; True if memory was given back."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False

"""Giving a process's free heap pages back to the OS.

glibc returns freed memory to the OS only from the top of the heap; pages freed in its middle stay
resident for reuse. After a burst (a process's start-up, the encoder child's chunk) that memory is
held for nothing until the next one: ``malloc_trim(0)`` releases every free page of the heap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def heap_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``; None where the C library has none (musl)."""
    import ctypes  # here, not at the top: loaded only by the processes that trim (~0.3 MB)

    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return None if malloc_trim is None else functools.partial(malloc_trim, 0)


def trim_heap() -> None:
    """Release the heap's free pages now (nothing where glibc's call is missing)."""
    trim = heap_trimmer()
    if trim is not None:
        trim()

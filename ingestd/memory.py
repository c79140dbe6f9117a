"""Giving a process's free heap pages back to the OS.

glibc returns freed memory to the OS only from the top of the heap; pages freed in its middle stay
resident for reuse. After a burst (a process's start-up, the encoder child's chunk) that memory is
held for nothing until the next one: ``malloc_trim(0)`` releases every free page of the heap.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

# The store worker's and the encoder child's tracked objects come and go in bursts: a parsed
# tweet's ~200 dicts and lists die together, a batch's entries with its flush. At CPython's
# default first threshold (700 allocations net of frees) the collector ran every ~350 tweets and
# walked the open batch each time: ~0.9 µs per tweet in the store worker (``bench/bench_store.py``
# prints its gc share). Their net count stays under a few thousand, so at 10,000 the collector
# runs only when objects really pile up (cyclic garbage, a growing structure), as before.
GC_THRESHOLD0 = 10_000


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


def quiet_gc() -> None:
    """For the per-tweet processes: freeze what start-up made (long-lived, never worth a pass)
    and raise the collector's first threshold (``GC_THRESHOLD0``)."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])

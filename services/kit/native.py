"""Native libraries' process-wide knobs: the C library's memory allocator, where it is glibc
(how many arenas it keeps, and giving freed memory back; elsewhere, musl or macOS, both are
no-ops), and how many threads numpy's BLAS starts.

glibc gives each thread that allocates while another holds the lock an arena of its own, up to
eight per core, and an arena keeps what it once held mapped. A service's threads (gRPC's
pollers and executors, onnxruntime's, the default executor) each leave megabytes behind: with
two arenas the cache service's resident memory after 2,000 answers fell by about 5 MB
(bench/cache_memory.py, `--variant 'arena2:MALLOC_ARENA_MAX=2'`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# mallopt's parameter number for the arena limit (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    # mallopt and malloc_trim are glibc's own: their presence is the test.
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas from now on (0: the C library's default); whether the
    limit was applied. Arenas already made stay, so call it before starting threads."""
    libc = _glibc()
    if arenas <= 0 or libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def release_freed_memory() -> None:
    """Hands memory that was freed but is still mapped back to the system (malloc_trim(0))."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# The variables OpenBLAS (numpy's BLAS) reads its thread count from, most specific first.
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def limit_blas_threads(threads: int) -> bool:
    """numpy's OpenBLAS runs `threads` threads (0: its default, one per core); whether the limit
    was set. An OPENBLAS_NUM_THREADS or OMP_NUM_THREADS the operator set wins.

    Why one: OpenBLAS's extra threads spin after each call, waiting for the next one. A service
    calls BLAS from many requests at once on its own threads already, so the spinning is pure
    cost: 37% of the all-in-one suite's CPU during cache misses once the cache held a few thousand
    answers (bench/chat_cpu.py, 4,000 misses: 10.9 ms per miss against 6.7 ms with one thread).
    """
    if threads <= 0 or any(name in os.environ for name in _BLAS_THREAD_VARIABLES):
        return False
    # A BLAS that loads later reads this as it starts (and child processes inherit it) ...
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    if "numpy" in sys.modules:
        # ... one already loaded (a service's modules imported numpy) is told at run time.
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")
    return True

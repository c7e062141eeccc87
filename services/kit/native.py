"""The C library's memory allocator, where it is glibc: how many arenas it keeps, and giving
freed memory back. Elsewhere (musl, macOS) both are no-ops.

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

"""The malloc arena limit (services/kit/native.py), seen through glibc's own malloc_info."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.kit.native import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only (not this C library)")

# Eight threads allocate at once, each holding its memory until all have allocated, so glibc
# would give them arenas of their own; malloc_info then lists one <heap> per arena.
_PROGRAM = """
import ctypes, ctypes.util, os, re, sys, tempfile, threading
from services.kit.native import limit_malloc_arenas
applied = limit_malloc_arenas({arenas})
barrier = threading.Barrier(8)
def work():
    held = [bytearray(50_000) for _ in range(20)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fdopen.restype = ctypes.c_void_p
fd, path = tempfile.mkstemp()
stream = libc.fdopen(os.dup(fd), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(applied, len(re.findall(r'<heap nr="', open(path).read())))
"""


def _arenas(limit: int) -> tuple[bool, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM.format(arenas=limit)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    applied, heaps = done.stdout.split()
    return applied == "True", int(heaps)


def test_the_arena_limit_holds_where_the_default_would_make_more() -> None:
    applied, unlimited = _arenas(0)
    assert not applied
    assert unlimited > 2, "without a limit glibc gives the threads arenas of their own"
    assert _arenas(2) == (True, 2)
    assert _arenas(1) == (True, 1)

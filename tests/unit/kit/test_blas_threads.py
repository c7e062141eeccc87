"""numpy's BLAS threads (services/kit/native.py: limit_blas_threads), each case in a fresh
interpreter, read back through threadpoolctl."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROGRAM = """
import sys
from services.kit.native import limit_blas_threads
if {numpy_first}:
    import numpy
applied = limit_blas_threads({threads})
import numpy
from threadpoolctl import threadpool_info
print(applied, *[pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"])
"""


def _blas(threads: int, *, numpy_first: bool = False, **environ: str) -> tuple[bool, list[int]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    program = _PROGRAM.format(threads=threads, numpy_first=numpy_first)
    done = subprocess.run(
        [sys.executable, "-c", program], env={**env, **environ}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    applied, *pools = done.stdout.split()
    assert pools, "numpy brought no BLAS that threadpoolctl knows"
    return applied == "True", [int(p) for p in pools]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: BLAS starts one thread anyway")
def test_without_a_limit_blas_starts_a_thread_per_core() -> None:
    assert _blas(0) == (False, [os.cpu_count()])


@pytest.mark.parametrize("numpy_first", [False, True], ids=["before numpy loads", "after numpy loaded"])
def test_the_limit_holds_whether_numpy_was_loaded_or_not(numpy_first: bool) -> None:
    assert _blas(1, numpy_first=numpy_first) == (True, [1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: cannot tell 2 threads from the cap")
def test_an_operators_own_openblas_setting_wins() -> None:
    assert _blas(1, OPENBLAS_NUM_THREADS="2") == (False, [2])

"""Benchmark results name the CPU and the instructions that decide onnxruntime's int8 kernels:
the local embedder with int8 weights is faster than with float ones on some CPUs and slower
on others, so a result without them cannot be compared with another machine's."""

from __future__ import annotations

from bench.support import cpu_description

_AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma
"""

_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: avx2 avx512f avx512_vnni avx_vnni amx_int8 amx_tile
"""


def test_the_model_and_the_int8_instructions_are_named() -> None:
    assert cpu_description(_AVX2_ONLY) == "AMD EPYC (avx2)"
    assert (
        cpu_description(_VNNI)
        == "Intel(R) Xeon(R) Platinum 8488C (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8)"
    )


def test_a_cpu_without_any_says_so() -> None:
    described = cpu_description("model name\t: Ampere Altra\nflags\t\t: fp asimd\n")
    assert described.startswith("Ampere Altra (none of avx2, ")


def test_no_cpuinfo_at_all_is_an_unknown_cpu() -> None:
    assert (
        cpu_description("")
        == "unknown CPU (none of avx2, avx512f, avx512_vnni, avx512vnni, avx_vnni, amx_int8)"
    )

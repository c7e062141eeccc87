"""The per-partition vector index: exact scan, background switch to HNSW, deletes throughout."""

from __future__ import annotations

import numpy as np

from services.cache.index import AnnParams, VectorIndex


def _rows(n: int, dim: int = 16, seed: int = 1) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def test_exact_index_returns_best_first_and_forgets_removed() -> None:
    rows = _rows(50)
    index = VectorIndex(16, AnnParams(threshold=1000))
    for i, row in enumerate(rows):
        index.add(i + 1, row)
    found = index.search(rows[7], 3)
    assert found[0][0] == 8 and abs(found[0][1] - 1.0) < 1e-5
    assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    index.remove(8)
    assert 8 not in [label for label, _ in index.search(rows[7], 5)] and len(index) == 49
    index.remove(8)  # twice is harmless
    assert len(index) == 49 and not index.approximate


def test_switch_to_hnsw_in_the_background_keeps_changes_made_meanwhile() -> None:
    rows = _rows(400)
    index = VectorIndex(16, AnnParams(threshold=200, threads=1))
    for i in range(250):  # crosses the threshold at 200: the build starts from a snapshot
        index.add(i + 1, rows[i])
    index.remove(5)  # removed during (or after) the build
    index.remove(210)
    index.wait_built(timeout=30)
    assert index.approximate and len(index) == 248
    for i in range(250, 400):
        index.add(i + 1, rows[i])
    assert len(index) == 398
    labels = [label for label, _ in index.search(rows[300], 1)]
    assert labels == [301]
    assert 5 not in [label for label, _ in index.search(rows[4], 5)]
    assert 211 in [label for label, _ in index.search(rows[210], 3)]
    assert 210 not in [label for label, _ in index.search(rows[209], 5)]
    index.remove(301)
    assert 301 not in [label for label, _ in index.search(rows[300], 5)] and len(index) == 397


def test_hnsw_grows_past_its_initial_capacity() -> None:
    rows = _rows(3000, seed=3)
    index = VectorIndex(16, AnnParams(threshold=100, threads=1))
    for i in range(100):
        index.add(i + 1, rows[i])
    index.wait_built(timeout=30)
    for i in range(100, 3000):
        index.add(i + 1, rows[i])
    assert len(index) == 3000
    hits = sum(index.search(rows[i], 1)[0][0] == i + 1 for i in range(0, 3000, 100))
    assert hits >= 28  # approximate, but self-queries nearly always come back first


def test_from_rows_builds_exact_or_hnsw_at_once() -> None:
    rows = _rows(300, seed=5)
    labels = np.arange(1, 301, dtype=np.int64)
    small = VectorIndex.from_rows(labels[:50], rows[:50], AnnParams(threshold=100))
    large = VectorIndex.from_rows(labels, rows, AnnParams(threshold=100))
    assert not small.approximate and len(small) == 50
    assert large.approximate and len(large) == 300
    assert large.search(rows[123], 1)[0][0] == 124 and small.search(rows[10], 1)[0][0] == 11


def test_exact_index_keeps_every_row_through_growth_and_removals() -> None:
    # The exact index starts at one row and reallocates as it fills: each reallocation must
    # carry every live row over unchanged.
    rows = _rows(300, seed=3)
    index = VectorIndex(16, AnnParams(threshold=10_000))
    for i, row in enumerate(rows):
        index.add(i + 1, row)
        if i % 7 == 3:
            index.remove(i)  # the previous row's label: the last row moves into its slot
    removed = {i - 1 for i in range(300) if i % 7 == 3}
    assert len(index) == 300 - len(removed)
    for i, row in enumerate(rows):
        best = index.search(row, 1)
        if i in removed:
            assert best[0][0] != i + 1
        else:
            assert best[0][0] == i + 1 and abs(best[0][1] - 1.0) < 1e-5

"""In-process vector index of one partition: exact (numpy) while small, HNSW when large.

An exact scan of N rows of 384 float32 costs about N/30k ms on this class of CPU, so beyond
`ann_threshold` rows the index is rebuilt as an HNSW graph (hnswlib, inner product on
normalised rows = cosine) in a background thread; the exact scan keeps serving until the
graph is ready. An approximate miss is only a cache miss: every candidate is re-scored
exactly and re-checked by the caller.

Not thread-safe: all calls come from the event loop thread; the build thread only reads a
private snapshot.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class AnnParams:
    threshold: int = 20_000
    m: int = 12
    ef_construction: int = 64
    ef: int = 64
    threads: int = 1


class _Flat:
    # One row to start with and doubling: a partition per conversation state holds a few
    # follow-ups, and 64 preallocated rows would cost 96 KB each at 384 dimensions.
    def __init__(self, dim: int, capacity: int = 1) -> None:
        self.dim = dim
        self.rows = np.zeros((capacity, dim), dtype=np.float32)
        self.labels = np.zeros(capacity, dtype=np.int64)
        self.where: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.where)

    def add(self, label: int, vector: Vector) -> None:
        if label in self.where:
            self.rows[self.where[label]] = vector
            return
        n = len(self.where)
        if n == len(self.rows):
            # Zeroed (calloc'd) arrays with the live rows copied in, not concatenate([rows,
            # zeros]), which writes the empty half too: its pages stay unallocated until rows
            # land there (a 2,000-entry partition held 6 MB resident instead of 3).
            rows = np.zeros((2 * n, self.dim), dtype=np.float32)
            rows[:n] = self.rows
            labels = np.zeros(2 * n, dtype=np.int64)
            labels[:n] = self.labels
            self.rows, self.labels = rows, labels
        self.rows[n] = vector
        self.labels[n] = label
        self.where[label] = n

    def remove(self, label: int) -> bool:
        row = self.where.pop(label, None)
        if row is None:
            return False
        last = len(self.where)
        if row != last:
            moved = int(self.labels[last])
            self.rows[row] = self.rows[last]
            self.labels[row] = moved
            self.where[moved] = row
        return True

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        n = len(self.where)
        if n == 0:
            return []
        scores = self.rows[:n] @ vector
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top])]
        return [(int(self.labels[i]), float(scores[i])) for i in top]

    def snapshot(self) -> tuple[Vector, npt.NDArray[np.int64]]:
        n = len(self.where)
        return self.rows[:n].copy(), self.labels[:n].copy()


def build_hnsw(rows: Vector, labels: npt.NDArray[np.int64], params: AnnParams) -> Any:
    index = hnswlib.Index(space="ip", dim=rows.shape[1])
    index.init_index(
        max_elements=max(1024, int(len(rows) * 1.5)), ef_construction=params.ef_construction, M=params.m
    )
    index.set_num_threads(params.threads)
    if len(rows):
        index.add_items(rows, labels)
    index.set_ef(params.ef)
    return index


class VectorIndex:
    """Labels (ints, never reused) to normalised vectors; `search` returns (label, cosine) best first."""

    def __init__(self, dim: int, params: AnnParams | None = None) -> None:
        self.dim = dim
        self.params = params or AnnParams()
        self._flat: _Flat | None = _Flat(dim)
        self._hnsw: Any = None
        self._count = 0
        # Background build: its result, and what changed since its snapshot.
        self._building: threading.Thread | None = None
        self._built: Any = None
        self._since_added: dict[int, Vector] = {}
        self._since_removed: set[int] = set()

    def __len__(self) -> int:
        return self._count

    @property
    def approximate(self) -> bool:
        return self._hnsw is not None

    def add(self, label: int, vector: Vector) -> None:
        self._finish_build()
        if self._hnsw is not None:
            self._hnsw_add(label, vector)
            return
        assert self._flat is not None
        before = len(self._flat)
        self._flat.add(label, vector)
        self._count += len(self._flat) - before
        if self._building is not None:
            self._since_added[label] = vector
            self._since_removed.discard(label)
        elif self._count >= self.params.threshold:
            self._start_build()

    def remove(self, label: int) -> None:
        self._finish_build()
        if self._hnsw is not None:
            try:
                self._hnsw.mark_deleted(label)
                self._count -= 1
            except RuntimeError:
                pass  # not present, or already deleted
            return
        assert self._flat is not None
        if self._flat.remove(label):
            self._count -= 1
            if self._building is not None:
                self._since_added.pop(label, None)
                self._since_removed.add(label)

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        self._finish_build()
        if self._count == 0:
            return []
        if self._hnsw is None:
            assert self._flat is not None
            return self._flat.search(vector, k)
        k = min(k, self._count)
        try:
            labels, distances = self._hnsw.knn_query(vector, k=k)
        except RuntimeError:
            return []  # fewer reachable elements than k: an approximate miss is a miss
        # hnswlib's "ip" distance is 1 - inner product.
        return [(int(lab), 1.0 - float(d)) for lab, d in zip(labels[0], distances[0], strict=True)]

    @classmethod
    def from_rows(
        cls, labels: npt.NDArray[np.int64], rows: Vector, params: AnnParams | None = None
    ) -> VectorIndex:
        """An index holding `rows` at once: HNSW built in one batch when at or over the threshold."""
        index = cls(rows.shape[1], params)
        if len(rows) >= index.params.threshold:
            index._hnsw = build_hnsw(rows, labels, index.params)
            index._flat = None
            index._count = len(rows)
            return index
        for label, row in zip(labels, rows, strict=True):
            index.add(int(label), row)
        return index

    def build_now(self) -> None:
        """Switch to HNSW synchronously (benchmarks; start-up replay of a large partition)."""
        if self._hnsw is not None or self._flat is None:
            return
        rows, labels = self._flat.snapshot()
        self._hnsw = build_hnsw(rows, labels, self.params)
        self._flat = None

    def _hnsw_add(self, label: int, vector: Vector) -> None:
        # Labels are never reused (the caller numbers entries monotonically), so this is new.
        index = self._hnsw
        if index.get_current_count() >= index.get_max_elements():
            index.resize_index(int(index.get_max_elements() * 1.5) + 1024)
        index.add_items(vector[None, :], np.array([label]))
        self._count += 1

    def _start_build(self) -> None:
        assert self._flat is not None
        rows, labels = self._flat.snapshot()
        params = self.params

        def run() -> None:
            self._built = build_hnsw(rows, labels, params)

        self._since_added, self._since_removed = {}, set()
        self._building = threading.Thread(target=run, name="cache-hnsw-build", daemon=True)
        self._building.start()

    def _finish_build(self) -> None:
        if self._building is None or self._building.is_alive():
            return
        self._building = None
        built, self._built = self._built, None
        if built is None:
            return  # the build failed; keep scanning exactly
        self._hnsw = built
        self._flat = None
        added, removed = self._since_added, self._since_removed
        self._since_added, self._since_removed = {}, set()
        # The count already includes these; re-add without counting twice.
        count = self._count
        for label in removed:
            with contextlib.suppress(RuntimeError):
                built.mark_deleted(label)
        for label, vector in added.items():
            self._hnsw_add(label, vector)
        self._count = count

    def wait_built(self, timeout: float | None = None) -> None:
        """Waits for a background build (tests)."""
        if self._building is not None:
            self._building.join(timeout)
        self._finish_build()

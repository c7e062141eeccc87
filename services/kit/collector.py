"""Python's cyclic garbage collector, tuned for a long-running service.

A service imports its whole world at start (gRPC, protobuf descriptors, OpenTelemetry, numpy,
the tokenizers): tens of thousands of objects the collector tracks (about 86,000 in `ballast up`)
that live until the process ends. CPython 3.11 collects its young generation after every 700 net
allocations of container objects, and every tenth young collection also sweeps the middle one;
whatever survives both reaches the old generation, and once enough has arrived there a full
collection walks every object the process holds, the start-up heap included.

Traces make this expensive: a finished span waits in the batch span processor's queue until its
batch is exported, so spans and their attributes survive the young collections, reach the old
generation and trigger full collections. Counted inside `ballast up` with every trace exported
(exact hits and session chats, 2,400 of them), Python's own settings made 5 full collections of
about 79 ms each, every chat in flight waiting; with the settings below there was none, and the
collector's time fell from 0.72 s to 0.16 s. Side by side (bench/results/chat_cpu_gc.md) the
slowest chat with traces exported went from 79 to 54 ms (hits) and from 241 to 114 ms (session
chats); CPU per chat moved by -13% to +1%, within this machine's noise.

- `BALLAST_GC_YOUNG_THRESHOLD` (10,000): collect the young generation after this many net
  allocations instead of 700. A request allocates and frees most of its objects itself
  (reference counting frees them at once); the collector is only needed for cycles, and a few
  thousand short-lived cycles cost kilobytes. 0 keeps Python's own thresholds.
- `BALLAST_GC_FREEZE` (true): once every service has started, what exists is moved out of the
  collector's sight (`gc.freeze()`, after one full collection so that start-up garbage is not
  kept): full collections then walk only what was made since.
"""

from __future__ import annotations

import gc


def set_young_threshold(threshold: int) -> bool:
    """Collects the young generation after `threshold` net allocations (0: Python's default is
    left as it is); whether the threshold was changed. The older generations keep theirs."""
    if threshold <= 0:
        return False
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
    return True


def freeze_startup_heap() -> int:
    """Collects once, then moves every object that exists now into the permanent generation,
    which collections skip; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

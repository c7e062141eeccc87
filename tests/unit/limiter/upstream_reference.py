"""envoyproxy/ratelimit's fixed-window semantics, written from its documentation, for comparison.

Deliberately small and separate from Ballast's code (it reads the YAML itself), so a test that
sends the same traffic to both can catch Ballast drifting from upstream:

* lookup: at each level the exact key and value, else the first wildcard value that matches
  (`*` = any run of characters), else the key alone; a limit applies only at the descriptor's
  last entry;
* a counter per (request's key/value pairs, window start); a share_threshold wildcard level
  counts under its pattern instead of the value;
* window = unit length x unit_multiplier, starting at a multiple of it in Unix seconds;
  duration_until_reset = window - now % window (now in whole Unix seconds);
* every descriptor is incremented by its hits (its own hits_addend, else the request's, else 1);
  over = count after > requests_per_unit; OVER_LIMIT has limit_remaining 0; shadow mode answers
  OK; unlimited answers OK with 2^32-1; a limit named in a matched limit's `replaces` is dropped;
* stats per limit key: total_hits, over_limit, near_limit (floor(0.8 x limit)), within_limit,
  shadow_mode, with a request's hits split at the thresholds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 604800,
    "month": 2592000,
    "year": 31536000,
}
MAX_U32 = 2**32 - 1


@dataclass
class Status:
    over: bool
    remaining: int
    reset_s: int | None  # None: no limit applied
    requests_per_unit: int | None


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), value, re.DOTALL) is not None


class UpstreamReference:
    def __init__(self, config: dict[str, Any], clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.counts: Counter[tuple[Any, ...]] = Counter()
        self.stats: dict[str, Counter[str]] = {
            s: Counter() for s in ("total_hits", "over_limit", "near_limit", "within_limit", "shadow_mode")
        }

    def lookup(self, entries: list[tuple[str, str]]) -> tuple[dict[str, Any], str, tuple[Any, ...]] | None:
        level = self.config["descriptors"]
        found = None
        path: list[str] = []
        counter: list[tuple[str, str]] = []
        for i, (key, value) in enumerate(entries):
            node = next((d for d in level if d["key"] == key and str(d.get("value", "")) == value), None)
            shared = False
            if node is None:
                node = next(
                    (
                        d
                        for d in level
                        if d["key"] == key and "*" in str(d.get("value", "")) and _matches(d["value"], value)
                    ),
                    None,
                )
                shared = node is not None and node.get("share_threshold", False)
            if node is None:
                node = next((d for d in level if d["key"] == key and not d.get("value")), None)
            if node is None:
                return None
            path.append(f"{key}_{node['value']}" if node.get("value") else key)
            counter.append((key, node["value"] if shared else value))
            if "rate_limit" in node and i == len(entries) - 1:
                found = node
            if not node.get("descriptors"):
                break
            level = node["descriptors"]
        if found is None:
            return None
        return found, self.config["domain"] + "." + ".".join(path), tuple(counter)

    def should_rate_limit(
        self, descriptors: list[tuple[list[tuple[str, str]], int | None]], hits_addend: int
    ) -> tuple[bool, list[Status]]:
        found = [self.lookup(entries) for entries, _ in descriptors]
        limited = [f for f in found if f is not None and not f[0]["rate_limit"].get("unlimited")]
        replaced = {r["name"] for f in limited for r in f[0]["rate_limit"].get("replaces", [])}
        now = int(self.clock())
        statuses = []
        for (_, own_hits), f in zip(descriptors, found, strict=True):
            if f is None or f[0]["rate_limit"].get("name", "") in replaced:
                statuses.append(Status(False, 0, None, None))
                continue
            node, stats_key, counter = f
            rl = node["rate_limit"]
            if rl.get("unlimited"):
                statuses.append(Status(False, MAX_U32, None, None))
                continue
            window = SECONDS[rl["unit"]] * rl.get("unit_multiplier", 1)
            limit = rl["requests_per_unit"]
            hits = own_hits if own_hits is not None else max(1, hits_addend)
            key = (counter, window, now // window * window)
            before = self.counts[key]
            self.counts[key] += hits
            after = self.counts[key]
            over = after > limit
            self._count(stats_key, hits, before, after, limit, over, node.get("shadow_mode", False))
            statuses.append(
                Status(
                    over and not node.get("shadow_mode", False),
                    0 if over else limit - after,
                    window - now % window,
                    limit,
                )
            )
        return any(s.over for s in statuses), statuses

    def _count(
        self, key: str, hits: int, before: int, after: int, limit: int, over: bool, shadow: bool
    ) -> None:
        near = math.floor(limit * 0.8)
        s = self.stats
        s["total_hits"][key] += hits
        if over:
            s["over_limit"][key] += hits if before >= limit else after - limit
            if before < limit:
                s["near_limit"][key] += limit - max(near, before)
            if shadow:
                s["shadow_mode"][key] += hits
        else:
            if after > near:
                s["near_limit"][key] += hits if before >= near else after - near
            s["within_limit"][key] += hits

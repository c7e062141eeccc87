"""What the surge did, per tier and over time: tables (markdown, JSON) and a chart (PNG)."""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ballast_demo.load import Event, LoadState
from ballast_demo.scenario import TIERS, ScenarioConfig


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tier_rows(events: Sequence[Event], config: ScenarioConfig) -> list[dict[str, Any]]:
    """Per tier: requests, success, latency, refusals by the tier's quota, failures, cache, 429s, cost."""
    rows = []
    outage = (config.outage_start_s, config.outage_start_s + config.outage_s)
    for tier in (*TIERS, "all"):
        mine = [e for e in events if tier in ("all", e.tier)]
        if not mine:
            continue
        answered = [e for e in mine if e.outcome in ("ok", "cache_hit")]
        latencies = [e.latency for e in answered]
        during = [e for e in mine if outage[0] <= e.t - e.latency <= outage[1]]
        rows.append(
            {
                "tier": tier,
                "requests": len(mine),
                "success_rate": len(answered) / len(mine),
                "p50_s": statistics.median(latencies) if latencies else 0.0,
                "p99_s": percentile(latencies, 0.99),
                "limited": sum(1 for e in mine if e.outcome == "limited"),
                "failed": sum(1 for e in mine if e.outcome == "failed"),
                "still_queued": sum(1 for e in mine if e.code == "STILL_QUEUED"),
                "failed_during_outage": sum(1 for e in during if e.outcome == "failed"),
                "cache_hits": sum(1 for e in mine if e.outcome == "cache_hit"),
                "upstream_429s": sum(e.upstream_429s for e in mine),
                "failovers": sum(1 for e in answered if e.attempts > 1),
                "queued": sum(1 for e in mine if e.queued),
                "cost_usd": sum(e.cost_micros for e in mine) / 1e6,
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| tier | requests | success | p50 s | p99 s | limited by tier | failed | failed in outage | cache hits "
        "| upstream 429s | failovers | cost $ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tier']} | {r['requests']} | {r['success_rate']:.1%} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
            f"| {r['limited']} | {r['failed']} | {r['failed_during_outage']} | {r['cache_hits']} "
            f"| {r['upstream_429s']} | {r['failovers']} | {r['cost_usd']:.4f} |"
        )
    return "\n".join(lines)


def progress_line(state: LoadState) -> str:
    now = state.now()
    recent = [e for e in state.events if e.t >= now - 5]
    answered = [e for e in state.events if e.outcome in ("ok", "cache_hit")]
    latencies = [e.latency for e in recent if e.outcome in ("ok", "cache_hit")]
    total = len(state.events)
    hits = sum(1 for e in state.events if e.outcome == "cache_hit")
    providers = " ".join(f"{name}:{breaker}" for name, breaker in sorted(state.providers.items()))
    return (
        f"t={now:5.1f}s users={state.active_users:4d} requests={total:6d} "
        f"ok={len(answered) / total if total else 0:6.1%} p50={statistics.median(latencies) if latencies else 0:5.2f}s "
        f"p99={percentile(latencies, 0.99):5.2f}s cache={hits / total if total else 0:5.1%} queue={state.waiting_jobs:4d} "
        f"{'OUTAGE ' if state.outage else ''}{providers}"
    )


def series(events: Sequence[Event], duration: float) -> dict[str, list[float]]:
    """Per second: answers, failures, limited, p50 and p99 latency of answers finishing then."""
    last = max((e.t for e in events), default=duration)
    seconds = int(max(duration, last)) + 2
    out: dict[str, list[float]] = {k: [0.0] * seconds for k in ("ok", "failed", "limited", "p50", "p99")}
    buckets: list[list[float]] = [[] for _ in range(seconds)]
    for e in events:
        second = min(seconds - 1, int(e.t))
        if e.outcome in ("ok", "cache_hit"):
            out["ok"][second] += 1
            buckets[second].append(e.latency)
        elif e.outcome == "limited":
            out["limited"][second] += 1
        else:
            out["failed"][second] += 1
    for second, values in enumerate(buckets):
        out["p50"][second] = statistics.median(values) if values else float("nan")
        out["p99"][second] = percentile(values, 0.99) if values else float("nan")
    return out


def plotting_available() -> bool:
    """Whether the optional plotting extra (`ballast[demo]`, matplotlib) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def chart(events: Sequence[Event], config: ScenarioConfig, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(events, config.duration_s)
    xs = list(range(len(data["ok"])))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(xs, data["ok"], label="answered / s", color="tab:green")
    top.plot(xs, data["failed"], label="failed / s", color="tab:red")
    top.plot(xs, data["limited"], label="refused by tier limit / s", color="tab:orange")
    top.set_ylabel("requests per second")
    top.legend(loc="upper left")
    bottom.plot(xs, data["p50"], label="p50 latency", color="tab:blue")
    bottom.plot(xs, data["p99"], label="p99 latency", color="tab:purple")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("seconds since the surge began")
    bottom.legend(loc="upper left")
    for axis in (top, bottom):
        axis.axvspan(
            config.outage_start_s,
            config.outage_start_s + config.outage_s,
            color="grey",
            alpha=0.2,
            label="primary provider down",
        )
        axis.grid(alpha=0.3)
    top.set_title(title)
    top.text(config.outage_start_s + 0.5, max(data["ok"] or [1]) * 0.9, "primary provider down", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

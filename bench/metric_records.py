"""What one counter add or histogram record costs: the SDK's instruments against tallies.

Run: .venv/bin/python -m bench.metric_records [--rounds 6] [--records 100000]

Each variant's metrics are set up as `setup_telemetry` sets up a service's (Prometheus reader,
the views' buckets, no exemplars): `tallies` creates its instruments through `Telemetry.meter`, as
the services do (counters and histograms are tallies, services/kit/tallies.py), `sdk` through
the provider's own meter, as before tallies. Per
round and variant, `--records` adds of a counter and records of a seconds histogram with four
attributes (those of rpc.server.call.duration), the variants alternating in one process; CPU
time of the thread, medians of the rounds. Both are scraped after each round and must agree.
Writes bench/results/metric_records.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.support import cpu_description, save_results

ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": "ballast.edge.v1.EdgeService", "rpc.method": "Chat"}
VARIANTS = ("sdk", "tallies")


def variant_meter(variant: str, telemetry: Any) -> Any:
    """The services' meter (`tallies`), or the provider's own SDK meter (`sdk`)."""
    from services.kit.telemetry import METER_NAME

    return telemetry.meter if variant == "tallies" else telemetry.meter_provider.get_meter(METER_NAME)


def _per_record_us(record: Callable[[dict[str, str]], None], count: int) -> float:
    attributes = [{**ATTRIBUTES, "rpc.grpc.status_code": code} for code in ("OK", "NOT_FOUND")]
    started = time.thread_time()
    for i in range(count):
        record(attributes[i & 1])
    return (time.thread_time() - started) / count * 1e6


def _scraped_total(telemetry: Any) -> float:
    from prometheus_client import generate_latest

    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in generate_latest(telemetry.registry).decode().splitlines()
        if line.startswith(("bench_calls_total{", "bench_duration_seconds_count{"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.records < 2:
        parser.error("--rounds must be at least 1 and --records at least 2")

    from services.kit.telemetry import setup_telemetry

    telemetries = {name: setup_telemetry("bench", environ={}) for name in VARIANTS}
    instruments = {}
    for name, telemetry in telemetries.items():
        meter = variant_meter(name, telemetry)
        counter = meter.create_counter("bench.calls", unit="{request}")
        histogram = meter.create_histogram("bench.duration", unit="s")
        instruments[name] = {
            "counter add": lambda a, c=counter: c.add(1, a),
            "histogram record": lambda a, h=histogram: h.record(0.0042, a),
        }
    runs: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in next(iter(instruments.values()))} for name in VARIANTS
    }
    for round_index in range(args.rounds):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            for kind, record in instruments[name].items():
                runs[name][kind].append(_per_record_us(record, args.records))
        totals = {name: _scraped_total(telemetry) for name, telemetry in telemetries.items()}
        if len(set(totals.values())) != 1:
            print(f"the variants' scrapes disagree: {totals}", file=sys.stderr)
            return 1
        print(
            f"  round {round_index}: "
            + ", ".join(f"{n} {k} {runs[n][k][-1]:.2f} us" for n in VARIANTS for k in runs[n]),
            flush=True,
        )
    for telemetry in telemetries.values():
        telemetry.shutdown()

    lines = [
        "# One metric record: the SDK's instruments against tallies (bench/metric_records.py)",
        "",
        f"{cpu_description()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {args.rounds} rounds "
        f"of {args.records} records per instrument and variant, alternating; thread CPU per record, "
        "median of the rounds (range).",
        "",
        f"Command: `.venv/bin/python -m bench.metric_records --rounds {args.rounds} --records {args.records}`",
        "",
        "| record | SDK instrument | tally | saved |",
        "|---|---:|---:|---:|",
    ]
    for kind in runs["sdk"]:
        sdk, tally = runs["sdk"][kind], runs["tallies"][kind]
        lines.append(
            f"| {kind} | {statistics.median(sdk):.2f} us ({min(sdk):.2f}-{max(sdk):.2f}) "
            f"| {statistics.median(tally):.2f} us ({min(tally):.2f}-{max(tally):.2f}) "
            f"| {statistics.median(sdk) - statistics.median(tally):.2f} us |"
        )
    text = "\n".join(lines)
    print(text)
    save_results("metric_records", text, {"cpu": cpu_description(), "args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())

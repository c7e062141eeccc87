"""The Redis job queue's cost per job: this tree's store against a baseline revision's, side by side.

    .venv/bin/python -m bench.edge_queue [--jobs 2000] [--workers 8] [--tenants 1,50] [--baseline ee52707^]

Loads services/edge/store/redis.py as it was at `--baseline` (git show; the default is the store
before tenants took turns) and as it is now, and for each tenant count submits `--jobs` jobs
round-robin over the tenants, then drains them with `--workers` concurrent claim+finish loops.
Runs alternate (baseline, current, baseline, current) against Redis on 127.0.0.1:6379 under a
throwaway key prefix. Results go to bench/results/edge_queue.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.edge.store import SUCCEEDED, JobRecord
from services.edge.store.redis import RedisEdgeStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _baseline_store(revision: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{revision}:services/edge/store/redis.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="ballast-queue-")) / "baseline_redis_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_redis_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.RedisEdgeStore


async def _run(store_class: Any, jobs: int, workers: int, tenants: int) -> dict[str, float]:
    store = store_class(f"redis://127.0.0.1:6379/0?key_prefix=bench-queue-{secrets.token_hex(4)}:")
    await store.start()
    try:
        started = time.perf_counter()
        for index in range(jobs):
            job = JobRecord(
                job_id=f"job-{index}",
                tenant_id=f"tenant-{index % tenants}",
                user_id="u",
                priority="normal",
                request=b"",
                caller=b"",
                created_at=time.time(),
            )
            await store.submit(job, "")
        submitted = time.perf_counter()
        done = 0

        async def worker(name: str) -> None:
            nonlocal done
            while done < jobs:
                claim = await store.claim(name, block=0.2)
                if claim is None:
                    continue
                claim.job.state = SUCCEEDED
                await store.finish(claim, claim.job)
                done += 1

        await asyncio.gather(*(worker(f"w{n}") for n in range(workers)))
        drained = time.perf_counter()
        return {
            "submit_ms": round((submitted - started) / jobs * 1000, 3),
            "claim_finish_ms": round((drained - submitted) / jobs * 1000, 3),
        }
    finally:
        await store.close()


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    baseline = _baseline_store(args.baseline)
    rows: list[dict[str, Any]] = []
    for tenants in (int(t) for t in args.tenants.split(",")):
        for round_ in range(2):
            for name, store_class in (("baseline", baseline), ("current", RedisEdgeStore)):
                measured = await _run(store_class, args.jobs, args.workers, tenants)
                rows.append({"tenants": tenants, "store": name, "round": round_ + 1, **measured})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tenants", default="1,50")
    parser.add_argument("--baseline", default="ee52707^")
    args = parser.parse_args()
    rows = asyncio.run(_main(args))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    settings = f"{args.jobs} jobs, {args.workers} workers, baseline {args.baseline}, Redis on 127.0.0.1"
    lines = [
        "# Redis job queue: cost per job, baseline store vs current",
        "",
        f"{settings}; {machine}. `.venv/bin/python -m bench.edge_queue`",
        "",
        "| tenants | store | round | submit (ms/job) | claim + finish (ms/job) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['tenants']} | {r['store']} | {r['round']} | {r['submit_ms']} | {r['claim_finish_ms']} |"
            for r in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edge_queue.md").write_text(text)
    (RESULTS / "edge_queue.json").write_text(
        json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

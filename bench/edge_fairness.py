"""Fair queueing: how long a quiet tenant's single job waits behind a noisy tenant's backlog.

    .venv/bin/python -m bench.edge_fairness [--jobs 1500] [--workers 32] [--latency-ms 50] [--backend memory|redis]

Starts the whole suite in this process on 127.0.0.1 (simulated provider at a fixed latency,
cache bypassed so every job is a model call), then measures, from SubmitChat to the job's end:
  alone        the quiet tenant's job with an empty queue (its normal latency)
  other tenant the quiet tenant's job submitted right after the noisy tenant's N jobs
  same tenant  the noisy tenant's own job submitted at the same moment: it waits behind the
               backlog first-in-first-out, which is what every tenant's job got before the
               queue took turns between tenants
and, for each, how many noisy jobs started between its submission and its start. Both tenants
use the same tier (so the same priority). Results go to bench/results/edge_fairness_<backend>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2

from services.kit.config import SERVICE_NAMES
from services.testing import Suite, start_suite
from tests.support.suite_config import ADMIN_KEY, write_test_config

RESULTS = Path(__file__).resolve().parent / "results"
TERMINAL = {edge_pb2.JOB_STATE_SUCCEEDED, edge_pb2.JOB_STATE_FAILED, edge_pb2.JOB_STATE_CANCELLED}
Auth = tuple[tuple[str, str], ...]


def _submit(text: str) -> edge_pb2.SubmitChatRequest:
    chat = edge_pb2.ChatRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        cache_mode=edge_pb2.CACHE_MODE_BYPASS,
    )
    return edge_pb2.SubmitChatRequest(chat=chat)


async def _key(suite: Suite, tenant: str) -> Auth:
    created = await suite.edge_admin.CreateApiKey(
        edge_pb2.CreateApiKeyRequest(tenant_id=tenant, user_id="u", tier="enterprise"),
        metadata=(("x-admin-key", ADMIN_KEY),),
    )
    return (("authorization", f"Bearer {created.api_key}"),)


async def _until_done(suite: Suite, job: edge_pb2.Job, auth: Auth) -> tuple[edge_pb2.Job, float]:
    while job.state not in TERMINAL:
        await asyncio.sleep(0.02)
        job = (await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job.job_id), metadata=auth)).job
    return job, time.time()


def _seconds(stamp: Any) -> float:
    return float(stamp.ToNanoseconds()) / 1e9


async def _run(jobs: int, workers: int, latency_ms: float, backend: str) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="ballast-fairness-"))
    environ = {
        **write_test_config(folder, sim_latency_ms=latency_ms),
        "BALLAST_EDGE_WORKERS": str(workers),
        "BALLAST_EDGE_STORE_POOL_SIZE": str(workers * 4 + 16),
        "BALLAST_EDGE_MAX_QUEUED_PER_USER": "0",
        "BALLAST_EDGE_TIER_MAX_QUEUED": "",
    }
    if backend == "redis":
        environ["BALLAST_EDGE_STORE"] = (
            f"redis://127.0.0.1:6379/0?key_prefix=bench-fair-{secrets.token_hex(4)}:"
        )
    suite = await start_suite(SERVICE_NAMES, environ)
    try:
        noisy, quiet = await _key(suite, "noisy"), await _key(suite, "quiet")
        alone = (await suite.edge.SubmitChat(_submit("a quiet question"), metadata=quiet)).job
        alone_done, alone_end = await _until_done(suite, alone, quiet)
        noisy_ids: list[str] = []
        for start in range(0, jobs, 100):
            replies = await asyncio.gather(
                *(
                    suite.edge.SubmitChat(_submit(f"noisy question {i}"), metadata=noisy)
                    for i in range(start, min(jobs, start + 100))
                )
            )
            noisy_ids += [r.job.job_id for r in replies]
        other, same = await asyncio.gather(
            suite.edge.SubmitChat(_submit("another quiet question"), metadata=quiet),
            suite.edge.SubmitChat(_submit("the noisy tenant's urgent question"), metadata=noisy),
        )
        (other_done, other_end), (same_done, same_end) = await asyncio.gather(
            _until_done(suite, other.job, quiet), _until_done(suite, same.job, noisy)
        )
        started: list[float] = []
        for start in range(0, len(noisy_ids), 100):
            got = await asyncio.gather(
                *(
                    suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=noisy)
                    for job_id in noisy_ids[start : start + 100]
                )
            )
            started += [_seconds(r.job.started_at) for r in got if r.job.HasField("started_at")]

        def row(job: edge_pb2.Job, end: float) -> dict[str, Any]:
            submitted, began = _seconds(job.created_at), _seconds(job.started_at)
            return {
                "state": edge_pb2.JobState.Name(job.state),
                "seconds": round(end - submitted, 3),
                "ahead": sum(1 for at in started if submitted < at < began),
            }

        return {
            "alone": row(alone_done, alone_end),
            "other tenant": row(other_done, other_end),
            "same tenant": row(same_done, same_end),
        }
    finally:
        await suite.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--backend", choices=["memory", "redis"], default="memory")
    args = parser.parse_args()
    rows = asyncio.run(_run(args.jobs, args.workers, args.latency_ms, args.backend))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    settings = (
        f"{args.jobs} noisy jobs, {args.workers} workers, model latency {args.latency_ms:g} ms, "
        f"edge store {args.backend}"
    )
    lines = [
        "# Fair queueing: a quiet tenant's job behind a noisy tenant's backlog",
        "",
        f"{settings}; {machine}. `.venv/bin/python -m bench.edge_fairness`",
        "",
        "| job | state | submit → end (s) | noisy jobs started ahead of it |",
        "|---|---|---|---|",
        *(f"| {name} | {r['state']} | {r['seconds']} | {r['ahead']} |" for name, r in rows.items()),
        "",
        "`same tenant` waits first-in-first-out behind the backlog, as every tenant's job did before",
        "the queue took turns between tenants; `other tenant` waits for at most one noisy job plus",
        "the claims already in progress.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"edge_fairness_{args.backend}.md").write_text(text)
    (RESULTS / f"edge_fairness_{args.backend}.json").write_text(
        json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

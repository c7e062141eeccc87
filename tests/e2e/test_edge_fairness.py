"""Fair queueing end to end: a noisy tenant's 1,500 queued jobs do not hold up another tenant's
single job beyond the jobs already being worked on plus one (counted in jobs, not seconds)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2

from services.kit.config import SERVICE_NAMES
from tests.conftest import SuiteFactory
from tests.e2e.conftest import new_tenant, write_test_config

NOISY_JOBS = 1500
WORKERS = 4
TERMINAL = {edge_pb2.JOB_STATE_SUCCEEDED, edge_pb2.JOB_STATE_FAILED, edge_pb2.JOB_STATE_CANCELLED}


def _seconds(stamp: object) -> float:
    return float(stamp.ToNanoseconds()) / 1e9  # type: ignore[attr-defined]


def _submit(text: str) -> edge_pb2.SubmitChatRequest:
    # Bypass the cache: every job must cost a model call, as distinct questions would.
    chat = edge_pb2.ChatRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        cache_mode=edge_pb2.CACHE_MODE_BYPASS,
    )
    return edge_pb2.SubmitChatRequest(chat=chat)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_noisy_tenant_does_not_hold_up_another_tenants_job(
    store: str, suite_factory: SuiteFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    environ = {
        # 50 ms per model call: the noisy backlog takes a while to drain with four workers.
        **write_test_config(tmp_path, sim_latency_ms=50),
        "BALLAST_EDGE_WORKERS": str(WORKERS),
        "BALLAST_EDGE_MAX_QUEUED_PER_USER": "0",
        "BALLAST_EDGE_TIER_MAX_QUEUED": "",
    }
    if store == "redis":
        environ["BALLAST_EDGE_STORE"] = request.getfixturevalue("redis_url")
    suite = await suite_factory(SERVICE_NAMES, environ)
    noisy, quiet = await new_tenant(suite), await new_tenant(suite)
    # Same tier, so the same priority: only fairness between tenants can let the quiet job through.
    noisy_auth, quiet_auth = noisy.auth("enterprise"), quiet.auth("enterprise")
    noisy_ids: list[str] = []
    for start in range(0, NOISY_JOBS, 100):
        replies = await asyncio.gather(
            *(
                suite.edge.SubmitChat(_submit(f"noisy question {index}"), metadata=noisy_auth)
                for index in range(start, start + 100)
            )
        )
        noisy_ids += [reply.job.job_id for reply in replies]
    mine = (await suite.edge.SubmitChat(_submit("the quiet tenant's question"), metadata=quiet_auth)).job
    async with asyncio.timeout(120):
        while mine.state not in TERMINAL:
            await asyncio.sleep(0.05)
            mine = (
                await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=mine.job_id), metadata=quiet_auth)
            ).job
    assert mine.state == edge_pb2.JOB_STATE_SUCCEEDED, mine.error
    submitted, started = _seconds(mine.created_at), _seconds(mine.started_at)
    noisy_jobs = []
    for start in range(0, NOISY_JOBS, 100):
        got = await asyncio.gather(
            *(
                suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=noisy_auth)
                for job_id in noisy_ids[start : start + 100]
            )
        )
        noisy_jobs += [reply.job for reply in got]
    started_at = [_seconds(job.started_at) if job.HasField("started_at") else None for job in noisy_jobs]
    overtook = sum(1 for at in started_at if at is not None and submitted < at <= started)
    still_waiting = sum(1 for at in started_at if at is None or at > started)
    # The backlog was real: most noisy jobs started after the quiet one.
    assert still_waiting >= 100, still_waiting
    # Ahead of the quiet job: at most the noisy job already admitted, plus one claim per worker
    # racing with its submission. First-in-first-out would have put hundreds ahead of it.
    assert overtook <= WORKERS + 1, overtook

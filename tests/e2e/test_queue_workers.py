"""The burst queue's workers as their own processes (`ballast serve worker`), as a cluster runs
them: an edge with its workers off takes a burst of jobs, two worker processes drain it, and one
worker is SIGKILLed while it holds jobs. Every job still finishes, exactly once. A worker serves
health and metrics, never the edge's API.

The worker to be killed talks to a router whose simulated model never answers within the test, so
it is certainly mid-job when it dies; its replacement (as a Deployment would start one) and the
other worker use a fast router. Redis is a private instance; nothing here waits on a timing.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from ballast.sessions.v1 import sessions_pb2

from services.edge.store.base import PRIORITY_ORDER
from services.edge.store.redis import GROUP, stream_key
from services.testing import Suite, start_suite
from tests.support.backends import PrivateRedis, private_redis
from tests.support.suite_config import write_test_config
from tests.support.waiting import eventually
from tests.support.workers import CALLER, DEADLINE, KEY, TERMINAL, Worker, start_worker, submit_burst

# bk_demo_enterprise's tier is queued at this priority (BALLAST_EDGE_TIER_PRIORITIES' default).
STREAM = "{edge}:stream:high"
BURST = 30


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


async def _pending_by_consumer(client: aioredis.Redis) -> dict[str, list[str]]:
    """Entry ids pending in the workers' group, by consumer."""
    entries: Any = await client.xpending_range(STREAM, GROUP, min="-", max="+", count=1000)
    by_consumer: dict[str, list[str]] = {}
    for entry in entries:
        by_consumer.setdefault(entry["consumer"].decode(), []).append(entry["message_id"].decode())
    return by_consumer


async def _job_ids(client: aioredis.Redis, entry_ids: list[str]) -> set[str]:
    jobs: set[str] = set()
    for entry_id in entry_ids:
        found: Any = await client.xrange(STREAM, min=entry_id, max=entry_id)
        if found:
            jobs.add(found[0][1][b"job_id"].decode())
    return jobs


@pytest.fixture
async def suites(
    tmp_path: Path, redis_server: PrivateRedis
) -> AsyncIterator[tuple[Suite, Suite, dict[str, str]]]:
    fast_dir, slow_dir = tmp_path / "fast", tmp_path / "slow"
    fast_dir.mkdir()
    slow_dir.mkdir()
    environ = {
        **write_test_config(fast_dir, sim_latency_ms=20, sim_rpm=1_000_000),
        "BALLAST_EDGE_STORE": redis_server.url,
        "BALLAST_EDGE_WORKERS": "0",
    }
    suite = await start_suite(["router", "limiter", "cache", "sessions", "edge"], environ)
    # A model that answers in ten minutes: a worker that calls it is mid-job until it is killed.
    slow = await start_suite(
        ["router"],
        {
            **write_test_config(slow_dir, sim_latency_ms=600_000, sim_rpm=1_000_000),
            "BALLAST_ROUTER_ATTEMPT_TIMEOUT": "20m",
        },
    )
    worker_env = {
        "BALLAST_EDGE_STORE": redis_server.url,
        "BALLAST_EDGE_WORKERS": "3",
        # A dead worker's jobs are reclaimed after a second without its heartbeat, and its
        # consumer, holding nothing then, is removed a second later.
        "BALLAST_EDGE_JOB_CLAIM_IDLE": "1s",
        "BALLAST_EDGE_CONSUMER_IDLE": "1s",
        "BALLAST_GRACE_PERIOD": "30s",
        "BALLAST_CLOSE_TIMEOUT": "10s",
        **{
            f"BALLAST_{name.upper()}_ADDR": suite.address(name)
            for name in ("router", "limiter", "cache", "sessions")
        },
        "BALLAST_LOG_FORMAT": "text",
    }
    yield suite, slow, worker_env
    await slow.stop(0)
    await suite.stop(0)


async def test_worker_processes_drain_a_burst_and_a_killed_worker_loses_no_job(
    suites: tuple[Suite, Suite, dict[str, str]], redis_server: PrivateRedis, tmp_path: Path
) -> None:
    suite, slow, worker_env = suites
    edge = suite.edge
    client = aioredis.Redis.from_url(redis_server.url)
    workers: list[Worker] = []
    try:
        # The burst arrives while no worker runs: the edge (workers off) only queues it.
        jobs = await submit_burst(edge, BURST, "burst")

        # Worker A hangs in its model calls; kill it once it holds jobs.
        doomed = await start_worker(
            {**worker_env, "BALLAST_ROUTER_ADDR": slow.address("router")}, tmp_path, "worker-a"
        )
        workers.append(doomed)
        deadline = time.monotonic() + DEADLINE
        held: list[str] = []
        while not held:
            assert time.monotonic() < deadline, "worker A never claimed a job"
            held = [
                e for c, ids in (await _pending_by_consumer(client)).items() if doomed.owns(c) for e in ids
            ]
            await asyncio.sleep(0.05)
        # A's model calls never return, so what it held then it still holds when it dies.
        cut = await _job_ids(client, held)
        doomed.process.send_signal(signal.SIGKILL)
        assert await doomed.process.wait() == -signal.SIGKILL

        # Worker B, and A's replacement (as its Deployment would start one), on the fast router.
        workers.append(await start_worker(worker_env, tmp_path, "worker-b"))
        workers.append(await start_worker(worker_env, tmp_path, "worker-a2"))
        await _serves_only_health_and_metrics(workers[1])

        states: dict[str, edge_pb2.Job] = {}
        while len(states) < len(jobs):
            assert time.monotonic() < deadline, f"{len(jobs) - len(states)} jobs unfinished: " + "".join(
                w.log.read_text()[-1500:] for w in workers[1:]
            )
            for job_id in jobs:
                if job_id not in states:
                    job = (
                        await edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY, timeout=30)
                    ).job
                    if job.state in TERMINAL:
                        states[job_id] = job
            await asyncio.sleep(0.2)

        failed = {
            j: (s.error.code, s.error.message)
            for j, s in states.items()
            if s.state != edge_pb2.JOB_STATE_SUCCEEDED
        }
        assert not failed
        # The jobs the dead worker held were run again, by a live worker.
        assert cut and all(states[job_id].attempts >= 2 for job_id in cut), {
            job_id: states[job_id].attempts for job_id in cut
        }
        # Exactly once: each job's session holds its question and one answer, however often it ran.
        for job_id, session_id in jobs.items():
            turns = await suite.sessions.ListTurns(
                sessions_pb2.ListTurnsRequest(caller=CALLER, session_id=session_id, page_size=50)
            )
            roles = [turn.message.role for turn in turns.turns]
            assert roles == [common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT], (job_id, roles)
        # Nothing is left in the queue.
        assert await _pending_by_consumer(client) == {}
        # The killed worker's consumer, holding nothing once its jobs were reclaimed, is removed
        # by the live workers.
        await eventually(
            lambda: _no_consumer_of([doomed], client),
            what="the killed worker's consumer removed",
            within=DEADLINE,
        )
    finally:
        for worker in workers:
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        try:
            # A live worker drains and exits cleanly on SIGTERM, as on a scale-down...
            for worker in workers[1:]:
                assert await asyncio.wait_for(worker.process.wait(), DEADLINE) == 0, worker.log.read_text()[
                    -2000:
                ]
            # ...and leaves no consumer behind in the group.
            assert await _no_consumer_of(workers, client)
        finally:
            await client.aclose()


async def _no_consumer_of(workers: list[Worker], client: aioredis.Redis) -> bool:
    for priority in PRIORITY_ORDER:
        consumers: Any = await client.xinfo_consumers(stream_key(priority), GROUP)
        if any(w.owns(c["name"].decode()) for c in consumers for w in workers):
            return False
    return True


async def _serves_only_health_and_metrics(worker: Worker) -> None:
    """A worker takes its work from the queue, not from callers: no EdgeService, but health and
    the queue's metrics (what an autoscaler reads)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await edge_pb2_grpc.EdgeServiceStub(channel).GetJob(
                edge_pb2.GetJobRequest(job_id="job_x"), metadata=KEY, timeout=30
            )
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read().decode())
    assert "ballast_edge_queue_depth" in text


def test_worker_refuses_a_queue_it_cannot_share() -> None:
    from services.edge.config import WorkerSettings
    from services.kit.config import ConfigError, Env

    env = Env({"BALLAST_EDGE_STORE": "memory://", "BALLAST_EDGE_WORKERS": "0"})
    WorkerSettings.from_env(env)
    with pytest.raises(ConfigError) as raised:
        env.check()
    message = str(raised.value)
    assert "BALLAST_EDGE_STORE='memory://' is invalid for a queue worker" in message
    assert "BALLAST_EDGE_WORKERS=0 is invalid for a queue worker" in message


async def test_a_stopping_worker_finishes_the_jobs_it_runs(tmp_path: Path, redis_url: str) -> None:
    """SIGTERM's drain (kit: server.stop alongside app.drain): the worker stops claiming and the
    job it runs ends before it closes, instead of waiting BALLAST_EDGE_JOB_CLAIM_IDLE to be rerun."""
    environ = {
        # Each model call takes two seconds: the job is mid-call when the worker is stopped.
        **write_test_config(tmp_path, sim_latency_ms=2000, sim_rpm=1_000_000),
        "BALLAST_EDGE_STORE": redis_url,
        "BALLAST_EDGE_WORKERS": "0",
    }
    suite = await start_suite(["router", "limiter", "cache", "sessions", "edge"], environ)
    addresses = {
        f"BALLAST_{name.upper()}_ADDR": suite.address(name)
        for name in ("router", "limiter", "cache", "sessions")
    }
    worker = await start_suite(
        ["worker"], {**environ, **addresses, "BALLAST_EDGE_WORKERS": "2", "BALLAST_EDGE_JOB_CLAIM_IDLE": "1h"}
    )
    try:
        chat = edge_pb2.ChatRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="drain me")]
        )
        job_id = (await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=chat), metadata=KEY)).job.job_id
        deadline = time.monotonic() + DEADLINE
        state = edge_pb2.JOB_STATE_QUEUED
        while state == edge_pb2.JOB_STATE_QUEUED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            state = (await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY)).job.state
        await worker.stop(grace=DEADLINE)
        job = (await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY)).job
        assert job.state == edge_pb2.JOB_STATE_SUCCEEDED and job.attempts == 1
    finally:
        await worker.stop(0)
        await suite.stop(0)


async def test_a_worker_whose_drain_cuts_a_job_hands_it_back_and_leaves_no_consumer(
    tmp_path: Path, redis_url: str
) -> None:
    """A job still running when the drain ends is put back in line by the stopping worker itself,
    at once, not after BALLAST_EDGE_JOB_CLAIM_IDLE (an hour here); and the worker's consumer
    leaves the group, so scaled-down pods do not pile up in XINFO CONSUMERS."""
    from services.kit.redisconn import split_key_prefix

    fast_dir, slow_dir = tmp_path / "fast", tmp_path / "slow"
    fast_dir.mkdir()
    slow_dir.mkdir()
    environ = {**write_test_config(fast_dir), "BALLAST_EDGE_STORE": redis_url, "BALLAST_EDGE_WORKERS": "0"}
    suite = await start_suite(["router", "limiter", "cache", "sessions", "edge"], environ)
    # A model that answers in ten minutes: the job is surely mid-call when the drain ends.
    slow = await start_suite(
        ["router"],
        {
            **write_test_config(slow_dir, sim_latency_ms=600_000, sim_rpm=1_000_000),
            "BALLAST_ROUTER_ATTEMPT_TIMEOUT": "20m",
        },
    )
    addresses = {
        f"BALLAST_{name.upper()}_ADDR": suite.address(name) for name in ("limiter", "cache", "sessions")
    }
    worker = await start_suite(
        ["worker"],
        {
            **environ,
            **addresses,
            "BALLAST_ROUTER_ADDR": slow.address("router"),
            "BALLAST_EDGE_WORKERS": "2",
            "BALLAST_EDGE_JOB_CLAIM_IDLE": "1h",
        },
    )
    clean, prefix = split_key_prefix(redis_url)
    client = aioredis.Redis.from_url(clean)
    try:
        chat = edge_pb2.ChatRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="cut me")]
        )
        job_id = (await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=chat), metadata=KEY)).job.job_id

        async def state() -> int:
            reply = await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY)
            return int(reply.job.state)

        await eventually(
            lambda: _equals(state(), edge_pb2.JOB_STATE_RUNNING),
            what="the worker running the job",
            within=DEADLINE,
        )
        # A drain shorter than the model call: the job is cut.
        await worker.stop(grace=0.2)
        job = (await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY)).job
        assert job.state == edge_pb2.JOB_STATE_QUEUED and job.attempts == 1
        for priority in PRIORITY_ORDER:
            stream = stream_key(priority, prefix)
            consumers: Any = await client.xinfo_consumers(stream, GROUP)
            assert [c["name"] for c in consumers if c["name"].startswith(b"worker-")] == [], priority
            groups: Any = await client.xinfo_groups(stream)
            assert groups[0]["pending"] == 0, priority
    finally:
        await client.aclose()
        await worker.stop(0)
        await slow.stop(0)
        await suite.stop(0)


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_an_edge_without_workers_keeps_the_queue_moving(tmp_path: Path, redis_url: str) -> None:
    """With its workers apart (and maybe scaled to zero), the edge still puts back on the streams
    the jobs of a worker that died and the parked jobs whose time came: they show as the lag an
    autoscaler wakes workers on, and nothing is stranded while no worker runs."""
    from services.edge.store.redis import RedisEdgeStore, stream_key
    from services.kit.redisconn import split_key_prefix

    environ = {
        **write_test_config(tmp_path),
        "BALLAST_EDGE_STORE": redis_url,
        "BALLAST_EDGE_WORKERS": "0",
        "BALLAST_EDGE_JOB_CLAIM_IDLE": "1s",
    }
    suite = await start_suite(["router", "limiter", "cache", "sessions", "edge"], environ)
    store = RedisEdgeStore(redis_url)
    clean, prefix = split_key_prefix(redis_url)
    client = aioredis.Redis.from_url(clean)
    try:
        chat = edge_pb2.ChatRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]
        )
        abandoned = (
            await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=chat), metadata=KEY)
        ).job.job_id
        parked = (await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=chat), metadata=KEY)).job.job_id
        # A worker claims both, parks one until its quota returns, and dies holding the other.
        claims = {}
        for _ in range(2):
            claim = await store.claim("worker-gone", block=5.0)
            assert claim is not None
            claims[claim.job.job_id] = claim
        await store.park(claims[parked], time.time() + 1.0)
        stream = stream_key("high", prefix)
        deadline = time.monotonic() + DEADLINE
        while True:
            # Both back in line: nothing pending or parked, and the stream shows a lag (fair
            # admission keeps one entry per tenant there, the tenant's next in its backlog).
            groups: Any = await client.xinfo_groups(stream)
            lag, pending = next((g["lag"], g["pending"]) for g in groups)
            depth = (await store.depth())["high"]
            still_parked = await client.zcard(f"{prefix}{{edge}}:parked:high")
            if lag >= 1 and pending == 0 and still_parked == 0 and depth == 2:
                break
            assert time.monotonic() < deadline, f"lag {lag}, pending {pending}, depth {depth}: jobs stranded"
            await asyncio.sleep(0.1)
        for job_id in (abandoned, parked):
            job = (await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY)).job
            assert job.state == edge_pb2.JOB_STATE_QUEUED
    finally:
        await client.aclose()
        await store.close()
        await suite.stop(0)

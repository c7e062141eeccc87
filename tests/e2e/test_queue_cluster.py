"""The burst queue on a real Redis Cluster (three primaries, each with a replica): an edge with
its workers off queues a burst, two `ballast serve worker` processes drain it, and the primary of
the queue's shard fails over to its replica mid-drain. Every job finishes, exactly once.

The limiter and the cache run on the same cluster, so the whole request path of each job is
on it. The queue's keys share the `{edge}` tag (one shard; see services/edge/README.md).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from ballast.sessions.v1 import sessions_pb2

from services.edge.store.redis import GROUP, stream_key
from services.testing import start_suite
from tests.support.backends import PrivateRedisCluster
from tests.support.suite_config import write_test_config
from tests.support.workers import CALLER, DEADLINE, KEY, TERMINAL, Worker, start_worker, submit_burst

BURST = 60


async def test_workers_drain_a_burst_exactly_once_through_a_failover_of_the_queues_primary(
    tmp_path: Path, redis_cluster: PrivateRedisCluster, redis_cluster_url: str
) -> None:
    environ = {
        # Jobs take a while, so the failover lands mid-drain.
        **write_test_config(tmp_path, sim_latency_ms=500, sim_rpm=1_000_000),
        "BALLAST_EDGE_STORE": redis_cluster_url,
        "BALLAST_LIMITER_STORE": redis_cluster_url,
        "BALLAST_CACHE_STORE": redis_cluster_url,
        # Behaviour on a cluster, not outages: a slow answer on a busy machine is not an outage.
        "BALLAST_LIMITER_STORE_TIMEOUT": "30s",
        "BALLAST_EDGE_WORKERS": "0",
    }
    suite = await start_suite(["router", "limiter", "cache", "sessions", "edge"], environ)
    workers: list[Worker] = []
    try:
        edge = suite.edge
        jobs = await submit_burst(edge, BURST, "cluster")

        worker_env = {
            "BALLAST_EDGE_STORE": redis_cluster_url,
            "BALLAST_EDGE_WORKERS": "2",
            "BALLAST_EDGE_JOB_CLAIM_IDLE": "2s",
            **{
                f"BALLAST_{name.upper()}_ADDR": suite.address(name)
                for name in ("router", "limiter", "cache", "sessions")
            },
            "BALLAST_LOG_FORMAT": "text",
        }
        for name in ("worker-a", "worker-b"):
            workers.append(await start_worker(worker_env, tmp_path, name))

        states: dict[str, edge_pb2.Job] = {}
        deadline = time.monotonic() + DEADLINE

        async def poll() -> None:
            for job_id in jobs:
                if job_id not in states:
                    job = (
                        await edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=KEY, timeout=60)
                    ).job
                    if job.state in TERMINAL:
                        states[job_id] = job

        while not states:
            assert time.monotonic() < deadline, "no job finished: " + workers[0].log.read_text()[-1500:]
            await poll()
            await asyncio.sleep(0.1)
        # Mid-drain: the queue's primary hands over to its replica.
        owner = redis_cluster.master_of("{edge}")
        new_owner = await asyncio.to_thread(redis_cluster.fail_over, owner)
        assert new_owner != owner and redis_cluster.master_of("{edge}") == new_owner
        await poll()
        assert len(states) < len(jobs), "the burst drained before the failover ended"

        while len(states) < len(jobs):
            assert time.monotonic() < deadline, f"{len(jobs) - len(states)} jobs unfinished: " + "".join(
                w.log.read_text()[-1500:] for w in workers
            )
            await poll()
            await asyncio.sleep(0.2)

        failed = {
            j: (s.error.code, s.error.message)
            for j, s in states.items()
            if s.state != edge_pb2.JOB_STATE_SUCCEEDED
        }
        assert not failed
        # Exactly once: each job's session holds its question and one answer.
        for job_id, session_id in jobs.items():
            turns = await suite.sessions.ListTurns(
                sessions_pb2.ListTurnsRequest(caller=CALLER, session_id=session_id, page_size=50)
            )
            roles = [turn.message.role for turn in turns.turns]
            assert roles == [common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT], (job_id, roles)
        # Nothing is left pending in the workers' group.
        prefix = dict(parse_qsl(urlsplit(redis_cluster_url).query))["key_prefix"]
        client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.primaries()[0])
        try:
            pending: Any = client.xpending(stream_key("high", prefix), GROUP)
        finally:
            client.close()
        assert pending["pending"] == 0
    finally:
        for worker in workers:
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            await asyncio.wait_for(worker.process.wait(), DEADLINE)
        await suite.stop(0)

"""The edge under failure: a worker killed mid-job, dead dependencies, overload."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc

from tests.conftest import SuiteFactory
from tests.e2e.conftest import write_test_config
from tests.support.backends import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = (("authorization", "Bearer bk_demo_paid"),)


def _chat(text: str, session_id: str = "") -> edge_pb2.ChatRequest:
    return edge_pb2.ChatRequest(
        session_id=session_id, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]
    )


async def test_a_job_survives_its_worker_being_killed_and_completes_once(
    suite_factory: SuiteFactory, redis_url: str, tmp_path: Path
) -> None:
    # A slow model, so the worker is certainly mid-job when it dies.
    environ = write_test_config(tmp_path, sim_latency_ms=2500)
    backends = await suite_factory(["router", "limiter", "cache", "sessions"], environ)
    edge_env = {
        **os.environ,
        **environ,
        "BALLAST_EDGE_STORE": redis_url,
        "BALLAST_EDGE_PORT": str(free_port()),
        "BALLAST_EDGE_HTTP_PORT": "0",
        "BALLAST_EDGE_WORKERS": "1",
        "BALLAST_EDGE_JOB_CLAIM_IDLE": "1s",
        "OTEL_SDK_DISABLED": "true",
        **{f"BALLAST_{name.upper()}_ADDR": backends.address(name) for name in backends.running},
    }
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.edge", cwd=ROOT, env=edge_env
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge_env['BALLAST_EDGE_PORT']}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            edge = edge_pb2_grpc.EdgeServiceStub(channel)
            session = (await edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=KEY)).session
            job = (
                await edge.SubmitChat(
                    edge_pb2.SubmitChatRequest(chat=_chat("survive this", session.session_id)), metadata=KEY
                )
            ).job
            deadline = time.monotonic() + 20
            while (await edge.GetJob(edge_pb2.GetJobRequest(job_id=job.job_id), metadata=KEY)).job.state != (
                edge_pb2.JOB_STATE_RUNNING
            ):
                assert time.monotonic() < deadline, "the job never started"
                await asyncio.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        await asyncio.wait_for(doomed.wait(), 10)
    finally:
        if doomed.returncode is None:
            doomed.kill()
            await doomed.wait()
    # Another replica on the same Redis reclaims the abandoned job and finishes it.
    survivor = await suite_factory(
        ["edge"],
        {
            **environ,
            "BALLAST_EDGE_STORE": redis_url,
            "BALLAST_EDGE_JOB_CLAIM_IDLE": "1s",
            **{f"BALLAST_{name.upper()}_ADDR": backends.address(name) for name in backends.running},
        },
    )
    deadline = time.monotonic() + 30
    while True:
        finished = (await survivor.edge.GetJob(edge_pb2.GetJobRequest(job_id=job.job_id), metadata=KEY)).job
        if finished.state not in (edge_pb2.JOB_STATE_QUEUED, edge_pb2.JOB_STATE_RUNNING):
            break
        assert time.monotonic() < deadline, "the reclaimed job never finished"
        await asyncio.sleep(0.1)
    assert finished.state == edge_pb2.JOB_STATE_SUCCEEDED, finished
    assert finished.attempts == 2
    info = (
        await survivor.edge.GetSession(
            edge_pb2.GetSessionRequest(session_id=session.session_id), metadata=KEY
        )
    ).session
    assert info.turns == 2 and info.version == 1  # the user turn and the answer, once


async def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_a_limiter_outage_fails_open_or_closed_as_configured(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path)
    backends = await suite_factory(["router", "cache", "sessions"], environ)
    addresses = {f"BALLAST_{n.upper()}_ADDR": backends.address(n) for n in backends.running}
    dead = {"BALLAST_LIMITER_ADDR": await _dead_address(), "BALLAST_EDGE_DOWNSTREAM_TIMEOUT": "300ms"}
    open_edge = await suite_factory(
        ["edge"], {**environ, **addresses, **dead, "BALLAST_EDGE_LIMITER_FAILURE": "open"}
    )
    answer = await open_edge.edge.Chat(_chat("still there?"), metadata=KEY)
    assert answer.message.content
    closed_edge = await suite_factory(
        ["edge"], {**environ, **addresses, **dead, "BALLAST_EDGE_LIMITER_FAILURE": "closed"}
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await closed_edge.edge.Chat(_chat("still there?"), metadata=KEY)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "limiter" in (info.value.details() or "")


async def test_a_cache_outage_costs_a_model_call_not_the_chat(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path)
    backends = await suite_factory(["router", "limiter", "sessions"], environ)
    addresses = {f"BALLAST_{n.upper()}_ADDR": backends.address(n) for n in backends.running}
    edge = await suite_factory(
        ["edge"],
        {
            **environ,
            **addresses,
            "BALLAST_CACHE_ADDR": await _dead_address(),
            "BALLAST_EDGE_DOWNSTREAM_TIMEOUT": "300ms",
        },
    )
    for _ in range(2):
        answer = await edge.edge.Chat(_chat("no cache today"), metadata=KEY)
        assert answer.message.content and not answer.cache_hit


async def test_a_sessions_outage_fails_session_chats_only(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path)
    backends = await suite_factory(["router", "limiter", "cache"], environ)
    addresses = {f"BALLAST_{n.upper()}_ADDR": backends.address(n) for n in backends.running}
    edge = await suite_factory(
        ["edge"],
        {
            **environ,
            **addresses,
            "BALLAST_SESSIONS_ADDR": await _dead_address(),
            "BALLAST_EDGE_DOWNSTREAM_TIMEOUT": "300ms",
        },
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edge.edge.Chat(_chat("remember me", "s-1"), metadata=KEY)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sessions" in (info.value.details() or "")
    assert (await edge.edge.Chat(_chat("stateless is fine"), metadata=KEY)).message.content


async def test_calls_beyond_the_in_flight_cap_are_shed_at_once(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = write_test_config(tmp_path, sim_latency_ms=600)
    suite = await suite_factory(
        ["router", "limiter", "cache", "sessions", "edge"], {**environ, "BALLAST_EDGE_MAX_IN_FLIGHT": "2"}
    )
    started = time.monotonic()
    results = await asyncio.gather(
        *(suite.edge.Chat(_chat(f"busy {i}"), metadata=KEY) for i in range(6)), return_exceptions=True
    )
    shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if isinstance(r, edge_pb2.ChatResponse)]
    assert len(served) == 2 and len(shed) == 4
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in shed)
    assert "in flight" in (shed[0].details() or "")
    assert time.monotonic() - started < 5

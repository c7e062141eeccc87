"""The whole suite with mutual TLS between every service: the public API works end to end, and
no internal port answers a caller without a certificate from the suite's CA.

The fault suite (test_faults.py) and the surge (test_surge.py) also run with mTLS on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.certs import make_certs
from services.kit.config import SERVICE_NAMES
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.e2e.conftest import ADMIN_KEY, new_tenant
from tests.support.suite_config import write_test_config
from tests.support.waiting import eventually

INTERNAL = ("router", "limiter", "cache", "sessions")


def _user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


@pytest.fixture
async def suite(suite_factory: SuiteFactory, tmp_path: Path) -> Suite:
    return await suite_factory(SERVICE_NAMES, write_test_config(tmp_path), tls_dir=tmp_path / "certs")


async def test_chat_works_end_to_end_with_mtls_between_every_service(suite: Suite) -> None:
    for name in INTERNAL:
        settings = suite.running[name].app.server_settings
        assert settings.server_tls is not None and settings.server_tls.mutual, name
    edge = suite.running["edge"].app.server_settings
    assert edge.client_tls is not None and edge.client_tls.mutual
    tenant = await new_tenant(suite)
    auth = tenant.auth("paid")
    session = (await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=auth)).session
    question = "What is the capital of France? Answer in one word."
    first = await suite.edge.Chat(
        edge_pb2.ChatRequest(session_id=session.session_id, messages=[_user(question)]),
        metadata=auth,
        timeout=60,
    )
    assert first.message.content and first.usage.total_tokens > 0 and first.session_version == 1
    # Sessions kept the turn (edge -> sessions), and the answer was stored in the cache (edge -> cache).
    again = await suite.edge.Chat(edge_pb2.ChatRequest(messages=[_user(question)]), metadata=auth, timeout=60)
    assert again.cache_hit
    streamed = [
        chunk
        async for chunk in suite.edge.ChatStream(
            edge_pb2.ChatStreamRequest(
                chat=edge_pb2.ChatRequest(session_id=session.session_id, messages=[_user("and Spain?")])
            ),
            metadata=auth,
            timeout=60,
        )
    ]
    assert streamed
    # A queued job: a worker inside the edge calls the limiter and the router over mTLS.
    job = (
        await suite.edge.SubmitChat(
            edge_pb2.SubmitChatRequest(chat=edge_pb2.ChatRequest(messages=[_user("queued over mTLS")])),
            metadata=tenant.auth("enterprise"),
        )
    ).job
    for _ in range(600):
        job = (
            await suite.edge.GetJob(
                edge_pb2.GetJobRequest(job_id=job.job_id), metadata=tenant.auth("enterprise")
            )
        ).job
        if job.state in (edge_pb2.JOB_STATE_SUCCEEDED, edge_pb2.JOB_STATE_FAILED):
            break
        await asyncio.sleep(0.1)
    assert job.state == edge_pb2.JOB_STATE_SUCCEEDED, job.error


async def test_no_internal_port_answers_plaintext_but_every_health_port_does(suite: Suite) -> None:
    for name in INTERNAL:
        running = suite.running[name]
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def serving(stub: health_pb2_grpc.HealthStub = stub) -> bool:
                # The cache reports NOT_SERVING until its embedding model has loaded.
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=20)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, what=f"{name} SERVING on its health port")


async def test_the_edge_serves_the_public_over_tls_without_asking_for_a_certificate(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    public = make_certs(tmp_path / "public", ["edge"])["edge"]
    environ = {
        **write_test_config(tmp_path),
        "BALLAST_EDGE_TLS_CERT_FILE": str(public.cert_file),
        "BALLAST_EDGE_TLS_KEY_FILE": str(public.key_file),
    }
    suite = await suite_factory(SERVICE_NAMES, environ, tls_dir=tmp_path / "certs")
    running = suite.running["edge"]
    # What a public client has: the CA that signed the edge's certificate, no certificate of its own.
    credentials = grpc.ssl_channel_credentials(root_certificates=public.ca_file.read_bytes())
    async with grpc.aio.secure_channel(running.address, credentials) as channel:
        created = await edge_pb2_grpc.EdgeAdminServiceStub(channel).CreateApiKey(
            edge_pb2.CreateApiKeyRequest(tenant_id="tls-tenant", user_id="u", tier="paid"),
            metadata=(("x-admin-key", ADMIN_KEY),),
        )
        reply = await edge_pb2_grpc.EdgeServiceStub(channel).Chat(
            edge_pb2.ChatRequest(messages=[_user("hello over TLS")]),
            metadata=(("authorization", f"Bearer {created.api_key}"),),
            timeout=60,
        )
        assert reply.message.content
    async with grpc.aio.insecure_channel(running.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

"""The shared bootstrap: health, reflection, error mapping and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from ballast.sessions.v1 import sessions_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.kit.clients import open_channel
from services.kit.config import SERVICE_NAMES
from services.kit.local import LocalFirstChannel
from services.kit.net import free_port
from services.kit.server import start_service
from tests.conftest import SuiteFactory
from tests.support.waiting import eventually
from tests.unit.kit import probe_app

FULL_NAMES = {
    "edge": "ballast.edge.v1.EdgeService",
    "router": "ballast.router.v1.RouterService",
    "limiter": "ballast.limiter.v1.LimiterService",
    "cache": "ballast.cache.v1.CacheService",
    "sessions": "ballast.sessions.v1.SessionsService",
}


async def _list_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in stub.ServerReflectionInfo(requests()):
        return {s.name for s in reply.list_services_response.service}
    return set()


async def test_every_service_serves_health_and_reflection(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(SERVICE_NAMES)
    for name in SERVICE_NAMES:
        channel = suite.channel(name)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", FULL_NAMES[name]):
            request = health_pb2.HealthCheckRequest(service=service)

            async def serving(
                health: health_pb2_grpc.HealthStub = health, request: health_pb2.HealthCheckRequest = request
            ) -> bool:
                # The cache reports NOT_SERVING until its embedding model has loaded.
                reply = await health.Check(request)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, what=f"{name} {service!r} SERVING")
        listed = await _list_services(channel)
        assert {
            FULL_NAMES[name],
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= listed
    assert "ballast.edge.v1.EdgeAdminService" in await _list_services(suite.channel("edge"))


async def test_health_of_an_unknown_service_is_not_found(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["limiter"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_pb2_grpc.HealthStub(suite.channel("limiter")).Check(
            health_pb2.HealthCheckRequest(service="ballast.nope.v1.Nope")
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(params=["network", "in-process"])
async def probe(request: pytest.FixtureRequest) -> object:
    """A channel to the probe service: over loopback TCP, or as another service of the same
    process calls it (services/kit/local.py); every status test runs both ways."""
    app = probe_app.make()
    service = await start_service(app)
    if request.param == "network":
        channel: grpc.aio.Channel = grpc.aio.insecure_channel(service.address)
    else:
        channel = open_channel(service.address, app.server_settings, app.telemetry)
        assert isinstance(channel, LocalFirstChannel) and channel.local_server() is not None
    yield channel
    await channel.close()
    await service.stop(0.1)


def _status_details(error: grpc.aio.AioRpcError) -> list[object]:
    status = rpc_status.from_call(error)
    assert status is not None
    out: list[object] = []
    for packed in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            if packed.Is(cls.DESCRIPTOR):
                detail = cls()
                packed.Unpack(detail)
                out.append(detail)
    return out


async def _fail(channel: grpc.aio.Channel, kind: str) -> grpc.aio.AioRpcError:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{probe_app.SERVICE}/Fail")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(kind.encode())
    return info.value


async def test_invalid_argument_names_the_field(probe: grpc.aio.Channel) -> None:
    error = await _fail(probe, "invalid")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "messages[0].content: must not be empty"
    (bad_request,) = _status_details(error)
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert bad_request.field_violations[0].field == "messages[0].content"


async def test_resource_exhausted_carries_retry_info(probe: grpc.aio.Channel) -> None:
    error = await _fail(probe, "exhausted")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry, info = _status_details(error)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 1500
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "requests_per_hour"


async def test_aborted_carries_the_current_version(probe: grpc.aio.Channel) -> None:
    error = await _fail(probe, "aborted")
    assert error.code() == grpc.StatusCode.ABORTED
    (info,) = _status_details(error)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.metadata["current_version"] == "7"


async def test_a_bug_is_internal_without_leaking_its_message(probe: grpc.aio.Channel) -> None:
    error = await _fail(probe, "bug")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in (error.details() or "")
    assert (error.details() or "").startswith("internal error (trace id")


async def test_an_unimplemented_method_is_unimplemented(probe: grpc.aio.Channel) -> None:
    error = await _fail(probe, "unimplemented")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_errors_in_a_stream_end_it_with_the_status(probe: grpc.aio.Channel) -> None:
    call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = probe.unary_stream(f"/{probe_app.SERVICE}/Stream")
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call(b"exhausted"):
            received.append(item)
    assert received == [b"first"]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_stop_drains_an_in_flight_call_before_closing() -> None:
    app = probe_app.make()
    service = await start_service(app)
    async with grpc.aio.insecure_channel(service.address) as channel:
        sleep: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{probe_app.SERVICE}/Sleep"
        )
        call = sleep(b"0.5")
        await app.sleeping.wait()
        stopping = asyncio.create_task(service.stop(5.0))
        assert await call == b"slept"
        await stopping
    assert app.closed


def test_sigterm_lets_an_in_flight_call_finish_and_exits_zero() -> None:
    port = free_port()
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.kit.probe_app", str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            sleep: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/{probe_app.SERVICE}/Sleep"
            )
            future = sleep.future(b"1.0")
            assert proc.stdout is not None and proc.stdout.readline().strip() == "probe sleeping"
            proc.send_signal(signal.SIGTERM)
            assert future.result(timeout=10) == b"slept"
        assert proc.wait(timeout=15) == 0
        assert proc.stdout is not None and "probe closed" in proc.stdout.read()
    finally:
        proc.kill()


async def test_each_service_serves_prometheus_metrics_of_its_calls(suite_factory: SuiteFactory) -> None:
    import httpx

    suite = await suite_factory(["limiter", "sessions"])
    await health_pb2_grpc.HealthStub(suite.channel("limiter")).Check(health_pb2.HealthCheckRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.sessions.GetSession(sessions_pb2.GetSessionRequest())
    async with httpx.AsyncClient() as client:
        sessions_port = suite.running["sessions"].metrics_port
        limiter_port = suite.running["limiter"].metrics_port
        assert sessions_port and limiter_port and sessions_port != limiter_port
        text = (await client.get(f"http://127.0.0.1:{sessions_port}/metrics")).text
        limiter_text = (await client.get(f"http://127.0.0.1:{limiter_port}/metrics")).text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("rpc_server_call_duration_seconds_count") and "GetSession" in line
    )
    assert 'rpc_grpc_status_code="INVALID_ARGUMENT"' in line and line.endswith(" 1.0")
    assert 'service_name="ballast-sessions"' in text or "ballast-sessions" in text
    # Health checks are not counted, and each service has its own registry.
    assert "GetSession" not in limiter_text and "Health" not in limiter_text

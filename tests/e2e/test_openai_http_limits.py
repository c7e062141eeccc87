"""The HTTP face with suites of its own: the request-size limit, shutdown, hang-ups, tracing."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from services.edge.app import EdgeApp
from services.kit.certs import make_certs
from services.router.app import RouterApp
from tests.conftest import SuiteFactory
from tests.e2e.test_telemetry import _service, _traced_suite
from tests.support.openai_http import http_url
from tests.support.suite_config import write_test_config


async def test_body_limit_and_a_trickled_body(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    environ = {**write_test_config(tmp_path), "BALLAST_EDGE_HTTP_MAX_BODY_BYTES": "2048"}
    small = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    async with httpx.AsyncClient(base_url=http_url(small), timeout=60) as http:
        key = {"authorization": "Bearer bk_demo_paid"}
        big = {"model": "sim-small", "messages": [_user_message("x" * 4096)]}
        declared = await http.post("/chat/completions", headers=key, json=big)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            payload = orjson.dumps(big)
            for start in range(0, len(payload), 512):
                yield payload[start : start + 512]

        # No content-length: the limit is counted as the body arrives.
        chunked = await http.post("/chat/completions", headers=key, content=chunks())
        assert chunked.status_code == 413
        fine = await http.post(
            "/chat/completions", headers=key, json={"model": "sim-small", "messages": [_user_message("hi")]}
        )
        assert fine.status_code == 200


def _user_message(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def http_url_of(app: EdgeApp) -> str:
    return f"http://127.0.0.1:{app.http.port}/v1"


async def test_a_shutdown_lets_an_http_request_in_flight_finish(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    # A slow provider, so the request is certainly in flight when the edge is told to stop.
    environ = write_test_config(tmp_path, sim_latency_ms=1500)
    suite = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    edge = suite.running["edge"]
    app = edge.app
    assert isinstance(app, EdgeApp)
    async with httpx.AsyncClient(base_url=http_url(suite), timeout=60) as http:
        request = asyncio.ensure_future(
            http.post(
                "/chat/completions",
                headers={"authorization": "Bearer bk_demo_paid", "x-ballast-cache": "bypass"},
                json={"model": "sim-small", "messages": [_user_message("slow one")]},
            )
        )
        deadline = time.monotonic() + 30
        while app.in_flight.active == 0:
            assert time.monotonic() < deadline and not request.done(), "the request never arrived"
            await asyncio.sleep(0.01)
        await edge.stop(grace=30)
        response = await request
    assert response.status_code == 200, response.text
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=http_url_of(app)) as late:
            await late.get("/models")


async def test_an_http_chat_is_one_trace_continuing_the_callers(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    suite, exporter = await _traced_suite(suite_factory, tmp_path)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(base_url=http_url(suite), timeout=60) as http:
        response = await http.post(
            "/chat/completions",
            headers={
                "authorization": "Bearer bk_demo_paid",
                "traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01",
                "x-ballast-cache": "bypass",
            },
            json={"model": "sim-small", "messages": [_user_message("What is a trace?")]},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-ballast-trace-id"] == caller_trace
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == int(caller_trace, 16)]
    (root,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert root.kind.name == "SERVER" and (root.attributes or {})["http.response.status_code"] == 200
    assert (root.attributes or {})["ballast.limiter.decision"] == "DECISION_ALLOW"
    # The same downstream calls as a gRPC Chat (the cache is bypassed), all in the caller's trace.
    assert {_service(s) for s in spans} == {f"ballast-{name}" for name in ("edge", "router", "limiter")}
    assert any((s.attributes or {}).get("gen_ai.operation.name") == "chat" for s in spans)


async def test_http_and_grpc_share_the_in_flight_cap_and_http_is_measured(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = {**write_test_config(tmp_path, sim_latency_ms=1500), "BALLAST_EDGE_MAX_IN_FLIGHT": "1"}
    suite = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    app = suite.running["edge"].app
    assert isinstance(app, EdgeApp)
    key = {"authorization": "Bearer bk_demo_paid", "x-ballast-cache": "bypass"}
    body = {"model": "sim-small", "messages": [_user_message("slow one")]}
    async with httpx.AsyncClient(base_url=http_url(suite), timeout=60) as http:
        slow = asyncio.ensure_future(http.post("/chat/completions", headers=key, json=body))
        deadline = time.monotonic() + 30
        while app.in_flight.active == 0:
            assert time.monotonic() < deadline and not slow.done(), "the request never arrived"
            await asyncio.sleep(0.01)
        shed = await http.post("/chat/completions", headers=key, json=body)
        assert (await slow).status_code == 200
    assert shed.status_code == 429
    assert shed.headers["retry-after-ms"] == "500" and "in flight" in shed.json()["error"]["message"]
    async with httpx.AsyncClient() as plain:
        metrics = await plain.get(f"http://127.0.0.1:{suite.running['edge'].metrics_port}/metrics")
    counts = {
        line.split('http_response_status_code="')[1][:3]: float(line.rsplit(" ", 1)[1])
        for line in metrics.text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
        and 'http_route="/v1/chat/completions"' in line
    }
    assert counts == {"200": 1.0, "429": 1.0}


async def test_a_client_that_hangs_up_cancels_its_model_call(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    # A provider slow enough that the call is still running when the client goes away.
    environ = write_test_config(tmp_path, sim_latency_ms=20_000)
    suite = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    edge, router = suite.running["edge"].app, suite.running["router"].app
    assert isinstance(edge, EdgeApp) and isinstance(router, RouterApp)
    primary = router.sims["sim-primary"]
    async with httpx.AsyncClient(base_url=http_url(suite), timeout=60) as http:
        abandoned = asyncio.ensure_future(
            http.post(
                "/chat/completions",
                headers={"authorization": "Bearer bk_demo_paid", "x-ballast-cache": "bypass"},
                json={"model": "sim-small", "messages": [_user_message("never mind")]},
            )
        )
        deadline = time.monotonic() + 30
        while primary.stats.requests == 0:
            assert time.monotonic() < deadline and not abandoned.done(), "the model was never called"
            await asyncio.sleep(0.01)
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
    # The edge drops the request (cancelling its router call) long before the provider could answer.
    deadline = time.monotonic() + 15
    while edge.in_flight.active:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        await asyncio.sleep(0.05)
    assert primary.stats.by_status == {}, "the provider answered: the request was not cut short"


async def test_a_request_past_its_deadline_is_504(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    environ = {
        **write_test_config(tmp_path, sim_latency_ms=20_000),
        "BALLAST_EDGE_HTTP_REQUEST_TIMEOUT": "500ms",
    }
    suite = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    async with httpx.AsyncClient(base_url=http_url(suite), timeout=60) as http:
        response = await http.post(
            "/chat/completions",
            headers={"authorization": "Bearer bk_demo_paid", "x-ballast-cache": "bypass"},
            json={"model": "sim-small", "messages": [_user_message("too slow")]},
        )
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout"


async def test_with_the_edges_public_tls_the_http_face_speaks_https(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    public = make_certs(tmp_path / "public", ["edge"])["edge"]
    environ = {
        **write_test_config(tmp_path),
        "BALLAST_EDGE_TLS_CERT_FILE": str(public.cert_file),
        "BALLAST_EDGE_TLS_KEY_FILE": str(public.key_file),
    }
    suite = await suite_factory(["router", "limiter", "cache", "sessions", "edge"], environ)
    app = suite.running["edge"].app
    assert isinstance(app, EdgeApp)
    key = {"authorization": "Bearer bk_demo_paid"}
    verified = ssl.create_default_context(cafile=str(public.ca_file))
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{app.http.port}/v1", verify=verified) as https:
        assert (await https.get("/models", headers=key)).status_code == 200
    # Never plaintext beside it.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}/v1") as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get("/models", headers=key)

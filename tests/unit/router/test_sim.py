"""The SIMULATED provider itself: scripted outages on its clock, latency and streaming pace,
rate-limit buckets, the admin endpoint, and the standalone command."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx

from services.router.catalog import Outage, SimSpec
from services.router.sim import Fault, SimServer
from tests.unit.router.conftest import SimFactory

ROOT = Path(__file__).resolve().parents[3]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_scripted_outages_follow_the_clock() -> None:
    clock = Clock()
    spec = SimSpec(latency_median_ms=0, outages=(Outage(10, 5, "error", 503), Outage(20, 5, "down")))
    sim = SimServer("sim-o", spec, clock=clock, latency_scale=0)
    await sim.start()
    try:
        async with httpx.AsyncClient(base_url=sim.url) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            clock.now += 11
            failed = await client.post("/v1/chat/completions", json=CHAT)
            assert failed.status_code == 503 and "simulated outage" in failed.json()["error"]["message"]
            clock.now += 5
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            clock.now += 5
            try:
                await client.post("/v1/chat/completions", json=CHAT)
                raise AssertionError("a 'down' outage must drop the connection")
            except httpx.RemoteProtocolError:
                pass
            clock.now += 5
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    finally:
        await sim.close()


async def test_latency_and_streaming_pace(sim_factory: SimFactory) -> None:
    sim = await sim_factory(
        "sim-slow",
        SimSpec(latency_distribution="fixed", latency_median_ms=80, latency_p99_ms=80, tokens_per_second=200),
        latency_scale=1.0,
    )
    async with httpx.AsyncClient(base_url=sim.url) as client:
        started = time.monotonic()
        first_at = None
        chunks = 0
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    chunks += 1
                    first_at = first_at or time.monotonic() - started
        total = time.monotonic() - started
    assert first_at is not None and first_at >= 0.08
    assert total >= 0.08 + (chunks - 1) / 200 * 0.9


async def test_rpm_bucket_refills_and_reports_reset(sim_factory: SimFactory) -> None:
    clock = Clock()
    sim = await sim_factory("sim-rpm", SimSpec(latency_median_ms=0, rpm=2), clock=clock)
    async with httpx.AsyncClient(base_url=sim.url) as client:
        first = await client.post("/v1/chat/completions", json=CHAT)
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        await client.post("/v1/chat/completions", json=CHAT)
        limited = await client.post("/v1/chat/completions", json=CHAT)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "30"  # 2 per minute: one request every 30 s
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        clock.now += 30
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        anthropic = await client.post("/v1/messages", json={**CHAT, "max_tokens": 10})
        assert anthropic.status_code == 429
        assert anthropic.json()["error"]["type"] == "rate_limit_error"
        assert anthropic.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert anthropic.headers["anthropic-ratelimit-requests-reset"].endswith("Z")


async def test_admin_endpoint_and_validation(sim_factory: SimFactory) -> None:
    sim = await sim_factory("sim-admin")
    async with httpx.AsyncClient(base_url=sim.url) as client:
        assert (await client.post("/admin/fault", json={"mode": "melt"})).status_code == 400
        await client.post("/admin/fault", json={"mode": "rate_limit", "retry_after_s": 4})
        limited = await client.post("/v1/chat/completions", json=CHAT)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "4"
        await client.post("/admin/fault", json={"mode": "ok"})
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        no_max = await client.post("/v1/messages", json=CHAT)
        assert no_max.status_code == 400 and no_max.json()["error"]["message"] == "max_tokens: Field required"
        bad = await client.post("/v1/chat/completions", content=b"{nope")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        stats = (await client.get("/admin/stats")).json()
        assert stats["simulated"] and stats["requests"] == 4
    sim.set_fault(Fault("error", until=sim.clock() - 1))  # already over
    assert sim.current_fault() is None


async def test_standalone_command_serves_both_formats() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.router.sim",
        "--port",
        str(port),
        "--latency-ms",
        "0",
        "--p99-ms",
        "0",
        "--tokens-per-second",
        "0",
        "--name",
        "sim-alone",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        banner = await asyncio.wait_for(process.stdout.readline(), 20)
        assert b"SIMULATED" in banner
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            openai = (await client.post("/v1/chat/completions", json=CHAT)).json()
            anthropic = (await client.post("/v1/messages", json={**CHAT, "max_tokens": 50})).json()
        assert openai["simulated"] and openai["choices"][0]["message"]["content"].startswith(
            "[simulated sim-alone/m]"
        )
        assert anthropic["simulated"] and anthropic["content"][0]["text"].startswith(
            "[simulated sim-alone/m]"
        )
        assert json.dumps(anthropic).count("end_turn") == 1
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def test_answer_pieces_fixes_how_many_chunks_a_stream_sends(sim_factory: SimFactory) -> None:
    sim = await sim_factory("sim-long", SimSpec(latency_median_ms=0, answer_pieces=200), latency_scale=0)

    async def content_chunks(max_tokens: int | None) -> tuple[int, dict[str, int]]:
        body: dict[str, object] = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        chunks = 0
        usage: dict[str, int] = {}
        async with (
            httpx.AsyncClient(base_url=sim.url) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line.removeprefix("data: "))
                usage = event.get("usage") or usage
                if any(c["delta"].get("content") for c in event["choices"]):
                    chunks += 1
        return chunks, usage

    whole, usage = await content_chunks(None)
    assert whole == 200 and usage["completion_tokens"] == 200
    for limit in (10, 100):
        cut, usage = await content_chunks(limit)
        assert cut == limit and usage["completion_tokens"] == limit

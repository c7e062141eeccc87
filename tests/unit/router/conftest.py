"""Router test helpers: SIMULATED providers on 127.0.0.1 and catalogs that point at them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest
import uvloop
from ballast.common.v1 import common_pb2
from ballast.router.v1 import router_pb2

from services.router.catalog import SimSpec
from services.router.sim import SimServer

SimFactory = Callable[..., Awaitable[SimServer]]

# The provider transport's own tests run on both loops a service may run on (BALLAST_EVENT_LOOP):
# asyncio's and uvloop's transports differ (classes, TLS, flow control).
_BOTH_LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
_ASYNCIO_ONLY = {"asyncio": asyncio.new_event_loop}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return _BOTH_LOOPS if item.path.name == "test_network.py" else _ASYNCIO_ONLY


@pytest.fixture
async def sim_factory() -> AsyncIterator[SimFactory]:
    """`await sim_factory("name", SimSpec(...))` starts a sim on a free port (instant answers unless
    latency_scale is given); all close after the test."""
    started: list[SimServer] = []

    async def factory(name: str = "sim-test", spec: SimSpec | None = None, **kw: object) -> SimServer:
        kw.setdefault("latency_scale", 0.0)
        server = SimServer(name, spec or SimSpec(latency_median_ms=0), **kw)  # type: ignore[arg-type]
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.close()


def two_provider_catalog(
    primary: SimServer,
    secondary: SimServer,
    *,
    primary_wire: str = "openai",
    secondary_wire: str = "anthropic",
    strategy: str = "ordered",
    extra: str = "",
) -> str:
    """An alias `chain` of primary then secondary; the providers are plain openai/anthropic kinds,
    so the real adapters talk to the sims exactly as they would to the real APIs."""

    def url(server: SimServer, wire: str) -> str:
        return f"{server.url}/v1" if wire == "openai" else server.url

    return f"""
providers:
  primary:
    kind: {"openai_compatible" if primary_wire == "openai" else "anthropic"}
    base_url: {url(primary, primary_wire)}
    region: us
  secondary:
    kind: {"openai_compatible" if secondary_wire == "openai" else "anthropic"}
    base_url: {url(secondary, secondary_wire)}
    region: eu
models:
  primary-model:
    provider: primary
    provider_model: p-model
    input_price_micros_per_mtok: 1000000
    output_price_micros_per_mtok: 2000000
  secondary-model:
    provider: secondary
    provider_model: s-model
    input_price_micros_per_mtok: 3000000
    output_price_micros_per_mtok: 4000000
  embed-model:
    provider: primary
    provider_model: e-model
    type: embedding
    dimensions: 64
aliases:
  chain:
    strategy: {strategy}
    candidates: [primary-model, secondary-model]
  budget:
    candidates: [primary-model]
  reasoning:
    candidates: [secondary-model]
  embedding:
    candidates: [embed-model]
tier_defaults:
  default: chain
{extra}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return str(path)


def user(text: str = "hello there") -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def complete_request(
    model: str = "chain", text: str = "hello there", **kw: object
) -> router_pb2.CompleteRequest:
    return router_pb2.CompleteRequest(model=model, messages=[user(text)], **kw)  # type: ignore[arg-type]


# Settings that keep the router's own timing small and deterministic enough for tests.
FAST_ENV = {
    "BALLAST_ROUTER_REPORT_HEADROOM": "false",
    "BALLAST_ROUTER_BACKOFF_BASE": "10ms",
    "BALLAST_ROUTER_BACKOFF_MAX": "50ms",
    "BALLAST_ROUTER_SIM_LATENCY_SCALE": "0",
}

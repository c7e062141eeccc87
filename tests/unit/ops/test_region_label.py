"""Every series a service exports carries its region, latency histograms have second-scale
buckets, and usage metrics have no user label unless BALLAST_METRICS_PER_USER is on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.kit.config import SERVICE_NAMES, ConfigError
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.suite_config import write_test_config

KEY = (("authorization", "Bearer bk_demo_paid"),)


async def _chat(suite: Suite) -> None:
    message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Which region answers?")
    await suite.edge.Chat(edge_pb2.ChatRequest(messages=[message]), metadata=KEY)


Sample = tuple[str, dict[str, str], float]


async def _samples(suite: Suite) -> dict[str, list[Sample]]:
    """Per service: (name, labels, value) of every sample on its /metrics."""
    found: dict[str, list[Sample]] = {}
    async with httpx.AsyncClient() as client:
        for name, running in suite.running.items():
            text = (await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
            found[name] = [
                (sample.name, dict(sample.labels), sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            ]
    return found


async def test_every_series_of_every_service_carries_the_region(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = {**write_test_config(tmp_path), "BALLAST_REGION": "eu-west-1"}
    suite = await suite_factory(SERVICE_NAMES, environ)
    await _chat(suite)
    found = await _samples(suite)
    for service in ("edge", "router", "limiter", "cache"):
        samples = found[service]
        assert any(name == "target_info" for name, _, _ in samples), service
        for name, labels, _ in samples:
            assert labels.get("cloud_region") == "eu-west-1", (service, name, labels)
    buckets = {
        labels["le"] for name, labels, _ in found["edge"] if name == "rpc_server_call_duration_seconds_bucket"
    }
    assert {"0.005", "0.1", "1.0"} <= buckets
    limits = {
        (labels["tier"], labels["limit"]): value
        for name, labels, value in found["limiter"]
        if name == "ballast_limiter_configured_limit"
    }
    # From tests/support/suite_config.py's tiers; unlimited ones are absent.
    assert limits[("free", "requests")] == 3
    assert limits[("paid", "tenant_tokens_per_day")] == 50_000_000
    assert ("enterprise", "requests") not in limits
    # The daily budget's use names the tenant (bounded by BALLAST_METRICS_MAX_TENANTS).
    budgets = {
        (labels["tenant"], labels["tier"]): value
        for name, labels, value in found["limiter"]
        if name == "ballast_limiter_tenant_budget_used_ratio"
    }
    assert set(budgets) == {("demo", "paid")} and 0 < budgets[("demo", "paid")] < 0.001
    assert [v for name, _, v in found["limiter"] if name == "ballast_limiter_near_limit_ratio"] == [0.8]
    edge = [labels for name, labels, _ in found["edge"] if name.startswith("ballast_usage_")]
    assert edge and all("user" not in labels for labels in edge)


async def test_the_region_defaults_to_local_and_per_user_labels_are_opt_in(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    environ = {**write_test_config(tmp_path), "BALLAST_METRICS_PER_USER": "true"}
    suite = await suite_factory(SERVICE_NAMES, environ)
    await _chat(suite)
    found = await _samples(suite)
    usage = [labels for name, labels, _ in found["edge"] if name == "ballast_usage_cost_total"]
    assert usage and all(labels["cloud_region"] == "local" and labels["user"] for labels in usage)


@pytest.mark.parametrize("bad", ["EU West", "-eu", "x" * 64, "eu/west"])
async def test_a_bad_region_stops_start_up_naming_the_variable(
    suite_factory: SuiteFactory, tmp_path: Path, bad: str
) -> None:
    with pytest.raises(ConfigError, match="BALLAST_REGION"):
        await suite_factory(["limiter"], {**write_test_config(tmp_path), "BALLAST_REGION": bad})


async def test_the_edge_times_chats_and_first_content_by_tier(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    suite = await suite_factory(SERVICE_NAMES, write_test_config(tmp_path))
    await _chat(suite)
    message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Stream it, please")
    stream = suite.edge.ChatStream(
        edge_pb2.ChatStreamRequest(chat=edge_pb2.ChatRequest(messages=[message])),
        metadata=(("authorization", "Bearer bk_demo_enterprise"),),
    )
    assert [event.WhichOneof("event") async for event in stream][-1] == "done"
    found = await _samples(suite)
    counts = {
        (labels.get("tier"), labels.get("outcome"), labels.get("mode")): value
        for name, labels, value in found["edge"]
        if name.endswith("_count") and name.startswith("ballast_edge_chat_")
    }
    assert counts[("paid", "ok", None)] == 1
    assert counts[("enterprise", "ok", None)] == 1
    assert counts[("paid", None, "unary")] == 1
    assert counts[("enterprise", None, "stream")] == 1


async def test_a_cache_hit_counts_the_tokens_and_cost_it_saved(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    suite = await suite_factory(SERVICE_NAMES, write_test_config(tmp_path))
    message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="What does the cache save?")
    first = await suite.edge.Chat(edge_pb2.ChatRequest(messages=[message]), metadata=KEY)
    hits = [await suite.edge.Chat(edge_pb2.ChatRequest(messages=[message]), metadata=KEY) for _ in range(2)]
    assert not first.cache_hit and all(hit.cache_hit for hit in hits)
    assert first.usage.output_tokens > 0 and first.cost.total_cost_micros > 0
    found = await _samples(suite)
    saved = {
        labels["direction"]: value
        for name, labels, value in found["edge"]
        if name == "ballast_edge_cache_saved_tokens_total"
    }
    # Each hit saved what the model was paid to make the answer once.
    assert saved == {"input": 2 * first.usage.input_tokens, "output": 2 * first.usage.output_tokens}
    cost = [
        (labels["tenant"], labels["model"], value)
        for name, labels, value in found["edge"]
        if name == "ballast_edge_cache_saved_cost_total"
    ]
    assert cost == [("demo", first.model, 2 * first.cost.total_cost_micros)]

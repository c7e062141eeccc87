"""RouterService through a real in-process gRPC server: zero-config sims, streaming, embeddings,
catalog and status RPCs, validation, and headroom reports to the limiter."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2, limiter_pb2_grpc
from ballast.router.v1 import router_pb2

from services.router.app import RouterApp
from services.router.catalog import SimSpec
from services.router.providers.base import Outcome
from tests.conftest import SuiteFactory
from tests.support.status import violated_fields
from tests.unit.router.conftest import (
    FAST_ENV,
    SimFactory,
    complete_request,
    two_provider_catalog,
    user,
    write,
)


async def test_zero_config_answers_from_embedded_simulated_providers(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    reply = await suite.router.Complete(router_pb2.CompleteRequest(messages=[user()]), timeout=5)
    assert reply.simulated
    assert reply.provider.startswith("sim-") and "sim" in reply.model
    assert reply.message.content.startswith("[simulated sim-")
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens > 0
    assert reply.cost.total_cost_micros == reply.cost.input_cost_micros + reply.cost.output_cost_micros
    assert [a.outcome for a in reply.attempts] == [router_pb2.ATTEMPT_OUTCOME_OK]
    assert reply.attempts[0].provider == reply.provider
    assert reply.response_id
    app = cast(RouterApp, suite.running["router"].app)
    assert set(app.sims) == {"sim-primary", "sim-secondary"}
    # sim-secondary is spoken to in the Anthropic format, sim-primary in OpenAI's
    eu = await suite.router.Complete(
        router_pb2.CompleteRequest(model="sim-large-eu", messages=[user()]), timeout=5
    )
    assert eu.provider == "sim-secondary" and eu.response_id.startswith("msg_sim")
    assert reply.response_id.startswith("chatcmpl-sim")


async def test_cost_follows_catalog_prices(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    reply = await suite.router.Complete(
        router_pb2.CompleteRequest(model="sim-large", messages=[user()]), timeout=5
    )
    # sim-large: 2,000,000 / 8,000,000 micro-dollars per million tokens
    assert reply.cost.input_cost_micros == round(reply.usage.input_tokens * 2)
    assert reply.cost.output_cost_micros == round(reply.usage.output_tokens * 8)


async def test_stream_start_deltas_done(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    events = [
        e
        async for e in suite.router.StreamComplete(
            router_pb2.StreamCompleteRequest(
                request=router_pb2.CompleteRequest(model="budget", messages=[user()])
            ),
            timeout=5,
        )
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    assert events[0].start.simulated
    done = events[-1].done
    assert "".join(e.delta.text for e in events[1:-1]) == done.message.content
    assert done.provider == events[0].start.provider and done.usage.output_tokens > 0
    assert done.cost.total_cost_micros > 0


async def _stream_deltas(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, flush_interval: str
) -> list[str]:
    """The delta texts of one stream from a provider sending a token every 5 ms."""
    paced = SimSpec(latency_median_ms=0, tokens_per_second=200, answer_pieces=20)
    primary = await sim_factory("sim-paced", paced, latency_scale=1.0)
    secondary = await sim_factory("sim-spare")
    env = {
        **FAST_ENV,
        "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_provider_catalog(primary, secondary)),
        "BALLAST_ROUTER_STREAM_FLUSH_INTERVAL": flush_interval,
    }
    suite = await suite_factory(["router"], env)
    request = router_pb2.StreamCompleteRequest(request=complete_request())
    events = suite.router.StreamComplete(request, timeout=10)
    return [e.delta.text async for e in events if e.WhichOneof("event") == "delta"]


async def test_fast_provider_text_is_grouped_per_flush_interval_and_arrives_whole(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    every_chunk = await _stream_deltas(suite_factory, sim_factory, tmp_path, "0")
    assert len(every_chunk) > 5, "paced chunks arrive, and are relayed, one by one"
    # An interval no test outlasts: the first text goes at once, the rest with the end.
    grouped = await _stream_deltas(suite_factory, sim_factory, tmp_path, "1h")
    assert len(grouped) == 2
    assert "".join(grouped) == "".join(every_chunk)


@pytest.mark.parametrize("model", ["sim-small", "sim-small-eu"])
async def test_tool_calls_round_trip_over_grpc(suite_factory: SuiteFactory, model: str) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    tool = common_pb2.ToolDefinition(
        name="lookup",
        description="find",
        parameters_json_schema=json.dumps(
            {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
        ),
    )
    first = await suite.router.Complete(
        router_pb2.CompleteRequest(model=model, messages=[user("please lookup this")], tools=[tool]),
        timeout=5,
    )
    assert first.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = first.message.tool_calls
    assert call.name == "lookup" and json.loads(call.arguments_json) == {"q": "sim"}
    second = await suite.router.Complete(
        router_pb2.CompleteRequest(
            model=model,
            messages=[
                user("please lookup this"),
                first.message,
                common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, tool_call_id=call.id, content="42"),
            ],
            tools=[tool],
        ),
        timeout=5,
    )
    assert second.finish_reason == common_pb2.FINISH_REASON_STOP
    assert "Based on the tool result" in second.message.content


async def test_embed_list_models_and_status(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    embedded = await suite.router.Embed(router_pb2.EmbedRequest(inputs=["a cat", "a dog"]), timeout=5)
    assert (embedded.provider, embedded.model) == ("sim-primary", "sim-embed")
    assert [len(e.values) for e in embedded.embeddings] == [256, 256]
    again = await suite.router.Embed(router_pb2.EmbedRequest(model="sim-embed", inputs=["a cat"]), timeout=5)
    assert list(again.embeddings[0].values) == list(embedded.embeddings[0].values)
    listed = await suite.router.ListModels(router_pb2.ListModelsRequest(), timeout=5)
    ids = {m.id for m in listed.models}
    assert "sim-large" in ids and "gpt-4o" not in ids  # no key, no real model
    assert all(m.simulated for m in listed.models)
    aliases = {a.name: list(a.candidates) for a in listed.aliases}
    assert aliases["reasoning"] == ["sim-large", "sim-large-eu"]
    assert listed.tier_defaults["default"] == "fast"
    status = await suite.router.GetProviderStatus(
        router_pb2.GetProviderStatusRequest(provider="sim-primary"), timeout=5
    )
    by_model = {s.model: s for s in status.providers}
    assert set(by_model) == {"sim-large", "sim-small", "sim-embed"}
    embed = by_model["sim-embed"]
    assert embed.breaker == router_pb2.BREAKER_STATE_CLOSED and embed.requests == 2 and embed.simulated
    assert embed.headroom.limit_requests == 6000 and 0 < embed.headroom.remaining_requests < 6000


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (router_pb2.CompleteRequest(), "messages"),
        (router_pb2.CompleteRequest(messages=[common_pb2.ChatMessage(content="x")]), "messages[0].role"),
        (
            router_pb2.CompleteRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="x")]
            ),
            "messages[0].tool_call_id",
        ),
        (
            router_pb2.CompleteRequest(messages=[user()], tools=[common_pb2.ToolDefinition(name="bad name")]),
            "tools[0].name",
        ),
        (
            router_pb2.CompleteRequest(
                messages=[user()], tools=[common_pb2.ToolDefinition(name="t", parameters_json_schema="{")]
            ),
            "tools[0].parameters_json_schema",
        ),
        (
            router_pb2.CompleteRequest(
                messages=[user()],
                tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_NAMED, name="x"),
            ),
            "tool_choice.name",
        ),
        (
            router_pb2.CompleteRequest(messages=[user()], params=common_pb2.GenerationParams(top_p=3)),
            "params.top_p",
        ),
        (router_pb2.CompleteRequest(model="gpt-9", messages=[user()]), "model"),
        (
            router_pb2.CompleteRequest(messages=[user()], hints=router_pb2.RoutingHints(max_attempts=1000)),
            "hints.max_attempts",
        ),
        (router_pb2.CompleteRequest(model="sim-embed", messages=[user()]), "model"),
        (router_pb2.CompleteRequest(messages=[user()], priority=77), "priority"),  # type: ignore[arg-type]
    ],
)
async def test_bad_requests_name_the_field(
    suite_factory: SuiteFactory, request_: router_pb2.CompleteRequest, field: str
) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(info.value) == [field]


async def test_a_model_needing_a_key_is_a_failed_precondition(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["router"], FAST_ENV)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(router_pb2.CompleteRequest(model="gpt-4o", messages=[user()]), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "OPENAI_API_KEY" in (info.value.details() or "")


class RecordingLimiter(limiter_pb2_grpc.LimiterServiceServicer):
    """Stands in for the limiter's ReportHeadroom endpoint and records what it is told."""

    def __init__(self) -> None:
        self.reports: list[limiter_pb2.ReportHeadroomRequest] = []

    async def ReportHeadroom(self, request: Any, context: Any) -> limiter_pb2.ReportHeadroomResponse:
        self.reports.append(request)
        return limiter_pb2.ReportHeadroomResponse()


async def test_headroom_is_reported_to_the_limiter(suite_factory: SuiteFactory) -> None:
    limiter = RecordingLimiter()  # type: ignore[abstract]
    server = grpc.aio.server()
    limiter_pb2_grpc.add_LimiterServiceServicer_to_server(limiter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {
            **FAST_ENV,
            "BALLAST_ROUTER_REPORT_HEADROOM": "true",
            "BALLAST_ROUTER_HEADROOM_INTERVAL": "50ms",
            "BALLAST_LIMITER_ADDR": f"127.0.0.1:{port}",
        }
        suite = await suite_factory(["router"], env)
        await suite.router.Complete(
            router_pb2.CompleteRequest(model="sim-small", messages=[user()]), timeout=5
        )
        for _ in range(100):
            if limiter.reports:
                break
            await asyncio.sleep(0.02)
        report = limiter.reports[-1]
        assert (report.provider, report.model) == ("sim-primary", "sim-small")
        assert report.limit_requests == 6000 and 0 < report.remaining_requests < 6000
        assert report.limit_tokens == 4_000_000 and not report.rate_limited
        # An open breaker is reported as unknown headroom (no figures) until it may close (an
        # outage answers errors, not rate-limit headers, so nothing else would tell the limiter).
        app = cast(RouterApp, suite.running["router"].app)
        for _ in range(app.settings.breaker.failure_threshold):
            app.health.failure(("sim-primary", "sim-small"), Outcome.SERVER_ERROR, 0.01)
        for _ in range(100):
            if limiter.reports[-1].HasField("retry_after"):
                break
            await asyncio.sleep(0.02)
        opened = limiter.reports[-1]
        assert (opened.provider, opened.model, opened.rate_limited) == ("sim-primary", "sim-small", False)
        assert opened.limit_requests == opened.remaining_requests == -1
        assert opened.retry_after.ToTimedelta().total_seconds() == app.settings.breaker.open_for
    finally:
        await server.stop(0)


async def test_an_unreachable_limiter_never_slows_completions(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    env = {
        **FAST_ENV,
        "BALLAST_ROUTER_REPORT_HEADROOM": "true",
        "BALLAST_ROUTER_HEADROOM_INTERVAL": "10ms",
        "BALLAST_LIMITER_ADDR": "127.0.0.1:1",
    }
    suite = await suite_factory(["router"], env)
    loop = asyncio.get_running_loop()
    for _ in range(20):
        started = loop.time()
        reply = await suite.router.Complete(
            router_pb2.CompleteRequest(model="sim-small", messages=[user()]), timeout=5
        )
        assert reply.simulated and loop.time() - started < 1.0
    app = cast(RouterApp, suite.running["router"].app)
    assert app.reporter is not None and app.reporter.sent == 0


async def test_sim_admin_endpoint_and_standalone_catalog_entry(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    primary = await sim_factory("sim-one", SimSpec(latency_median_ms=0))
    secondary = await sim_factory("sim-two", SimSpec(latency_median_ms=0))
    suite = await suite_factory(
        ["router"],
        {
            **FAST_ENV,
            "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_provider_catalog(primary, secondary)),
        },
    )
    import httpx

    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{primary.url}/admin/fault", json={"mode": "error", "status": 502})
        assert answer.json()["mode"] == "error"
    reply = await suite.router.Complete(complete_request(), timeout=5)
    assert [a.http_status for a in reply.attempts] == [502, 200]
    assert reply.provider == "secondary" and reply.simulated  # the sim labels its answers wherever it runs


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_calls_are_traced_with_genai_attributes(
    suite_factory: SuiteFactory, stream: bool
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    suite = await suite_factory(["router"], FAST_ENV, span_processors=[SimpleSpanProcessor(exporter)])
    request = router_pb2.CompleteRequest(model="sim-small-eu", messages=[user("secret prompt")])
    if stream:
        async for _ in suite.router.StreamComplete(
            router_pb2.StreamCompleteRequest(request=request), timeout=5
        ):
            pass
    else:
        await suite.router.Complete(request, timeout=5)
    (span,) = [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("gen_ai.operation.name")]
    attributes = dict(span.attributes or {})
    assert span.name == "chat sim-small-eu-1"
    assert attributes["gen_ai.provider.name"] == "sim" and attributes["ballast.router.simulated"] is True
    assert attributes["gen_ai.response.model"] == "sim-small-eu-1"
    assert int(str(attributes["gen_ai.usage.output_tokens"])) > 0
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["server.address"] == "127.0.0.1"
    assert "secret prompt" not in str(attributes)


async def test_metrics_show_attempts_tokens_cost_and_breakers(suite_factory: SuiteFactory) -> None:
    import httpx

    suite = await suite_factory(["router"], FAST_ENV)
    costs = 0
    for _ in range(2):
        reply = await suite.router.Complete(
            router_pb2.CompleteRequest(model="sim-small", messages=[user()]), timeout=5
        )
        costs += reply.cost.total_cost_micros
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{suite.running['router'].metrics_port}/metrics")).text
    lines = text.splitlines()

    def has(prefix: str, *fragments: str) -> bool:
        return any(line.startswith(prefix) and all(f in line for f in fragments) for line in lines)

    assert has("ballast_router_attempts", 'outcome="ok"', 'provider="sim-primary"', 'model="sim-small"')
    assert has("gen_ai_client_token_usage", 'gen_ai_token_type="output"')
    assert has("ballast_router_cost", 'model="sim-small"')

    def value(prefix: str, *fragments: str) -> float:
        (line,) = [line for line in lines if line.startswith(prefix) and all(f in line for f in fragments)]
        return float(line.rsplit(" ", 1)[1])

    # The counters count every call, each once.
    assert value("ballast_router_attempts_total", 'outcome="ok"', 'model="sim-small"') == 2
    assert value("ballast_router_cost_total", 'model="sim-small"', 'estimated="false"') == costs > 0
    assert has("ballast_router_breaker_state", 'provider="sim-primary"', 'model="sim-small"')
    assert has("ballast_router_headroom_remaining_requests", 'model="sim-small"')

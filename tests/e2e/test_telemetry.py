"""One trace per request across every service, spans over OTLP, metrics, and no secrets anywhere."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.kit.config import SERVICE_NAMES
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.suite_config import write_test_config
from tests.support.waiting import eventually, until_passes

KEY = (("authorization", "Bearer bk_demo_paid"),)
GENAI_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "server.address",
)


def _user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


async def _traced_suite(
    suite_factory: SuiteFactory, tmp_path: Path, extra: dict[str, str] | None = None
) -> tuple[Suite, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    environ = {**write_test_config(tmp_path), "OTEL_SDK_DISABLED": "false", **(extra or {})}
    suite = await suite_factory(SERVICE_NAMES, environ, span_processors=[SimpleSpanProcessor(exporter)])
    return suite, exporter


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[_Collector, int]]:
    server = grpc.aio.server()
    servicer = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


async def test_spans_arrive_over_otlp_with_service_names(
    suite_factory: SuiteFactory, tmp_path: Path, collector: tuple[_Collector, int]
) -> None:
    servicer, port = collector
    environ = {
        **write_test_config(tmp_path),
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_METRICS_EXPORTER": "none",
    }
    suite = await suite_factory(SERVICE_NAMES, environ)
    await suite.edge.Chat(edge_pb2.ChatRequest(messages=[_user("over the wire")]), metadata=KEY)
    await suite.stop()  # flushes the batch processors
    names: dict[str, int] = {}
    trace_ids: set[bytes] = set()
    for request in servicer.requests:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                names[attributes["service.name"]] = names.get(attributes["service.name"], 0) + len(
                    scope.spans
                )
                trace_ids.update(
                    span.trace_id for span in scope.spans if span.name.endswith("EdgeService/Chat")
                )
    assert {"ballast-edge", "ballast-router", "ballast-limiter", "ballast-cache"} <= set(names)
    assert len(trace_ids) == 1


MARKER = "ZEBRA-MARKER-4417"
FAKE_KEY = "sk-proj-FAKEKEY0123456789abcdef"


async def test_prompts_and_keys_never_reach_spans_metrics_or_logs(
    suite_factory: SuiteFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    suite, exporter = await _traced_suite(suite_factory, tmp_path)
    session = (await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=KEY)).session
    prompt = f"My key is {FAKE_KEY} and the word is {MARKER}. Use lookup please."
    lookup = common_pb2.ToolDefinition(name="lookup", parameters_json_schema='{"type": "object"}')
    await suite.edge.Chat(
        edge_pb2.ChatRequest(session_id=session.session_id, messages=[_user(prompt)], tools=[lookup]),
        metadata=KEY,
    )
    events = [
        e
        async for e in suite.edge.ChatStream(
            edge_pb2.ChatStreamRequest(chat=edge_pb2.ChatRequest(messages=[_user(prompt + " streamed")])),
            metadata=KEY,
        )
    ]
    assert events[-1].WhichOneof("event") == "done"
    # A failing call too: errors are where content tends to leak.
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.edge.Chat(
            edge_pb2.ChatRequest(messages=[_user(prompt)], params=common_pb2.GenerationParams(temperature=9)),
            metadata=KEY,
        )
    # Server spans end just after the reply reaches the client: wait until all three calls' have.
    await eventually(
        lambda: sum(s.name.endswith(("EdgeService/Chat", "EdgeService/ChatStream"))
                    for s in exporter.get_finished_spans()) >= 3,
        what="the edge's server spans of the three calls",
    )  # fmt: skip
    exported = []
    for span in exporter.get_finished_spans():
        exported.append(span.name)
        exported.extend(f"{k}={v!r}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            exported.append(event.name)
            exported.extend(f"{k}={v!r}" for k, v in (event.attributes or {}).items())
        exported.append(span.status.description or "")
    async with httpx.AsyncClient() as client:
        for running in suite.running.values():
            exported.append((await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text)
    for record in caplog.records:
        exported.append(record.getMessage())
        exported.extend(str(v) for v in vars(record).values())
    text = "\n".join(exported)
    assert exported and MARKER not in text
    assert FAKE_KEY not in text and "FAKEKEY0123456789" not in text
    assert "bk_demo_paid" not in text


def _series(text: str, name: str) -> dict[str, float]:
    """Samples of one metric family: label text -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_metrics_show_tokens_cost_cache_limiter_and_queue(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    suite = await suite_factory(
        SERVICE_NAMES, {**write_test_config(tmp_path), "BALLAST_EDGE_QUEUE_SAMPLE_INTERVAL": "100ms"}
    )
    question = edge_pb2.ChatRequest(messages=[_user("How do I export my data?")])
    for _ in range(3):
        await suite.edge.Chat(question, metadata=KEY)
    async for _ in suite.edge.ChatStream(
        edge_pb2.ChatStreamRequest(chat=edge_pb2.ChatRequest(messages=[_user("stream me")])), metadata=KEY
    ):
        pass
    job = await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=question), metadata=KEY)

    async def job_succeeded() -> bool:
        reply = await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job.job.job_id), metadata=KEY)
        return reply.job.state == edge_pb2.JOB_STATE_SUCCEEDED

    await eventually(job_succeeded, what="the queued job succeeded")

    # Usage, cost and queue gauges are recorded after the replies (and sampled): poll for them.
    async def metrics_show_the_run() -> None:
        texts = {}
        async with httpx.AsyncClient() as client:
            for name, running in suite.running.items():
                texts[name] = (await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text

        tokens = _series(texts["edge"], "ballast_usage_tokens_total")
        assert sum(tokens.values()) > 0 and all('tenant="demo"' in key for key in tokens)
        assert any('direction="output"' in key for key in tokens)
        assert sum(_series(texts["edge"], "ballast_usage_cost_total").values()) > 0
        chats = _series(texts["edge"], "ballast_edge_chats_total")
        assert sum(v for k, v in chats.items() if 'outcome="cache_hit"' in k) >= 2
        assert (
            "ballast_edge_queue_depth" in texts["edge"]
            and "ballast_edge_queue_oldest_age_seconds" in texts["edge"]
        )
        # Per-user labels are off by default: cardinality stays bounded.
        assert 'user="' not in texts["edge"]
        assert sum(_series(texts["router"], "gen_ai_client_token_usage_sum").values()) > 0
        assert sum(_series(texts["router"], "gen_ai_client_operation_duration_seconds_count").values()) >= 2
        assert (
            sum(
                _series(texts["router"], "gen_ai_client_operation_time_to_first_chunk_seconds_count").values()
            )
            >= 1
        )
        assert "ballast_router_breaker_state" in texts["router"]
        lookups = _series(texts["cache"], "ballast_cache_lookups_total")
        assert sum(lookups.values()) >= 5
        decisions = _series(texts["limiter"], "ballast_limiter_decisions_total")
        assert sum(v for k, v in decisions.items() if "allow" in k.lower()) >= 5
        for name, text in texts.items():
            assert "rpc_server_call_duration_seconds_count" in text or name == "sessions"

    await until_passes(metrics_show_the_run)

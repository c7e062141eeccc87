"""One trace per request across every service, spans over OTLP, metrics, and no secrets anywhere."""

from __future__ import annotations

import asyncio
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
from services.kit.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.suite_config import write_test_config

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


async def _traced_suite(suite_factory: SuiteFactory, tmp_path: Path) -> tuple[Suite, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    environ = {**write_test_config(tmp_path), "OTEL_SDK_DISABLED": "false"}
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
    await asyncio.sleep(0.2)
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

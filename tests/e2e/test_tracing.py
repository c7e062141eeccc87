"""One trace per request across every service, with the GenAI conventions on provider calls."""

from __future__ import annotations

from pathlib import Path

import pytest
from ballast.edge.v1 import edge_pb2

from services.kit.config import SERVICE_NAMES
from tests.conftest import SuiteFactory
from tests.e2e.test_telemetry import GENAI_ATTRIBUTES, KEY, _service, _traced_suite, _user


@pytest.mark.parametrize("local_calls", ["true", "false"], ids=["in-process", "network"])
async def test_one_chat_is_one_trace_across_all_five_services(
    suite_factory: SuiteFactory, tmp_path: Path, local_calls: str
) -> None:
    # The suite runs in one process: its services call each other in-process unless told not to;
    # a trace must have the same shape either way.
    suite, exporter = await _traced_suite(suite_factory, tmp_path, {"BALLAST_LOCAL_CALLS": local_calls})
    session = (await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=KEY)).session
    exporter.clear()
    await suite.edge.Chat(
        edge_pb2.ChatRequest(session_id=session.session_id, messages=[_user("What is a trace?")]),
        metadata=KEY,
    )
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "/ballast.edge.v1.EdgeService/Chat"]
    assert root.parent is None
    trace_spans = [s for s in spans if s.context.trace_id == root.context.trace_id]
    assert {_service(s) for s in trace_spans} == {f"ballast-{name}" for name in SERVICE_NAMES}
    by_id = {s.context.span_id: s for s in trace_spans}
    for span in trace_spans:
        if span is root:
            continue
        assert span.parent is not None and span.parent.span_id in by_id, (
            f"{span.name} is not linked into the trace"
        )
    # Every server span of an internal service is the child of the edge's client span for that call.
    for span in trace_spans:
        if _service(span) != "ballast-edge" and span.kind.name == "SERVER":
            assert span.parent is not None
            parent = by_id[span.parent.span_id]
            assert (
                _service(parent) == "ballast-edge"
                and parent.kind.name == "CLIENT"
                and parent.name == span.name
            )
    (provider_call,) = [s for s in trace_spans if (s.attributes or {}).get("gen_ai.operation.name")]
    attributes = dict(provider_call.attributes or {})
    assert provider_call.kind.name == "CLIENT" and _service(provider_call) == "ballast-router"
    assert provider_call.name == f"chat {attributes['gen_ai.request.model']}"
    missing = [name for name in GENAI_ATTRIBUTES if name not in attributes]
    assert not missing, f"GenAI attributes missing: {missing}"
    assert int(str(attributes["gen_ai.usage.output_tokens"])) > 0
    root_attributes = dict(root.attributes or {})
    assert root_attributes["ballast.cache.hit"] is False
    assert root_attributes["ballast.limiter.decision"] == "DECISION_ALLOW"
    assert int(str(root_attributes["ballast.router.attempts"])) >= 1
    assert int(str(root_attributes["ballast.cost.micros"])) > 0


async def test_store_work_and_queued_jobs_join_the_trace(
    suite_factory: SuiteFactory, tmp_path: Path, redis_url: str, postgres_dsn: str
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.support.http_receiver import HttpReceiver
    from tests.support.suite_config import write_test_config

    exporter = InMemorySpanExporter()
    environ = {
        **write_test_config(tmp_path),
        "OTEL_SDK_DISABLED": "false",
        "BALLAST_LIMITER_STORE": redis_url,
        "BALLAST_CACHE_STORE": redis_url,
        "BALLAST_EDGE_STORE": redis_url,
        "BALLAST_SESSIONS_STORE": postgres_dsn,
        # The webhook receiver listens on loopback.
        "BALLAST_EDGE_WEBHOOK_ALLOWED": "127.0.0.1/32",
    }
    suite = await suite_factory(SERVICE_NAMES, environ, span_processors=[SimpleSpanProcessor(exporter)])
    session = (await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=KEY)).session
    exporter.clear()
    await suite.edge.Chat(
        edge_pb2.ChatRequest(session_id=session.session_id, messages=[_user("hi")]), metadata=KEY
    )
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name.endswith("EdgeService/Chat")]
    systems = {
        (s.attributes or {}).get("db.system.name")
        for s in spans
        if s.context.trace_id == root.context.trace_id and s.kind.name == "CLIENT"
    }
    assert {"redis", "postgresql"} <= systems

    receiver = HttpReceiver()
    await receiver.start()
    try:
        exporter.clear()
        submitted = await suite.edge.SubmitChat(
            edge_pb2.SubmitChatRequest(
                chat=edge_pb2.ChatRequest(messages=[_user("later")]), webhook_url=receiver.url
            ),
            metadata=KEY,
        )
        await receiver.wait_for(1, within=20)
    finally:
        await receiver.close()
    spans = exporter.get_finished_spans()
    (submit,) = [s for s in spans if s.name.endswith("EdgeService/SubmitChat")]
    (job,) = [
        s
        for s in spans
        if s.name == "edge.job" and (s.attributes or {}).get("ballast.job.id") == submitted.job.job_id
    ]
    # The worker continues the submitter's trace, and the webhook carries it on.
    assert job.context.trace_id == submit.context.trace_id
    traceparent = receiver.received[0].headers["traceparent"]
    assert traceparent.split("-")[1] == format(submit.context.trace_id, "032x")

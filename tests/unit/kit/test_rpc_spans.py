"""RpcTracer's spans are the SDK's spans: same sampling, flags, parents, attributes, limits,
events, links and processors, field for field, whichever sampler the operator configured."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import sampling as samplers
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation import _SPAN_KEY

from services.kit.tracing import (
    INSTRUMENTATION,
    LeanTracer,
    PlainAttributes,
    RpcSpan,
    RpcTracer,
    SpanProcessors,
    _does_nothing,
    attach,
    current_context,
    detach,
    with_span,
)

_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "ballast.limiter.v1.LimiterService",
    "rpc.method": "Check",
}


class _Tagging(samplers.Sampler):
    """A sampler that adds an attribute and a trace state, and keeps every other trace."""

    def should_sample(
        self, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any
    ) -> samplers.SamplingResult:
        keep = trace_id % 2 == 0
        decision = samplers.Decision.RECORD_AND_SAMPLE if keep else samplers.Decision.RECORD_ONLY
        return samplers.SamplingResult(
            decision, {"sampled.by": "tagging", "ok": True}, TraceState([("t", "1")])
        )

    def get_description(self) -> str:
        return "Tagging"


_SAMPLERS = {
    "parentbased_always_on": samplers.DEFAULT_ON,
    "parentbased_always_off": samplers.DEFAULT_OFF,
    "parentbased_ratio_half": samplers.ParentBasedTraceIdRatio(0.5),
    "always_on": samplers.ALWAYS_ON,
    "always_off": samplers.ALWAYS_OFF,
    "ratio_half": samplers.TraceIdRatioBased(0.5),
    "tagging": _Tagging(),
    "parentbased_tagging_children": samplers.ParentBased(
        samplers.ALWAYS_ON, remote_parent_sampled=_Tagging(), local_parent_not_sampled=samplers.ALWAYS_ON
    ),
}


def _parents() -> dict[str, otel_context.Context | None]:
    def remote(flags: int, state: TraceState | None = None) -> otel_context.Context:
        context = SpanContext(
            0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(flags), state
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(context))

    def local(flags: int) -> otel_context.Context:
        context = SpanContext(0x1234, 0x5678, False, TraceFlags(flags))
        return trace.set_span_in_context(trace.NonRecordingSpan(context))

    return {
        "root": otel_context.Context(),
        "current (none)": None,
        "remote sampled": remote(TraceFlags.SAMPLED, TraceState([("vendor", "v")])),
        "remote unsampled": remote(TraceFlags.DEFAULT),
        "remote sampled random": remote(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID),
        "local sampled": local(TraceFlags.SAMPLED),
        "local unsampled": local(TraceFlags.DEFAULT),
    }


def _seen(span: ReadableSpan | trace.Span) -> dict[str, Any]:
    """What a processor, an exporter or a log line can see of a span, ids and times aside."""
    context = span.get_span_context()
    assert context is not None
    seen: dict[str, Any] = {
        "type": "recording" if isinstance(span, ReadableSpan) else "non-recording",
        "sampled": context.trace_flags.sampled,
        "flags": int(context.trace_flags),
        "trace_state": dict(context.trace_state or {}),
        "remote": context.is_remote,
        "valid": context.is_valid,
    }
    if isinstance(span, ReadableSpan):
        seen.update(
            name=span.name,
            kind=span.kind,
            parent=(span.parent.span_id, span.parent.is_remote) if span.parent else None,
            attributes=dict(span.attributes or {}),
            dropped=(span.dropped_attributes, span.dropped_events, span.dropped_links),
            status=(span.status.status_code, span.status.description),
            events=[(e.name, dict(e.attributes or {})) for e in span.events],
            links=[(link.context.span_id, dict(link.attributes or {})) for link in span.links],
            resource=span.resource,
            scope=span.instrumentation_scope,
            timed=bool(span.start_time) and bool(span.end_time) and span.end_time >= span.start_time,  # type: ignore[operator]
        )
    return seen


def _work(span: trace.Span) -> None:
    """What the interceptors and the services do to a span."""
    span.set_attribute("rpc.grpc.status_code", 14)
    span.set_attribute("ballast.tenant", "acme")
    span.set_attribute("list", [1, 2, 3])
    span.set_attribute("bad", {"not": "allowed"})
    span.set_status(Status(StatusCode.ERROR, "StatusCode.UNAVAILABLE:router down"))
    span.set_status(Status(StatusCode.OK))
    try:
        raise RuntimeError("boom")
    except RuntimeError as error:
        span.record_exception(error)
    span.add_event("retry", {"attempt": 2})
    span.add_link(SpanContext(0x99, 0x98, False, TraceFlags(1)), {"why": "batch"})
    span.update_name(span.name if isinstance(span, ReadableSpan) else "ignored")


def _pair(
    sampler: samplers.Sampler, limits: SpanLimits | None = None, *, ours: bool = True
) -> tuple[Any, Any, Any, Any]:
    """An SDK provider and one for RpcTracer, which has the processors the services run with
    (SpanProcessors) unless `ours` is False."""
    found = []
    for side in ("sdk", "rpc"):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(
            resource=Resource.create({"service.name": "probe"}),
            sampler=sampler,
            span_limits=limits,
            active_span_processor=SpanProcessors() if side == "rpc" and ours else None,
        )
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        found.append((provider, exporter))
    return found[0][0], found[0][1], found[1][0], found[1][1]


@pytest.mark.parametrize("sampler_name", list(_SAMPLERS))
@pytest.mark.parametrize("kind", [SpanKind.SERVER, SpanKind.CLIENT])
@pytest.mark.parametrize(
    "setup", ["as the services run", "plain attributes", "the SDK's processors"], ids=str
)
def test_each_sampler_and_parent_gives_the_sdks_span(sampler_name: str, kind: SpanKind, setup: str) -> None:
    sdk_provider, sdk_exported, rpc_provider, rpc_exported = _pair(
        _SAMPLERS[sampler_name], ours=setup != "the SDK's processors"
    )
    # A method's attributes, checked once (what the interceptors pass), or any mapping.
    starting = PlainAttributes(_ATTRIBUTES) if setup == "as the services run" else dict(_ATTRIBUTES)
    sdk_tracer = sdk_provider.get_tracer(INSTRUMENTATION)
    rpc_tracer = RpcTracer(rpc_provider)
    # The same trace ids on both sides, so that ratio samplers decide alike.
    for provider in (sdk_provider, rpc_provider):
        ids = iter(range(1, 10_000))
        provider.id_generator.generate_trace_id = lambda ids=ids: next(ids) * 0x1_0000_0001
    for label, parent in _parents().items():
        for _ in range(4):
            ours = rpc_tracer.start("/ballast.limiter.v1.LimiterService/Check", parent, kind, starting)
            theirs = sdk_tracer.start_span(
                "/ballast.limiter.v1.LimiterService/Check", parent, kind, _ATTRIBUTES
            )
            assert _seen(ours) == _seen(theirs), label
            assert ours.get_span_context().trace_id == theirs.get_span_context().trace_id, label
            for span in (ours, theirs):
                _work(span)
                span.end()
            assert _seen(ours) == _seen(theirs), label
    ours_done, theirs_done = rpc_exported.get_finished_spans(), sdk_exported.get_finished_spans()
    assert [_seen(s) for s in ours_done] == [_seen(s) for s in theirs_done]
    assert all(isinstance(s, RpcSpan) for s in ours_done)
    # Not a comparison that holds vacuously: the always-on samplers export what they should.
    if sampler_name == "always_on":
        assert len(ours_done) == 4 * len(_parents())
    if sampler_name == "parentbased_always_on":
        assert len(ours_done) == 4 * (len(_parents()) - 2)  # all but the two unsampled parents


@pytest.mark.parametrize(
    "limits",
    [
        SpanLimits(max_span_attributes=4, max_events=1, max_links=1, max_span_attribute_length=3),
        # No length limit: plain values skip the SDK's cleaning until the span is full.
        SpanLimits(max_span_attributes=5, max_events=1, max_links=1),
    ],
    ids=["length and count", "count"],
)
def test_limits_apply_as_in_the_sdk(limits: SpanLimits) -> None:
    sdk_provider, sdk_exported, rpc_provider, rpc_exported = _pair(samplers.DEFAULT_ON, limits)
    ours = RpcTracer(rpc_provider).start("m", None, SpanKind.SERVER, _ATTRIBUTES)
    theirs = sdk_provider.get_tracer(INSTRUMENTATION).start_span("m", None, SpanKind.SERVER, _ATTRIBUTES)
    for span in (ours, theirs):
        _work(span)
        span.set_attributes({"x": 1, "y": "z"})  # a full span: the oldest make room
        span.end()
    assert _seen(rpc_exported.get_finished_spans()[0]) == _seen(sdk_exported.get_finished_spans()[0])
    assert rpc_exported.get_finished_spans()[0].dropped_attributes > 0


@pytest.mark.parametrize(
    "limits",
    [SpanLimits(max_span_attribute_length=3), SpanLimits(max_span_attributes=2)],
    ids=["length", "count"],
)
def test_limits_cut_starting_attributes_as_in_the_sdk(limits: SpanLimits) -> None:
    # A sampled parent: the child is decided without the sampler, so its starting attributes go
    # straight into the span, where plain ones skip the SDK's cleaning. A length or count limit
    # must still cut them.
    sdk_provider, sdk_exported, rpc_provider, rpc_exported = _pair(samplers.DEFAULT_ON, limits)
    parent = _parents()["local sampled"]
    ours = RpcTracer(rpc_provider).start("m", parent, SpanKind.SERVER, _ATTRIBUTES)
    theirs = sdk_provider.get_tracer(INSTRUMENTATION).start_span("m", parent, SpanKind.SERVER, _ATTRIBUTES)
    for span in (ours, theirs):
        span.end()
    (exported,) = rpc_exported.get_finished_spans()
    assert _seen(exported) == _seen(sdk_exported.get_finished_spans()[0])
    if limits.max_span_attributes == 2:
        assert len(exported.attributes or {}) == 2
    else:
        assert all(len(str(value)) <= 3 for value in (exported.attributes or {}).values())


_PROVIDER_CALL = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4o-mini",
    "server.address": "api.example.com",
    "server.port": 443,
    "ballast.router.simulated": False,
}


@pytest.mark.parametrize("sampler_name", list(_SAMPLERS))
def test_the_lean_tracers_spans_are_the_sdks(sampler_name: str) -> None:
    sdk_provider, sdk_exported, rpc_provider, rpc_exported = _pair(_SAMPLERS[sampler_name])
    sdk_tracer, ours_tracer = sdk_provider.get_tracer("ballast"), LeanTracer(rpc_provider, "ballast")
    for provider in (sdk_provider, rpc_provider):
        ids = iter(range(1, 10_000))
        provider.id_generator.generate_trace_id = lambda ids=ids: next(ids) * 0x1_0000_0001
    for label, parent in _parents().items():
        ours = ours_tracer.start_span("chat gpt-4o-mini", parent, SpanKind.CLIENT, _PROVIDER_CALL)
        theirs = sdk_tracer.start_span("chat gpt-4o-mini", parent, SpanKind.CLIENT, _PROVIDER_CALL)
        for span in (ours, theirs):
            span.set_attributes({"gen_ai.response.finish_reasons": ("stop",), "gen_ai.usage.input_tokens": 7})
            span.end()
        assert _seen(ours) == _seen(theirs), label
    assert [_seen(s) for s in rpc_exported.get_finished_spans()] == [
        _seen(s) for s in sdk_exported.get_finished_spans()
    ]
    # Links or a start time of its own: the SDK's own span.
    linked = ours_tracer.start_span("x", links=[trace.Link(SpanContext(0x99, 0x98, False, TraceFlags(1)))])
    assert not isinstance(linked, RpcSpan)
    with ours_tracer.start_as_current_span("current") as current:
        assert trace.get_current_span() is current


def test_attributes_keep_the_sdks_order_and_values() -> None:
    sdk_provider, sdk_exported, rpc_provider, rpc_exported = _pair(samplers.DEFAULT_ON)
    parent = _parents()["local sampled"]
    ours = RpcTracer(rpc_provider).start("m", parent, SpanKind.SERVER, _ATTRIBUTES)
    theirs = sdk_provider.get_tracer(INSTRUMENTATION).start_span("m", parent, SpanKind.SERVER, _ATTRIBUTES)
    assert isinstance(ours, RpcSpan)
    for span in (ours, theirs):
        span.set_attributes({"a": 1, "b": "two", "c": 2.5, "d": True})
        span.set_attribute("rpc.system", "grpc")  # set again: it moves to the end
        span.set_attributes({"a": 3, "list": [1, 2]})  # a list: the SDK's own path, a tuple
        span.set_attributes({"reasons": ("stop",), "mixed": ("a", 1), "empty": ()})
        span.set_attribute("", "no key")
        span.set_attribute("none", None)
        span.end()
    (done_ours,), (done_theirs,) = rpc_exported.get_finished_spans(), sdk_exported.get_finished_spans()
    assert list((done_ours.attributes or {}).items()) == list((done_theirs.attributes or {}).items())
    assert done_ours.dropped_attributes == done_theirs.dropped_attributes


def test_an_ended_span_takes_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    _, _, provider, exported = _pair(samplers.DEFAULT_ON)
    span = RpcTracer(provider).start("m", None, SpanKind.CLIENT, _ATTRIBUTES)
    span.end()
    with caplog.at_level(logging.WARNING):
        span.set_attribute("late", 1)
        span.set_attributes({"later": "x"})
        span.add_event("late")
        span.add_link(SpanContext(0x99, 0x98, False, TraceFlags(1)))
        span.set_status(Status(StatusCode.ERROR, "late"))
        span.end()
    finished = exported.get_finished_spans()
    assert len(finished) == 1
    assert "late" not in (finished[0].attributes or {}) and "later" not in (finished[0].attributes or {})
    assert caplog.text.count("Setting attribute on ended span.") == 2
    assert finished[0].events == () and finished[0].links == ()
    assert finished[0].status.status_code is StatusCode.UNSET
    assert not span.is_recording()


def test_a_provider_that_is_not_the_sdks_gets_its_own_spans() -> None:
    span = RpcTracer(trace.NoOpTracerProvider()).start("m", None, SpanKind.SERVER, _ATTRIBUTES)
    assert not span.is_recording() and not isinstance(span, RpcSpan)


def test_a_span_context_unpacks_as_the_tracer_reads_it() -> None:
    # RpcTracer.start unpacks a parent's SpanContext instead of reading its properties.
    for context in (
        SpanContext(
            0x0AF7651916CD43DD8448EB211C80319C,
            0xB7AD6B7169203331,
            True,
            TraceFlags(3),
            TraceState([("v", "1")]),
        ),
        SpanContext(0x1234, 0x5678, False, TraceFlags(0)),
        trace.INVALID_SPAN_CONTEXT,
    ):
        trace_id, span_id, remote, flags, state, valid = context
        assert (trace_id, span_id, remote, flags, state, valid) == (
            context.trace_id,
            context.span_id,
            context.is_remote,
            context.trace_flags,
            context.trace_state,
            context.is_valid,
        )


def test_plain_attributes_are_checked_when_made() -> None:
    assert PlainAttributes({"a": "x", "b": 1, "c": ("s", "t"), "d": ()}) == {
        "a": "x",
        "b": 1,
        "c": ("s", "t"),
        "d": (),
    }
    for bad in ({"": "x"}, {1: "x"}, {"a": [1]}, {"a": ("s", 1)}, {"a": None}, {"a": {"b": 1}}):
        with pytest.raises(ValueError, match="not plain"):
            PlainAttributes(bad)  # type: ignore[arg-type]


def test_span_processors_run_each_hook_that_does_something_in_order() -> None:
    calls: list[tuple[str, str]] = []

    class Noting(SimpleSpanProcessor):
        def __init__(self, label: str) -> None:
            super().__init__(InMemorySpanExporter())
            self.label = label

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            calls.append((self.label, "start"))

        def _on_ending(self, span: Any) -> None:
            calls.append((self.label, "ending"))

        def on_end(self, span: Any) -> None:
            calls.append((self.label, "end"))
            super().on_end(span)

    class OnlyEnd(SimpleSpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            """Nothing here but a docstring."""

        def _on_ending(self, span: Any) -> None:
            return None

    exporter = InMemorySpanExporter()
    processors = SpanProcessors()
    provider = TracerProvider(active_span_processor=processors)
    first, batch, only_end = Noting("first"), BatchSpanProcessor(InMemorySpanExporter()), OnlyEnd(exporter)
    for processor in (first, batch, only_end):
        provider.add_span_processor(processor)
    # BatchSpanProcessor's and SimpleSpanProcessor's on_start and _on_ending do nothing: skipped.
    assert processors.starting == (first.on_start,)
    assert processors.ending == (first._on_ending,)
    assert processors.ended == (first.on_end, batch.on_end, only_end.on_end)
    second = Noting("second")
    provider.add_span_processor(second)  # added later: runs after the others, for new spans
    assert list(processors.starting) == [first.on_start, second.on_start]
    for span in (
        RpcTracer(provider).start("rpc", None, SpanKind.SERVER, _ATTRIBUTES),
        provider.get_tracer("sdk").start_span("sdk"),  # the SDK's span goes through the same hooks
    ):
        calls.clear()
        span.end()
        assert calls == [("first", "ending"), ("second", "ending"), ("first", "end"), ("second", "end")]
    assert [s.name for s in exporter.get_finished_spans()] == ["rpc", "sdk"]
    assert len(processors._span_processors) == 4
    provider.shutdown()


def test_a_hook_is_skipped_only_when_it_returns_at_once() -> None:
    def passes(span: Any) -> None:
        pass

    def works(span: Any) -> None:
        span.touched = True

    def returns_early(span: Any) -> None:
        if span:
            return
        span.touched = True

    assert _does_nothing(passes)
    assert _does_nothing(SimpleSpanProcessor(InMemorySpanExporter()).on_start)
    assert not _does_nothing(works)
    assert not _does_nothing(returns_early)
    assert not _does_nothing(print)  # a builtin: no code to read, so it runs
    assert not _does_nothing(lambda span: span)


def test_a_span_keeps_its_methods_attributes_until_they_are_read() -> None:
    _, _, provider, exported = _pair(samplers.DEFAULT_ON)
    starting = PlainAttributes(_ATTRIBUTES)
    tracer = RpcTracer(provider)
    # A root (the sampler hands the attributes back in a view of its own) and a child (decided
    # without the sampler): both keep the method's object, shared by every call.
    root = tracer.start("m", None, SpanKind.SERVER, starting)
    child = tracer.start("m", trace.set_span_in_context(root), SpanKind.CLIENT, starting)
    for span in (root, child):
        assert isinstance(span, RpcSpan)
        span.set_attribute("rpc.grpc.status_code", 0)
        span.set_attributes({"ballast.tenant": "acme", "rpc.grpc.status_code": 5})
        span.end()
        unmade = span.unmade_attributes()
        assert unmade is not None and unmade[0] is starting
        assert unmade[1] == {"ballast.tenant": "acme", "rpc.grpc.status_code": 5}
        assert list(unmade[1]) == ["ballast.tenant", "rpc.grpc.status_code"]  # set again: moved last
        made = span.attributes
        assert made is not None and span.unmade_attributes() is None
        assert list(made.items()) == [
            *_ATTRIBUTES.items(),
            ("ballast.tenant", "acme"),
            ("rpc.grpc.status_code", 5),
        ]
        assert span._attributes._immutable  # made after the end
    assert starting == _ATTRIBUTES  # the shared object is never written to
    # A sampler that adds attributes: its own view, made at once.
    _, _, tagging, _ = _pair(_SAMPLERS["tagging"])
    tagged = RpcTracer(tagging).start("m", None, SpanKind.SERVER, starting)
    assert isinstance(tagged, RpcSpan) and tagged.unmade_attributes() is None
    assert len(exported.get_finished_spans()) == 2


@pytest.mark.parametrize("room", [None, 0, 1, 2], ids=["no limit", "full", "room for 1", "room for 2"])
def test_attributes_set_one_by_one_on_unmade_attributes_are_the_sdks(room: int | None) -> None:
    # Each call's status code and the edge's tenant are set one at a time while the method's
    # attributes are still shared: set again, they move to the end; past the count limit, the
    # oldest are dropped, as in the SDK.
    limits = SpanLimits(max_span_attributes=None if room is None else len(_ATTRIBUTES) + room)
    sdk_provider, sdk_exported, rpc_provider, rpc_exported = _pair(samplers.DEFAULT_ON, limits)
    parent = _parents()["local sampled"]
    ours = RpcTracer(rpc_provider).start("m", parent, SpanKind.SERVER, PlainAttributes(_ATTRIBUTES))
    theirs = sdk_provider.get_tracer(INSTRUMENTATION).start_span("m", parent, SpanKind.SERVER, _ATTRIBUTES)
    assert isinstance(ours, RpcSpan) and ours.unmade_attributes() is not None
    for span in (ours, theirs):
        span.set_attribute("rpc.grpc.status_code", 0)
        span.set_attribute("ballast.tenant", "acme")
        span.set_attribute("rpc.grpc.status_code", 5)  # set again: it moves to the end
        span.set_attribute("ballast.cache", "hit")
        span.end()
    (done_ours,), (done_theirs,) = rpc_exported.get_finished_spans(), sdk_exported.get_finished_spans()
    assert list((done_ours.attributes or {}).items()) == list((done_theirs.attributes or {}).items())
    assert done_ours.dropped_attributes == done_theirs.dropped_attributes


def test_the_context_helpers_do_what_the_api_does(caplog: pytest.LogCaptureFixture) -> None:
    span = trace.NonRecordingSpan(SpanContext(0x12, 0x34, False, TraceFlags(1)))
    base = otel_context.set_value("k", "v")
    made = with_span(span, base)
    assert made == trace.set_span_in_context(span, base) and type(made) is otel_context.Context
    assert made["k"] == "v" and _SPAN_KEY in made and _SPAN_KEY not in base  # base unchanged
    token = attach(made)
    assert current_context() is made is otel_context.get_current()
    assert with_span(span) == trace.set_span_in_context(span)
    detach(token)
    assert current_context() is not made
    # A token reset twice (or from another context) is logged, as the API logs it, not raised.
    with caplog.at_level(logging.ERROR):
        detach(token)
    assert "Failed to detach context" in caplog.text

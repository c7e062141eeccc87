"""gRPC tracing: a SERVER span for every call a service handles (an interceptor), a CLIENT span
for every call it makes (a channel, TracedChannel), W3C trace context (the configured
propagators) carried in the metadata, and the RPC semantic-convention attributes (`rpc.system`,
`rpc.service`, `rpc.method`, `rpc.grpc.status_code`). Health checks and reflection are left out
of traces.

The interceptors of opentelemetry-instrumentation-grpc did the same with more work on every
call: a proxy object around each servicer context, the method handler rebuilt per call, the
metadata copied into a dict to read the user agent, the peer address parsed, a done-callback
and two awaits per client call. Here a method's handler is wrapped once (AroundInterceptor), its
attributes are built once, the status comes from the context when the call ends, and a call
made is traced without a client interceptor, which would put it in a task of its own.

What is left is paid in part whether or not a trace is kept: an in-process call with a
trivial handler took 23 us of the process's CPU with tracing off, 37 us traced as under
one-in-ten sampling with nothing kept (the server span's interceptor, both spans' contexts, ids
and decisions) and 69 us with every trace exported, the export thread included
(bench/results/traced_calls.md, a Xeon).
"""

from __future__ import annotations

import asyncio
import dis
import logging
import random as _random
import threading
import types
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from contextvars import ContextVar, Token
from time import time_ns
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, TraceState

from services.kit.interceptors import Around, AroundInterceptor, Context

INSTRUMENTATION = "ballast.grpc"
_UNTRACED = ("/grpc.health.", "/grpc.reflection.")
# A server span is an error only for these codes (the RPC conventions): a NOT_FOUND or an
# INVALID_ARGUMENT is the server doing its job.
# Kept as the codes' numbers: a StatusCode's hash is a Python call (Enum.__hash__).
_SERVER_ERRORS = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    )
)
_STATUS_CODE = "rpc.grpc.status_code"
_PLAIN = frozenset({str, bool, int, float})
UNSET_STATUS = Status(StatusCode.UNSET)  # every RpcSpan's status until one is set
_getrandbits = _random.getrandbits  # RandomIdGenerator's source of span ids
_logger = logging.getLogger(__name__)

# The current OpenTelemetry context, read and set straight on the runtime's ContextVar when the
# runtime is the SDK's default (ContextVarsRuntimeContext): the API's get_current, attach and
# detach reach it through two calls each, and a traced in-process call makes six of them.
_RUNTIME = getattr(otel_context, "_RUNTIME_CONTEXT", None)
_CURRENT: ContextVar[otel_context.Context] | None = (
    _RUNTIME._current_context if isinstance(_RUNTIME, ContextVarsRuntimeContext) else None
)


def current_context() -> otel_context.Context:
    """otel_context.get_current()."""
    return _CURRENT.get() if _CURRENT is not None else otel_context.get_current()


def attach(context: otel_context.Context) -> object:
    """otel_context.attach(context)."""
    return _CURRENT.set(context) if _CURRENT is not None else otel_context.attach(context)


def detach(token: Any) -> None:
    """otel_context.detach(token), which logs (and does not raise) a token from another context."""
    if _CURRENT is None or type(token) is not Token:
        otel_context.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except Exception:  # a token used already, or made in another context
        otel_context.detach(token)  # which fails again, and logs it as the API does


def with_span(span: trace.Span, context: otel_context.Context | None = None) -> otel_context.Context:
    """trace.set_span_in_context(span, context): `context` (the current one if None) with `span`
    as its span, made in one copy (set_value copies twice)."""
    return otel_context.Context(current_context() if context is None else context, **{_SPAN_KEY: span})


def _plain(value: Any) -> bool:
    """A value the SDK's cleaning leaves as it is: a string, boolean or number, or a tuple of one
    of these kinds."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    return (
        kind is tuple
        and len({type(item) for item in value}) <= 1
        and all(type(item) in _PLAIN for item in value)
    )


def _all_plain(items: Any) -> bool:
    """Whether every key of `items` (pairs) is a non-empty string and every value is plain."""
    return all(type(key) is str and key and _plain(value) for key, value in items)


class PlainAttributes(dict[str, Any]):
    """Span attributes checked once, when made, to be what _put_plain takes: non-empty string
    keys and plain values. A span started with them skips the check (a method's attributes are
    built once and start every span of its calls). Not to be changed after it is made."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        super().__init__(items)
        if not _all_plain(self.items()):
            raise ValueError(f"not plain span attributes: {items!r}")


def _put_plain(attributes: BoundedAttributes, items: Any) -> bool:
    """Puts `items` into `attributes` as BoundedAttributes would when every key is a non-empty
    string and every value is plain, without its cleaning of each value (about 3 us an attribute
    inside the suite), and says whether it did. False changes nothing and leaves the items to the
    SDK: another kind of key or value, a length limit on values, or attributes that would have to
    drop some to take these."""
    return _all_plain(items) and _put_checked(attributes, items)


def _put_checked(attributes: BoundedAttributes, items: Any) -> bool:
    """_put_plain for items already known to be plain, with keys that are non-empty strings."""
    if attributes.max_value_len is not None:
        return False
    held, maxlen = attributes._dict, attributes.maxlen
    with attributes._lock:
        if (
            maxlen is not None
            and len(held) + len(items) > maxlen
            and len(held) + sum(key not in held for key, _ in items) > maxlen
        ):
            return False
        for key, value in items:
            if key in held:
                del held[key]  # a key set again moves to the end, as in the SDK
            held[key] = value
    return True


def _does_nothing(hook: Any) -> bool:
    """Whether a processor's hook returns at once: a function whose body is `pass` or only its
    docstring, as SpanProcessor's own hooks and BatchSpanProcessor's on_start and _on_ending."""
    code = getattr(getattr(hook, "__func__", hook), "__code__", None)
    if not isinstance(code, types.CodeType):
        return False
    steps = [(step.opname, step.argval) for step in dis.get_instructions(code) if step.opname not in _NO_STEP]
    return steps in _RETURNS_NONE


_NO_STEP = frozenset({"RESUME", "NOP", "CACHE"})
_RETURNS_NONE = ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


def _hooks(processors: Sequence[SpanProcessor], name: str) -> tuple[Callable[..., None], ...]:
    """Each processor's hook `name`, in order, but those that do nothing."""
    return tuple(hook for hook in (getattr(p, name) for p in processors) if not _does_nothing(hook))


class SpanProcessors(sdk_trace.SynchronousMultiSpanProcessor):
    """The SDK's SynchronousMultiSpanProcessor (each hook runs the processors in the order they
    were added) that calls, per hook, only the processors that do something in it:
    BatchSpanProcessor's on_start and _on_ending do nothing, and cost every span two calls."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.starting: tuple[Callable[..., None], ...] = ()
        self.ending: tuple[Callable[[Any], None], ...] = ()
        self.ended: tuple[Callable[[Any], None], ...] = ()

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        with self._lock:
            processors = (*self._span_processors, span_processor)
            self.starting = _hooks(processors, "on_start")
            self.ending = _hooks(processors, "_on_ending")
            self.ended = _hooks(processors, "on_end")
            self._span_processors = processors

    def on_start(self, span: Any, parent_context: otel_context.Context | None = None) -> None:
        for starting in self.starting:
            starting(span, parent_context=parent_context)

    def _on_ending(self, span: Any) -> None:
        for ending in self.ending:
            ending(span)

    def on_end(self, span: Any) -> None:
        for ended in self.ended:
            ended(span)


class RpcSpan(sdk_trace.Span):
    """The SDK's span for one gRPC call, made with less work: the SDK's constructor validates the
    starting attributes one by one and allocates event and link lists every span has, and its
    end() hands processors a copy. Here the attributes are this module's own (strings, built once
    per method), the lists are made when an event or link is first added, and processors get the
    span itself, ended and immutable; plain attributes (strings, booleans, numbers and tuples of
    one of them) skip the SDK's cleaning of each value, which leaves them as they are. Everything
    else (set_attribute, set_status, add_event, record_exception, what exporters and processors
    read) is the SDK's, on the same fields: the fields the SDK's own constructor sets, set here
    without calling it (tests/unit/kit/test_rpc_spans.py holds both kinds of span equal).

    A span started with PlainAttributes keeps them as they are, shared with every other call of
    its method, and the plain attributes set later (the call's status code, the edge's tenant) in
    a dict of its own: its BoundedAttributes (`_attributes`, what the SDK's code and processors
    read) is made only when first read, in the order the attributes were set. That object, its
    lock and the copy of the method's attributes into it were made for every span, and only the
    exporter read them: services/kit/spanwire.py now reads the two parts as they are
    (`unmade_attributes`)."""

    # Fields every span starts with the same value: class defaults, set on a span when changed.
    _instrumentation_info = None
    _end_time: int | None = None
    _status = UNSET_STATUS
    _events: Any = ()
    _links: Any = ()
    _trace_config = None
    _record_exception = True
    _set_status_on_exception = True
    _record_end_metrics = None

    def __init__(
        self,
        provider: sdk_trace.TracerProvider,
        scope: InstrumentationScope | None,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any],
    ) -> None:
        # ReadableSpan's fields
        self._name = name
        self._context = context
        self._kind = kind
        self._instrumentation_scope = scope
        self._parent = parent
        self._start_time: int | None = time_ns()
        # Span's fields
        self._resource = provider._resource  # the `resource` property's field
        self._sampler = provider.sampler
        self._span_processor = provider._active_span_processor
        self._limits = limits = provider._span_limits
        self._lock = threading.Lock()
        self._added: dict[str, Any] | None = None
        maxlen = limits.max_span_attributes
        if (
            type(attributes) is PlainAttributes
            and limits.max_span_attribute_length is None
            and (maxlen is None or len(attributes) <= maxlen)
        ):
            self._starting: Mapping[str, Any] | None = attributes
            self._made: BoundedAttributes | None = None
            return
        self._starting = None
        bounded = BoundedAttributes(
            maxlen, None, immutable=False, max_value_len=limits.max_span_attribute_length
        )
        if attributes and not _put_plain(bounded, attributes.items()):
            bounded = BoundedAttributes(
                maxlen, attributes, immutable=False, max_value_len=limits.max_span_attribute_length
            )
        self._made = bounded

    @property
    def _attributes(self) -> BoundedAttributes:
        """The span's attributes as the SDK keeps them, made on first read from the starting
        attributes and those set since (all plain, within the limits: see __init__)."""
        made = self._made
        if made is None:
            made = BoundedAttributes(self._limits.max_span_attributes, None, immutable=False)
            _put_checked(made, self._starting.items())  # type: ignore[union-attr]
            if self._added:
                _put_checked(made, self._added.items())
            made._immutable = self._end_time is not None
            self._made, self._starting, self._added = made, None, None
        return made

    @_attributes.setter
    def _attributes(self, value: BoundedAttributes) -> None:
        self._made, self._starting, self._added = value, None, None

    def unmade_attributes(self) -> tuple[Mapping[str, Any], dict[str, Any] | None] | None:
        """The starting attributes (shared by the method's calls) and those set since, while the
        span's BoundedAttributes has not been made; None once it has."""
        starting = self._starting
        if starting is None or self._made is not None:
            return None
        return starting, self._added

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._set_one(key, value, False):
            super().set_attribute(key, value)

    def _set_one(self, key: str, value: Any, checked: bool) -> bool:
        """_set_plain of one attribute (`checked`: known to be plain, with a key that is a
        non-empty string), in fewer steps while the attributes are unmade and the key is new to
        the starting ones: every call's status code, the edge's tenant."""
        with self._lock:
            starting, added = self._starting, self._added
            if self._end_time is None and starting is not None and self._made is None and key not in starting:
                if not checked and not (type(key) is str and key and _plain(value)):
                    return False
                maxlen = self._limits.max_span_attributes
                if added is None:
                    if maxlen is None or len(starting) < maxlen:
                        self._added = {key: value}
                        return True
                elif key in added:
                    del added[key]  # a key set again moves to the end, as in the SDK
                    added[key] = value
                    return True
                elif maxlen is None or len(starting) + len(added) < maxlen:
                    added[key] = value
                    return True
        return self._set_plain(((key, value),), _put_checked if checked else _put_plain)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._set_plain(attributes.items()):
            super().set_attributes(attributes)

    def _set_plain(self, items: Any, put: Callable[[BoundedAttributes, Any], bool] = _put_plain) -> bool:
        """Sets plain attributes as the SDK would (see _put_plain), and says whether it did; on an
        ended span, warns as the SDK does, whatever the values. `put` is _put_checked for items
        known to be plain."""
        with self._lock:
            if self._end_time is not None:
                _logger.warning("Setting attribute on ended span.")
                return True
            starting = self._starting
            if starting is not None and self._made is None:
                if put is _put_plain and not _all_plain(items):
                    return False
                added = self._added
                if added is None:
                    added = {}
                maxlen = self._limits.max_span_attributes
                fresh = [key for key, _ in items if key not in added]
                if any(key in starting for key, _ in items) or (
                    maxlen is not None and len(starting) + len(added) + len(set(fresh)) > maxlen
                ):
                    # Setting a starting attribute again moves it to the end, and too many
                    # attributes drop some: both are the SDK's to do, on the made attributes.
                    return put(self._attributes, items)
                for key, value in items:
                    if key in added:
                        del added[key]  # a key set again moves to the end, as in the SDK
                    added[key] = value
                self._added = added
                return True
            return put(self._attributes, items)

    def _add_event(self, event: Any) -> None:
        self._events = self._appended("_add_event", self._events, event, self._limits.max_events)

    def _add_link(self, link: trace.Link) -> None:
        self._links = self._appended("_add_link", self._links, link, self._limits.max_links)

    def _appended(self, what: str, items: Any, item: Any, maxlen: int | None) -> Any:
        """`items` with `item` added: the span's first event or link makes its list."""
        if self._end_time is not None:
            _logger.warning("Tried calling %s on an ended span.", what)
            return items
        if type(items) is tuple:
            items = BoundedList(maxlen)
        items.append(item)
        return items

    def end(self, end_time: int | None = None) -> None:
        with self._lock:
            if self._end_time is not None:
                _logger.warning("Calling end() on an ended span.")
                return
            self._end_time = end_time if end_time is not None else time_ns()
            if self._made is not None:
                self._made._immutable = True
        processors = self._span_processor
        if type(processors) is SpanProcessors:
            for ending in processors.ending:
                ending(self)
            for ended in processors.ended:
                ended(self)
        else:
            processors._on_ending(self)
            processors.on_end(self)


_FLAGS = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


class RpcTracer:
    """Starts the span of a gRPC call as the SDK's Tracer.start_span does: the same sampler,
    ids, trace flags, processors and limits, with RpcSpan in place of the SDK's span. A child of
    a parent whose ParentBased decision is fixed (always on or off, the SDK's defaults for
    children) is decided without asking the sampler, which would look the parent up again.
    Any other provider than the SDK's gets its own tracer's spans."""

    def __init__(self, tracer_provider: trace.TracerProvider, scope: str = INSTRUMENTATION) -> None:
        self.tracer = tracer_provider.get_tracer(scope)
        sdk = isinstance(tracer_provider, sdk_trace.TracerProvider) and isinstance(
            self.tracer, sdk_trace.Tracer
        )
        self.provider: sdk_trace.TracerProvider | None = tracer_provider if sdk else None  # type: ignore[assignment]
        self.scope = getattr(self.tracer, "_instrumentation_scope", None)
        self._decided: dict[tuple[bool, bool], bool] = {}
        sampler = self.provider.sampler if self.provider is not None else None
        if isinstance(sampler, ParentBased) and type(sampler).should_sample is ParentBased.should_sample:
            children = {
                (True, True): sampler._remote_parent_sampled,
                (True, False): sampler._remote_parent_not_sampled,
                (False, True): sampler._local_parent_sampled,
                (False, False): sampler._local_parent_not_sampled,
            }
            for parent, child in children.items():
                if type(child) is StaticSampler:
                    self._decided[parent] = child._decision is Decision.RECORD_AND_SAMPLE

    def drops_children_of(self, parent: SpanContext) -> bool:
        """Whether a span of this tracer that is a child of `parent`, an unsampled span's context,
        is decided not recorded without asking the sampler, and so are its own children (made in
        this process)."""
        return (
            self.provider is not None
            and not parent.trace_flags.sampled
            and self._decided.get((parent.is_remote, False)) is False
            and self._decided.get((False, False)) is False
        )

    def start(
        self, name: str, context: otel_context.Context | None, kind: SpanKind, attributes: Mapping[str, Any]
    ) -> trace.Span:
        """A span of this call, a child of the current span unless `context` says otherwise."""
        provider, tracer = self.provider, self.tracer
        # tracer._is_enabled(), without the call
        if provider is None or not tracer._tracer_config.is_enabled:  # type: ignore[attr-defined]
            return tracer.start_span(name, context, kind, attributes)
        # trace.get_current_span(context).get_span_context(), in fewer calls: the spans this
        # module makes keep their context in `_context` (an ABC's isinstance is a Python call).
        found = (current_context() if context is None else context).get(_SPAN_KEY)
        parent: SpanContext | None = None
        if type(found) in _OWN_SPANS:
            parent = found._context  # type: ignore[attr-defined]
        elif found is not None and isinstance(found, trace.Span):
            parent = found.get_span_context()
        ids = provider.id_generator
        parent_state: TraceState | None = None
        if parent is not None:
            # A SpanContext is a tuple of these six: unpacked, not read through six more
            # properties (tests/unit/kit/test_rpc_spans.py checks the order).
            trace_id, parent_id, remote, flags, parent_state, _ = parent
            if trace_id == INVALID_TRACE_ID or parent_id == INVALID_SPAN_ID:  # not parent.is_valid
                parent = None
        if parent is not None:
            random = bool(flags & TraceFlags.RANDOM_TRACE_ID)
            decided = self._decided.get((remote, bool(flags & TraceFlags.SAMPLED)))
        else:
            parent = parent_state = None
            trace_id = ids.generate_trace_id()
            random = ids.is_trace_id_random()
            decided = None
        if decided is not None:
            sampled = recording = decided
            trace_state = parent_state
            given: Mapping[str, Any] = attributes
        else:
            result = provider.sampler.should_sample(context, trace_id, name, kind, attributes, ())
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            recording = sampled or result.decision is Decision.RECORD_ONLY
            trace_state, given = result.trace_state, result.attributes
            # A sampler that adds nothing hands back our attributes in a read-only view: the span
            # keeps ours (checked once, when made) when they are the same items in the same order.
            if (
                type(attributes) is PlainAttributes
                and given is not None
                and len(given) == len(attributes)
                and list(given.items()) == list(attributes.items())
            ):
                given = attributes
        if parent is not None and type(ids) is RandomIdGenerator:
            # SpanContext(...) for ids known to be valid (the parent's trace id, a span id that
            # is not 0): the tuple it makes, without the checks of its __new__.
            span_id = _getrandbits(64) or ids.generate_span_id()
            flags = _FLAGS[sampled, random]
            state = DEFAULT_TRACE_STATE if trace_state is None else trace_state
            span_context = tuple.__new__(SpanContext, (trace_id, span_id, False, flags, state, True))
        else:
            span_context = SpanContext(
                trace_id,
                ids.generate_span_id(),
                is_remote=False,
                trace_flags=_FLAGS[sampled, random],
                trace_state=trace_state,
            )
        if not recording:
            # trace.NonRecordingSpan(span_context), without a call to its __init__
            unrecorded = _new_object(_NonRecordingSpan)
            unrecorded._context = span_context
            return unrecorded
        # RpcSpan(...) without the SDK Span's __new__, a Python call that only refuses to make a
        # Span itself
        span = _new_object(RpcSpan)
        span.__init__(provider, self.scope, name, span_context, parent, kind, given)  # type: ignore[misc]
        processors = span._span_processor
        if type(processors) is SpanProcessors:
            for starting in processors.starting:
                starting(span, parent_context=context)
        else:
            processors.on_start(span, parent_context=context)
        return span


_NonRecordingSpan = trace.NonRecordingSpan
_OWN_SPANS = (RpcSpan, _NonRecordingSpan)
_new_object = object.__new__


class HandedOver:
    """A servicer context that brings its caller's trace context as an object: an in-process call
    (services/kit/local.py), whose handler would otherwise parse back the `traceparent` its
    caller had just written (about 20 us a call). None: read the metadata, as over the wire."""

    __slots__ = ("trace_parent",)

    def __init__(self, trace_parent: otel_context.Context | None) -> None:
        self.trace_parent = trace_parent


class LeanTracer(trace.Tracer):
    """A tracer whose start_span makes its spans as RpcTracer does (RpcSpans, the sampler's
    decision for children of fixed-decision parents taken without asking it again). Spans with
    links or a start time of their own, and start_as_current_span, are the SDK tracer's."""

    def __init__(self, tracer_provider: trace.TracerProvider, scope: str) -> None:
        self._rpc = RpcTracer(tracer_provider, scope)

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        if links or start_time is not None or not record_exception or not set_status_on_exception:
            return self._rpc.tracer.start_span(
                name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
            )
        return self._rpc.start(name, context, kind, attributes or {})

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._rpc.tracer.start_as_current_span(*args, **kwargs)


_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
_w3c_only: tuple[object, bool] = (None, False)


def _extracted(metadata: Any) -> otel_context.Context:
    """The trace context a caller sent in its metadata. With the default propagators (W3C trace
    context and baggage), a call that carries none of their headers, as from a client that is not
    traced, starts from an empty context without running them (about 10 us a call); any other
    propagator always runs, since it may read headers it does not declare."""
    global _w3c_only
    textmap = propagate.get_global_textmap()
    known, w3c = _w3c_only
    if known is not textmap:
        parts = getattr(textmap, "_propagators", None)
        w3c = isinstance(textmap, CompositePropagator) and all(
            type(part) in (TraceContextTextMapPropagator, W3CBaggagePropagator) for part in parts or ()
        )
        _w3c_only = (textmap, w3c)
    if not metadata or (w3c and _W3C_FIELDS.isdisjoint([key for key, _ in metadata])):
        return otel_context.Context()
    return propagate.extract(dict(metadata))


def _attributes(method: str) -> PlainAttributes:
    service, _, name = method.lstrip("/").partition("/")
    return PlainAttributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


class ServerTracing(AroundInterceptor):
    """One SERVER span per handled call, the child of the caller's span when it sent one."""

    def __init__(self, tracer_provider: trace.TracerProvider) -> None:
        super().__init__()
        self._tracer = RpcTracer(tracer_provider)

    def around(self, method: str) -> Around | None:
        if method.startswith(_UNTRACED):
            return None
        start = self._tracer.start
        attributes = _attributes(method)

        class Traced:
            # A plain class, as MetricsInterceptor's: this runs around every call.
            __slots__ = ("context", "span", "token")

            def __init__(self, context: Context) -> None:
                self.context = context

            async def __aenter__(self) -> None:
                context = self.context
                parent = context.trace_parent if isinstance(context, HandedOver) else None
                if parent is None:
                    parent = _extracted(context.invocation_metadata())
                span = start(method, parent, SpanKind.SERVER, attributes)
                self.span = span
                self.token = attach(with_span(span, parent))

            async def __aexit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
                span, context = self.span, self.context
                if type(span) is trace.NonRecordingSpan:
                    # A trace not kept: its span takes no status and its end does nothing.
                    detach(self.token)
                    return
                try:
                    code = context.code()
                    if kind is not None and not code:
                        # Not an abort with a status: a client that went away, or a bug.
                        if issubclass(kind, asyncio.CancelledError) or context.cancelled():
                            code = grpc.StatusCode.CANCELLED
                        else:
                            code = grpc.StatusCode.UNKNOWN
                            if isinstance(exc, Exception):
                                span.record_exception(exc)
                    code = code or grpc.StatusCode.OK
                    if _set_status_code(span, code) in _SERVER_ERRORS:
                        span.set_status(Status(StatusCode.ERROR, f"{code}:{context.details() or ''}"))
                finally:
                    detach(self.token)
                    span.end()

        return Traced


def _set_status_code(span: trace.Span, code: grpc.StatusCode) -> int:
    """Sets the call's `rpc.grpc.status_code` on its span, and returns it."""
    value: int = code._value_[0]  # code.value[0] without the enum's property
    if type(span) is not RpcSpan or not span._set_one(_STATUS_CODE, value, True):
        span.set_attribute(_STATUS_CODE, value)
    return value


def end_client_span(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
    """Ends a CLIENT span with the call's status (an error for every code but OK)."""
    if type(span) is trace.NonRecordingSpan:
        return  # a trace not kept: nothing to record, and its end does nothing
    _set_status_code(span, code)
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, details or code.name))
    span.end()


class ClientSpans:
    """Starts the CLIENT span of a call this service makes, the child of the current span (the
    call being handled). Used by TracedChannel and by in-process calls (services/kit/local.py),
    so a trace looks the same whichever way a call travelled."""

    def __init__(self, tracer_provider: trace.TracerProvider) -> None:
        self._tracer = RpcTracer(tracer_provider)
        self._attributes: dict[str, PlainAttributes] = {}

    def start(self, method: str) -> trace.Span:
        attributes = self._attributes.get(method)
        if attributes is None:
            attributes = self._attributes[method] = _attributes(method)
        return self._tracer.start(method, None, SpanKind.CLIENT, attributes)

    def start_local(self, method: str) -> tuple[trace.Span | None, otel_context.Context]:
        """The CLIENT span of an in-process call (services/kit/local.py), if one is made, and the
        context the server's span continues: the current one with that span in it.

        In a trace that is not kept, with the sampler's decision fixed for every child of a span
        not sampled (ParentBased's default, children of unsampled parents dropped), no CLIENT span
        is made. It would be a NonRecordingSpan that nothing could see: not current in the caller,
        not sent anywhere (the context is handed over as an object) and not recorded. The server's
        span, then the child of the caller's, gets the same trace id, flags, trace state and
        decision, and a span id of its own, as it would have."""
        context = current_context()
        found = context.get(_SPAN_KEY)
        if type(found) is _NonRecordingSpan and self._tracer.drops_children_of(found._context):
            return None, context
        span = self.start(method)
        return span, with_span(span, context)


class _Replacing(Setter[list[tuple[str, str]]]):
    """Writes a propagator's field into call metadata kept as a list of pairs, in place of any
    value the caller set for it."""

    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        if any(name == key for name, _ in carrier):
            carrier[:] = [pair for pair in carrier if pair[0] != key]
        carrier.append((key, value))


_REPLACING = _Replacing()


def _with_trace_context(metadata: Any, span: trace.Span) -> tuple[tuple[str, str], ...]:
    """The call's metadata with the trace context of `span` (and the current baggage) in it."""
    carrier = list(metadata) if metadata else []
    propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_REPLACING)
    return tuple(carrier)


class TracedChannel(grpc.aio.Channel):
    """A channel whose calls each get a CLIENT span, the child of the current span, with its
    trace context in the call's metadata for the server to continue; with `spans` None (tracing
    off), the channel's own calls as they are.

    This is what a client interceptor would do, without one: grpc.aio runs every call of a channel
    that has any interceptor in a task of its own, through the interceptor's continuation, even
    when the trace is not kept (measured with cProfile per call: 440 Python calls and 4 tasks
    without an interceptor, 520 and 5 with one that only passes the call on). Here a call whose
    span is not recorded is the channel's own call object; a recorded one is wrapped so its span
    ends when the caller has the outcome (the response or error awaited, the stream ended)."""

    def __init__(self, channel: grpc.aio.Channel, spans: ClientSpans | None) -> None:
        self._channel = channel
        self.spans = spans

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **kw: Any,
    ) -> Any:
        call = self._channel.unary_unary(method, request_serializer, response_deserializer, **kw)
        return call if self.spans is None else _Traced(call, method, self.spans, _TracedUnaryCall)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **kw: Any,
    ) -> Any:
        call = self._channel.unary_stream(method, request_serializer, response_deserializer, **kw)
        return call if self.spans is None else _Traced(call, method, self.spans, _TracedStreamCall)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        # No Ballast method streams requests: these are not traced.
        return self._channel.stream_unary(*args, **kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(*args, **kwargs)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    async def __aenter__(self) -> TracedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


class _Traced:
    """A traced channel's multi-callable: starts the CLIENT span and sends its context along."""

    __slots__ = ("_call", "_method", "_spans", "_wrap")

    def __init__(self, call: Any, method: str, spans: ClientSpans, wrap: type[_TracedCall]) -> None:
        self._call, self._method, self._spans, self._wrap = call, method, spans, wrap

    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None, **options: Any
    ) -> Any:
        span = self._spans.start(self._method)
        try:
            call = self._call(
                request, timeout=timeout, metadata=_with_trace_context(metadata, span), **options
            )
        except BaseException as error:  # refused before it started (metadata that is not valid)
            _end_failed(span, error)
            raise
        # A span that records nothing needs no end: the call goes back to the caller as it is.
        return self._wrap(call, span) if span.is_recording() else call


def _end_failed(span: trace.Span, error: BaseException) -> None:
    if isinstance(error, grpc.aio.AioRpcError):
        end_client_span(span, error.code(), error.details())
    else:
        # Cancelled by the caller, or a failure before any status.
        end_client_span(span, grpc.StatusCode.CANCELLED, type(error).__name__)


class _TracedCall:
    """A call whose CLIENT span ends, once, with the call's outcome; the rest is the call's."""

    __slots__ = ("_call", "_span")

    def __init__(self, call: Any, span: trace.Span) -> None:
        self._call = call
        self._span: trace.Span | None = span

    def _end(self, code: grpc.StatusCode, details: str | None) -> None:
        if self._span is not None:
            end_client_span(self._span, code, details)
            self._span = None

    def _failed(self, error: BaseException) -> None:
        if self._span is not None:
            _end_failed(self._span, error)
            self._span = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _TracedUnaryCall(_TracedCall):
    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            response = yield from self._call.__await__()
        except BaseException as error:
            self._failed(error)
            raise
        self._end(grpc.StatusCode.OK, None)
        return response


class _TracedStreamCall(_TracedCall):
    __slots__ = ()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._relay()

    async def _relay(self) -> AsyncIterator[Any]:
        try:
            async for message in self._call:
                yield message
        except BaseException as error:
            self._failed(error)
            raise
        self._end(grpc.StatusCode.OK, None)

    async def read(self) -> Any:
        try:
            message = await self._call.read()
        except BaseException as error:
            self._failed(error)
            raise
        if message is grpc.aio.EOF:
            self._end(grpc.StatusCode.OK, None)
        return message

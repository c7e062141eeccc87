"""OTLP trace export with spans written straight to protobuf wire bytes.

The OTLP exporter's own encoder builds a protobuf object for every span, attribute and value
through several Python calls each: about 43 us a span here, as much as making the span itself,
and with seven spans in a cache-hit chat a third of what tracing costs (bench/chat_cpu.py
--telemetry-side-by-side). The spans Ballast makes are plain (a name, a few string and integer
attributes, a status), so this module writes them field by field, keeps the encoding of
repeated attributes (`rpc.system=grpc` on every call) and of each resource and scope, and hands
anything unusual (events, links, lists or mappings as values) to the library's own encoder.
The exporter sends these bytes as they are (its stub's request serializer is the identity), so
the exporter's channel, retries, headers, compression and timeouts are the library's, unchanged,
and the request is not parsed into the library's message type only to be serialized again.
tests/unit/kit/test_spanwire.py checks that both encoders produce the same message, and that a
collector receives it.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_key_value,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_span
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from services.kit.tracing import UNSET_STATUS, RpcSpan

_logger = logging.getLogger(__name__)

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_TIMES = struct.Struct("<BQBQ").pack  # start_time_unix_nano and end_time_unix_nano, tagged
_IDS = struct.Struct(">BBQQBBQ").pack  # trace_id (16 bytes, big-endian) and span_id, tagged
_PARENT_ID = struct.Struct(">BBQ").pack  # parent_span_id, tagged
_IDS_AND_PARENT = struct.Struct(">BBQQBBQBBQ").pack  # both, for a span without trace state
_LOW_64 = (1 << 64) - 1

# Encodings kept between exports. Attribute values and span names can be anything a caller sets
# (an id, a model name), so each cache is emptied when full rather than allowed to grow.
_CACHED_ATTRIBUTES = 4096
_CACHED_STRING_LENGTH = 256
# Resources and instrumentation scopes: a few per process.
_CACHED_GROUPS = 64

K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], key: K, encoded: V, limit: int) -> V:
    """Keeps `encoded` under `key`, emptying `cache` first when it holds `limit` entries."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = encoded
    return encoded


# SpanFlags: the exporter says whether it knows if the parent is remote (always), and whether it is.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_LOCAL_PARENT = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)
_REMOTE_PARENT = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)
_NO_STATUS = b"\x7a\x00"  # the library always sends a status, empty when unset
# The protocol's SpanKind counts from UNSPECIFIED = 0; the SDK's from INTERNAL = 0.
_KINDS = tuple(b"\x30" + bytes((kind.value + 1,)) for kind in sorted(SpanKind, key=lambda kind: kind.value))


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 as protobuf writes it: ten bytes of two's complement
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:  # two bytes: the length of most spans
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes | None:
    """AnyValue for the scalar types; None for what the library's encoder should write."""
    kind = type(value)
    if kind is str:
        return _delimited(b"\x0a", value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    return None


class _Attributes:
    """KeyValue encodings. A string or integer attribute is written once while it stays in the
    cache, keyed by key and value (exact types only: True == 1, but a bool is written
    differently); for every other value the tagged key is kept and the value written each time."""

    def __init__(self, tag: bytes) -> None:
        self._tag = tag
        self._known: dict[tuple[str, str | int], bytes] = {}
        self._keys: dict[str, bytes] = {}

    def encode(self, attributes: Mapping[str, Any]) -> bytes:
        known = self._known
        out = []
        for key, value in attributes.items():
            kind = type(value)
            if kind is str or kind is int:
                encoded = known.get((key, value))
                if encoded is None:
                    encoded = self._written(key, value)
                    # Never None for a string or an integer; long strings are not kept.
                    if encoded is not None and (kind is int or len(value) <= _CACHED_STRING_LENGTH):
                        _remember(known, (key, value), encoded, _CACHED_ATTRIBUTES)
            else:
                encoded = self._written(key, value)
            if encoded is not None:
                out.append(encoded)
        return b"".join(out)

    def _written(self, key: str, value: Any) -> bytes | None:
        any_value = _any_value(value)
        if any_value is not None:
            tagged_key = self._keys.get(key)
            if tagged_key is None:
                tagged_key = _remember(self._keys, key, _delimited(b"\x0a", key.encode()), _CACHED_ATTRIBUTES)
            return _delimited(self._tag, tagged_key + _delimited(b"\x12", any_value))
        try:
            return _delimited(self._tag, bytes(_encode_key_value(key, value).SerializeToString()))
        except Exception:
            # As the library's encoder: a value it cannot write is logged and left out.
            _logger.exception("Failed to encode key %s", key)
            return None


class SpanEncoder:
    """ExportTraceServiceRequest bytes for a batch of finished SDK spans."""

    def __init__(self) -> None:
        self._attributes = _Attributes(b"\x4a")
        self._resources: dict[Resource, bytes] = {}
        self._scopes: dict[InstrumentationScope | None, bytes] = {}
        self._names: dict[tuple[str, int], bytes] = {}  # a span's name and kind
        self._startings: dict[int, tuple[Mapping[str, Any], bytes]] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Grouped as the library groups them: by resource, then by instrumentation scope, equal
        # ones together, in the order each first appears. Equality is asked once per object (a
        # provider's spans share theirs), not per span: Resource hashes its attributes as JSON.
        grouped: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
        by_identity: dict[tuple[int, int], list[bytes]] = {}
        for span in spans:
            resource, scope = span._resource, span._instrumentation_scope
            encoded = by_identity.get((id(resource), id(scope)))
            if encoded is None:
                by_scope = grouped.get(resource)
                if by_scope is None:
                    by_scope = grouped[resource] = {}
                encoded = by_scope.get(scope or None)
                if encoded is None:
                    encoded = by_scope[scope or None] = []
                by_identity[id(resource), id(scope)] = encoded
            encoded.append(_delimited(b"\x12", self.span(span)))
        out = []
        for resource, by_scope in grouped.items():
            scope_spans = [
                _delimited(b"\x12", self._scope(scope) + b"".join(encoded) + _schema_url(scope))
                for scope, encoded in by_scope.items()
            ]
            resource_spans = self._resource(resource) + b"".join(scope_spans)
            if resource.schema_url:
                resource_spans += _delimited(b"\x1a", resource.schema_url.encode())
            out.append(_delimited(b"\x0a", resource_spans))
        return b"".join(out)

    def span(self, span: ReadableSpan) -> bytes:
        """One Span message (without its tag and length)."""
        # The private fields, not the properties: those copy the events and links into tuples
        # and wrap the attributes in a proxy whose iteration runs in Python, on every span.
        if span._events or span._links:
            return bytes(_encode_span(span).SerializeToString())
        context = span._context
        assert context is not None  # a span the SDK made always has one
        # A SpanContext is a tuple of these six (tests/unit/kit/test_rpc_spans.py checks the order):
        # unpacked, not read through its properties.
        trace_id, span_id, _, _, trace_state, _ = context
        parent = span._parent
        remote = False
        # A TraceState's truth is a Python call (Mapping.__len__): the SDK's default one, which
        # every span of a trace without state shares, is known to be empty.
        if parent is not None and trace_state is DEFAULT_TRACE_STATE:
            _, parent_id, remote, _, _, _ = parent
            high, low = trace_id >> 64, trace_id & _LOW_64
            parts = [_IDS_AND_PARENT(0x0A, 0x10, high, low, 0x12, 0x08, span_id, 0x22, 0x08, parent_id)]
        else:
            parts = [_IDS(0x0A, 0x10, trace_id >> 64, trace_id & _LOW_64, 0x12, 0x08, span_id)]
            if trace_state is not DEFAULT_TRACE_STATE and trace_state:
                state = ",".join(f"{key}={value}" for key, value in trace_state.items())
                parts.append(_delimited(b"\x1a", state.encode()))
            if parent is not None:
                _, parent_id, remote, _, _, _ = parent
                parts.append(_PARENT_ID(0x22, 0x08, parent_id))
        kind = span._kind._value_  # _value_: Enum's .value is a Python property
        named = self._names.get((span._name, kind))
        if named is None:
            named = _remember(
                self._names,
                (span._name, kind),
                _delimited(b"\x2a", span._name.encode()) + _KINDS[kind],
                _CACHED_ATTRIBUTES,
            )
        parts.append(named)
        start, end = span._start_time, span._end_time
        if start and end:
            parts.append(_TIMES(0x39, start, 0x41, end))
        else:
            parts.append(b"\x39" + _FIXED64(start) if start else b"")
            parts.append(b"\x41" + _FIXED64(end) if end else b"")
        # span.unmade_attributes() and self._starting(...), without the two calls
        if type(span) is RpcSpan and span._starting is not None and span._made is None:
            # An RpcSpan's attributes as it keeps them: nothing dropped, nothing to make.
            starting = span._starting
            known = self._startings.get(id(starting))
            parts.append(known[1] if known is not None and known[0] is starting else self._starting(starting))
            added = span._added
            if added:
                parts.append(self._attributes.encode(added))
        else:
            attributes = span._attributes
            if attributes:
                parts.append(self._attributes.encode(getattr(attributes, "_dict", attributes)))
                if isinstance(attributes, BoundedAttributes) and attributes.dropped:
                    parts.append(b"\x50" + _varint(attributes.dropped))
        events, links = span._events, span._links
        if type(events) is not tuple or type(links) is not tuple:  # an RpcSpan's are until added to
            for tag, bounded in ((b"\x60", events), (b"\x70", links)):
                if isinstance(bounded, BoundedList) and bounded.dropped:
                    parts.append(tag + _varint(bounded.dropped))
        status = span._status
        if status is UNSET_STATUS or (status.status_code is StatusCode.UNSET and not status.description):
            parts.append(_NO_STATUS)
        else:
            parts.append(_delimited(b"\x7a", _status(status)))
        parts.append(_REMOTE_PARENT if remote else _LOCAL_PARENT)
        return b"".join(parts)

    def _starting(self, starting: Mapping[str, Any]) -> bytes:
        """The encoding of a method's starting attributes, kept for the object (immutable, and
        shared by every span of the method's calls; kept with it, so its id is not reused)."""
        known = self._startings.get(id(starting))
        if known is None or known[0] is not starting:
            encoded = (starting, self._attributes.encode(starting))
            known = _remember(self._startings, id(starting), encoded, _CACHED_ATTRIBUTES)
        return known[1]

    def _resource(self, resource: Resource) -> bytes:
        encoded = self._resources.get(resource)
        if encoded is None:
            message = _encode_resource(resource).SerializeToString()
            encoded = _remember(
                self._resources, resource, _delimited(b"\x0a", bytes(message)), _CACHED_GROUPS
            )
        return encoded

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            # The library's function takes None too (an empty scope), whatever its annotation says.
            message = _encode_instrumentation_scope(scope).SerializeToString()  # type: ignore[arg-type]
            encoded = _remember(self._scopes, scope, _delimited(b"\x0a", bytes(message)), _CACHED_GROUPS)
        return encoded


def _status(status: Status) -> bytes:
    out = b""
    if status.description:
        out += _delimited(b"\x12", status.description.encode())
    if status.status_code.value:
        out += b"\x18" + _varint(status.status_code.value)
    return out


def _schema_url(scope: InstrumentationScope | None) -> bytes:
    if scope is not None and scope.schema_url:
        return _delimited(b"\x1a", scope.schema_url.encode())
    return b""


_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _EncodedTraceService:
    """The library's TraceServiceStub, for requests already encoded: Export sends bytes as they
    are (no request serializer) and reads the collector's reply as the stub does."""

    def __init__(self, channel: grpc.Channel) -> None:
        # _registered_method as the generated stub passes it: gRPC registers the method once.
        unary_unary: Any = channel.unary_unary
        self.Export: grpc.UnaryUnaryMultiCallable[bytes, ExportTraceServiceResponse] = unary_unary(
            _EXPORT,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
            _registered_method=True,
        )


class WireSpanExporter(OTLPSpanExporter):
    """OTLPSpanExporter with SpanEncoder in place of the library's per-object encoder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = SpanEncoder()
        # The library makes its client from `_stub` on this channel, and again on the new
        # channel whenever it reconnects.
        self._stub = _EncodedTraceService
        self._client = _EncodedTraceService(cast(grpc.Channel, self._channel))  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        return self._encoder.encode(data)


class QueuingSpanProcessor(BatchSpanProcessor):
    """The SDK's BatchSpanProcessor (its queue, worker thread, batches, limits and OTEL_BSP_*
    settings), with a shorter path from a span's end into the queue: the SDK's on_end reads three
    properties to find the sampled flag and its emit asks the kernel for the process id on every
    span, to notice a fork that its os.register_at_fork hook already handles. Here a sampled span
    goes straight into the queue while the processor runs, the queue has room and the process is
    the one that made it; anything else (shut down, a full queue that drops and counts, a forked
    child before its hook ran) is the SDK's own emit."""

    def on_end(self, span: ReadableSpan) -> None:
        context = span._context
        if context is None or not context[3] & TraceFlags.SAMPLED:  # context.trace_flags
            return
        batch = self._batch_processor
        queue = batch._queue
        if batch._shutdown or len(queue) >= batch._max_queue_size or batch._pid != _process_id:
            batch.emit(span)
            return
        queue.appendleft(span)  # the SDK's order: the worker takes the oldest from the right
        if len(queue) >= batch._max_export_batch_size and not batch._worker_awaken.is_set():
            batch._worker_awaken.set()


_process_id = os.getpid()


def _forked() -> None:
    global _process_id
    _process_id = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

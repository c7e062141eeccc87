"""Property-based bad input: random, malformed, oversized and boundary-value messages for every
RPC of every service, with junk metadata (`-bin` values that are not UTF-8, malformed
credentials and trace headers) and JSON nested far past the parser's recursion limit. None may
answer INTERNAL or UNKNOWN, or take a service down.

Messages are generated from the proto descriptors (so new fields are covered without editing
this test), with values biased to the edges: empty and huge strings, control characters,
invalid JSON, negative and huge numbers, NaN and infinities, unknown enum values.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from ballast.cache.v1 import cache_pb2
from ballast.edge.v1 import edge_pb2
from ballast.limiter.v1 import limiter_pb2
from ballast.router.v1 import router_pb2
from ballast.sessions.v1 import sessions_pb2
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.kit.config import SERVICE_NAMES
from services.testing import Suite, start_suite
from tests.support.suite_config import ADMIN_KEY, write_test_config
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES_PER_RPC = 25
# What the edge's callers send: a valid key (so the request reaches validation), the admin key.
METADATA: tuple[tuple[str, str | bytes], ...] = (
    ("authorization", "Bearer bk_demo_paid"),
    ("x-admin-key", ADMIN_KEY),
)
FD = descriptor.FieldDescriptor

# JSON nested from a few levels to far past Python's parser (which gives up near 1000).
NESTED_JSON = st.tuples(st.integers(1, 6000), st.sampled_from(["[", '{"a":'])).map(
    lambda shape: '{"x":' + shape[1] * shape[0] + "1" + ("]" if shape[1] == "[" else "}") * shape[0] + "}"
)
STRINGS = st.one_of(
    NESTED_JSON,
    st.sampled_from(
        ["", " ", "{", "{}", "[]", "null", "default", "free", "paid", "sim-small", "budget", "auto"]
    ),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda s: s * 2000),
    st.sampled_from(
        ["\x00", "a\u202eb", "😀" * 100, "../../etc/passwd", "%s%n", "'; DROP TABLE sessions;--"]
    ),
)
INTS = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**62, -(2**62)]), st.integers(-1000, 10**6))
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308]), st.floats())


def message_strategy(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(desc)
    fields = [
        f for f in desc.fields if not (f.message_type and f.message_type.GetOptions().map_entry and depth > 2)
    ]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        chosen_oneofs: dict[str, str] = {}
        for oneof in desc.oneofs:
            names = [f.name for f in oneof.fields]
            use_oneof: bool = draw(st.booleans())
            if names and use_oneof:
                chosen_oneofs[oneof.name] = draw(st.sampled_from(names))
        for field in fields:
            if (
                field.containing_oneof is not None
                and chosen_oneofs.get(field.containing_oneof.name) != field.name
            ):
                continue
            if field.containing_oneof is None and not draw(st.booleans()):
                continue
            _fill(draw, msg, field, depth)
        return msg

    return build()


def _scalar(draw: st.DrawFn, field: descriptor.FieldDescriptor) -> Any:
    if field.type in (FD.TYPE_STRING,):
        return draw(STRINGS)
    if field.type == FD.TYPE_BYTES:
        return draw(st.binary(max_size=64))
    if field.type == FD.TYPE_BOOL:
        return draw(st.booleans())
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        value = draw(FLOATS)
        return (
            value if field.type == FD.TYPE_DOUBLE or not math.isfinite(value) or abs(value) < 3e38 else 3e38
        )
    if field.type == FD.TYPE_ENUM:
        assert field.enum_type is not None
        return draw(
            st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 99))
        )
    if field.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return draw(st.integers(0, 2**32 - 1))
    if field.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return draw(st.integers(0, 2**63))
    if field.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return draw(st.integers(-(2**31), 2**31 - 1))
    return draw(INTS)


def _fill(draw: st.DrawFn, msg: Message, field: descriptor.FieldDescriptor, depth: int) -> None:
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field, value_field = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        for _ in range(draw(st.integers(0, 2))):
            key = _scalar(draw, key_field)
            if value_field.message_type is not None:
                target[key].CopyFrom(draw(message_strategy(value_field.message_type, depth + 1)))
            else:
                target[key] = _scalar(draw, value_field)
        return
    if field.is_repeated:
        count = draw(st.integers(0, 3))
        for _ in range(count):
            if field.message_type is not None:
                if depth < 3:
                    target.add().CopyFrom(draw(message_strategy(field.message_type, depth + 1)))
            else:
                target.append(_scalar(draw, field))
        return
    if field.message_type is not None:
        if depth < 3:
            target.CopyFrom(draw(message_strategy(field.message_type, depth + 1)))
        return
    setattr(msg, field.name, _scalar(draw, field))


# Metadata as any client may send it: text values must be visible ASCII (the client library
# enforces that), `-bin` values are arbitrary bytes (not necessarily UTF-8).
_TEXT_KEYS = [
    "authorization",
    "x-api-key",
    "x-admin-key",
    "x-request-id",
    "traceparent",
    "tracestate",
    "baggage",
]
_BIN_KEYS = ["x-api-key-bin", "authorization-bin", "x-admin-key-bin", "x-request-id-bin", "x-junk-bin"]
METADATA_ITEMS = st.one_of(
    st.tuples(
        st.sampled_from(_TEXT_KEYS),
        st.one_of(
            st.sampled_from(["", "Bearer", "Bearer ", "bearer bk_", "Basic Zm9vOmJhcg==", "00-" + "0" * 32]),
            st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
        ),
    ),
    st.tuples(st.sampled_from(_BIN_KEYS), st.binary(max_size=64)),
)
# Junk before the caller's valid credentials, or junk alone.
METADATA_SETS = st.tuples(st.lists(METADATA_ITEMS, max_size=4), st.booleans()).map(
    lambda drawn: (*drawn[0], *(METADATA if drawn[1] else ()))
)


def examples(desc: descriptor.Descriptor, count: int) -> list[Message]:
    """Deterministic examples drawn by Hypothesis (derandomized: the same on every run)."""
    out: list[Message] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(message_strategy(desc))
    def collect(message: Message) -> None:
        out.append(message)

    collect()
    return out


def metadata_examples(count: int) -> list[tuple[tuple[str, str | bytes], ...]]:
    """Deterministic metadata sets; every other one keeps only the caller's valid credentials, so
    requests still reach validation."""
    out: list[tuple[tuple[str, str | bytes], ...]] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(METADATA_SETS)
    def collect(metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        out.append(metadata)

    collect()
    out += [METADATA] * max(0, count - len(out))
    return [METADATA if index % 2 else out[index] for index in range(count)]


SERVICES = [
    ("edge", edge_pb2.DESCRIPTOR.services_by_name["EdgeService"]),
    ("edge", edge_pb2.DESCRIPTOR.services_by_name["EdgeAdminService"]),
    ("router", router_pb2.DESCRIPTOR.services_by_name["RouterService"]),
    ("limiter", limiter_pb2.DESCRIPTOR.services_by_name["LimiterService"]),
    ("cache", cache_pb2.DESCRIPTOR.services_by_name["CacheService"]),
    ("sessions", sessions_pb2.DESCRIPTOR.services_by_name["SessionsService"]),
]
METHODS = [(name, svc, method) for name, svc in SERVICES for method in svc.methods]
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(tmp_path_factory: Any) -> AsyncIterator[Suite]:
    environ = write_test_config(Path(tmp_path_factory.mktemp("fuzz")))
    running = await start_suite(
        SERVICE_NAMES, {**environ, "BALLAST_MAX_MESSAGE_BYTES": str(16 * 1024 * 1024)}
    )
    yield running
    await running.stop(grace=0)  # nothing is asserted after the tests: no drain


@pytest.mark.parametrize(
    ("service", "method"),
    [(name, method) for name, _, method in METHODS],
    ids=[f"{svc.name}.{method.name}" for _, svc, method in METHODS],
)
async def test_no_input_yields_internal_or_takes_a_service_down(
    suite: Suite, service: str, method: descriptor.MethodDescriptor
) -> None:
    channel = suite.channel(service)
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    unexpected: list[str] = []
    requests = examples(method.input_type, EXAMPLES_PER_RPC)
    for request, metadata in zip(requests, metadata_examples(len(requests)), strict=True):
        assert isinstance(request, request_cls)
        try:
            if method.server_streaming:
                stream = channel.unary_stream(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                async for _ in stream(request, metadata=metadata, timeout=20):
                    pass
            else:
                unary = channel.unary_unary(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                await unary(request, metadata=metadata, timeout=20)
        except grpc.aio.AioRpcError as error:
            if error.code() in NEVER or (
                error.code() == grpc.StatusCode.INVALID_ARGUMENT and not error.details()
            ):
                unexpected.append(
                    f"{error.code().name}: {error.details()} <- {str(request)[:300]!r} {metadata!r:.200}"
                )
    assert not unexpected, "\n".join(unexpected[:5])

    async def serving() -> bool:
        # The cache reports NOT_SERVING until its embedding model has loaded.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return bool(health.status == health_pb2.HealthCheckResponse.SERVING)

    await eventually(serving, what=f"{service} still SERVING")

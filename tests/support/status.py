"""What a gRPC error's `google.rpc` details say, for tests that check a client can act on them."""

from __future__ import annotations

from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Every field the error's BadRequest details name, in order (none without such a detail)."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None, f"no status details in {error.details()!r}"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [violation.field for violation in bad.field_violations]
    return fields


def violated_field(error: grpc.aio.AioRpcError) -> str:
    """The first field the error's BadRequest names; fails when it carries no BadRequest."""
    fields = violated_fields(error)
    if not fields:
        raise AssertionError(f"no BadRequest in {error.details()!r}")
    return fields[0]

"""The edge's trust boundary through gRPC: webhooks that would reach inside are refused at
submit time, jobs belong to their user, and malformed input gets a named error."""

from __future__ import annotations

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import SuiteFactory
from tests.support.http_receiver import HttpReceiver
from tests.unit.edge.test_webhooks import INTERNAL_URLS

KEY = (("authorization", "Bearer bk_demo_paid"),)


def _chat(text: str = "hi") -> edge_pb2.ChatRequest:
    return edge_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)])


def _violated_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, error.details()
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            field: str = bad.field_violations[0].field
            return field
    raise AssertionError(f"no BadRequest in {error.details()!r}")


async def test_internal_webhook_urls_are_refused_at_submit(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_WORKERS": "0"})
    for url in INTERNAL_URLS:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.edge.SubmitChat(
                edge_pb2.SubmitChatRequest(chat=_chat(), webhook_url=url), metadata=KEY
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (url, info.value.details())
        assert _violated_field(info.value) == "webhook_url", url


async def test_an_allowed_internal_target_is_accepted(suite_factory: SuiteFactory) -> None:
    receiver = HttpReceiver()
    await receiver.start()
    try:
        closed = await suite_factory(["edge"], {"BALLAST_EDGE_WORKERS": "0"})
        with pytest.raises(grpc.aio.AioRpcError):
            await closed.edge.SubmitChat(
                edge_pb2.SubmitChatRequest(chat=_chat(), webhook_url=receiver.url), metadata=KEY
            )
        opened = await suite_factory(
            ["edge"], {"BALLAST_EDGE_WORKERS": "0", "BALLAST_EDGE_WEBHOOK_ALLOWED": "127.0.0.1/32"}
        )
        submitted = await opened.edge.SubmitChat(
            edge_pb2.SubmitChatRequest(chat=_chat(), webhook_url=receiver.url), metadata=KEY
        )
        assert submitted.job.state == edge_pb2.JOB_STATE_QUEUED
    finally:
        await receiver.close()

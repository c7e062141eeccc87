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
from tests.support.status import violated_field
from tests.unit.edge.test_webhooks import INTERNAL_URLS

KEY = (("authorization", "Bearer bk_demo_paid"),)


def _chat(text: str = "hi") -> edge_pb2.ChatRequest:
    return edge_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)])


async def test_internal_webhook_urls_are_refused_at_submit(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_WORKERS": "0"})
    for url in INTERNAL_URLS:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.edge.SubmitChat(
                edge_pb2.SubmitChatRequest(chat=_chat(), webhook_url=url), metadata=KEY
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (url, info.value.details())
        assert violated_field(info.value) == "webhook_url", url


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


async def test_a_job_belongs_to_its_user(suite_factory: SuiteFactory) -> None:
    admin = "admin-" + "x" * 16
    suite = await suite_factory(["edge"], {"BALLAST_EDGE_WORKERS": "0", "BALLAST_EDGE_ADMIN_KEY": admin})

    async def key(tenant: str, user: str) -> tuple[tuple[str, str], ...]:
        created = await suite.edge_admin.CreateApiKey(
            edge_pb2.CreateApiKeyRequest(tenant_id=tenant, user_id=user, tier="paid"),
            metadata=(("x-admin-key", admin),),
        )
        return (("authorization", f"Bearer {created.api_key}"),)

    alice, alice_again = await key("acme", "alice"), await key("acme", "alice")
    bob, eve = await key("acme", "bob"), await key("globex", "alice")
    submit = edge_pb2.SubmitChatRequest(chat=_chat("private question"), idempotency_key="order-42")
    job = (await suite.edge.SubmitChat(submit, metadata=alice)).job
    for other in (bob, eve):
        for call in (
            suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job.job_id), metadata=other),
            suite.edge.CancelJob(edge_pb2.CancelJobRequest(job_id=job.job_id), metadata=other),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # The same idempotency key from another user is another job, never alice's.
        theirs = (await suite.edge.SubmitChat(submit, metadata=other)).job
        assert theirs.job_id != job.job_id
    # Alice (with any of her keys) still sees, retries and cancels her own job.
    assert (await suite.edge.SubmitChat(submit, metadata=alice_again)).job.job_id == job.job_id
    got = await suite.edge.GetJob(edge_pb2.GetJobRequest(job_id=job.job_id), metadata=alice_again)
    assert got.job.state == edge_pb2.JOB_STATE_QUEUED
    cancelled = await suite.edge.CancelJob(edge_pb2.CancelJobRequest(job_id=job.job_id), metadata=alice)
    assert cancelled.job.state == edge_pb2.JOB_STATE_CANCELLED


async def test_a_cap_on_queued_jobs_is_resource_exhausted_naming_it(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(
        ["edge"],
        {
            "BALLAST_EDGE_WORKERS": "0",
            "BALLAST_EDGE_TIER_MAX_QUEUED": "free=2",
            "BALLAST_EDGE_MAX_QUEUED_PER_TENANT": "3",
        },
    )
    free = (("authorization", "Bearer bk_demo_free"),)
    paid = (("authorization", "Bearer bk_demo_paid"),)
    globex = (("authorization", "Bearer bk_demo_globex"),)
    for _ in range(2):
        await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=_chat()), metadata=free)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=_chat()), metadata=free)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "free tier" in (info.value.details() or "") and "BALLAST_EDGE_TIER_MAX_QUEUED" in (
        info.value.details() or ""
    )
    # Another user of the tenant (paid) fits under the tenant's cap of 3, then the tenant is full.
    await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=_chat()), metadata=paid)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=_chat()), metadata=paid)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "BALLAST_EDGE_MAX_QUEUED_PER_TENANT" in (info.value.details() or "")
    status = rpc_status.from_call(info.value)
    assert status is not None
    reasons = []
    for detail in status.details:
        error_info = error_details_pb2.ErrorInfo()
        if detail.Unpack(error_info):
            reasons.append(error_info.reason)
    assert reasons == ["edge_jobs_queued_per_tenant"]
    # Another tenant is not affected.
    await suite.edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=_chat()), metadata=globex)

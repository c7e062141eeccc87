"""Webhook delivery: signed with HMAC, retried with backoff on failures, recorded."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from opentelemetry import trace

from services.edge.config import EdgeSettings
from services.edge.edge import ChatPipeline
from services.edge.jobs import JobRunner, sign, verify
from services.edge.store import SUCCEEDED, JobRecord
from services.edge.store.memory import MemoryEdgeStore
from services.kit.config import Env
from tests.support.http_receiver import HttpReceiver

SECRET = "whsec_test"


@pytest.fixture
async def receiver() -> AsyncIterator[HttpReceiver]:
    server = HttpReceiver()
    await server.start()
    yield server
    await server.close()


def _runner(store: MemoryEdgeStore, attempts: int = 6) -> JobRunner:
    settings = replace(
        EdgeSettings.from_env(Env({})), webhook_secret=SECRET, webhook_backoff=0.01, webhook_attempts=attempts
    )
    return JobRunner(settings, store, ChatPipeline.__new__(ChatPipeline), trace.NoOpTracer())


def _job(url: str) -> JobRecord:
    return JobRecord(
        job_id="job_1",
        tenant_id="acme",
        user_id="u",
        priority="normal",
        request=b"",
        caller=b"",
        state=SUCCEEDED,
        created_at=time.time(),
        finished_at=time.time(),
        webhook_url=url,
        webhook_state="pending",
    )


def test_signature_verifies_and_rejects_tampering() -> None:
    stamp = str(int(time.time()))
    signature = sign(SECRET, stamp, b'{"a":1}')
    assert signature.startswith("v1=")
    assert verify(SECRET, stamp, b'{"a":1}', signature)
    assert not verify(SECRET, stamp, b'{"a":2}', signature)
    assert not verify("other", stamp, b'{"a":1}', signature)
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, old, b'{"a":1}', sign(SECRET, old, b'{"a":1}'))


async def test_delivery_is_retried_until_it_succeeds(receiver: HttpReceiver) -> None:
    receiver.responses = [500, 503, 200]
    store = MemoryEdgeStore()
    job = _job(receiver.url)
    await store.submit(job, "")
    runner = _runner(store)
    try:
        assert await runner.deliver(job) is True
    finally:
        await runner.stop()
    assert len(receiver.received) == 3
    last = receiver.received[-1]
    assert last.method == "POST" and last.headers["x-ballast-delivery-attempt"] == "3"
    assert verify(SECRET, last.headers["x-ballast-timestamp"], last.body, last.headers["x-ballast-signature"])
    payload = json.loads(last.body)
    assert payload["job_id"] == "job_1" and payload["state"] == "JOB_STATE_SUCCEEDED"
    stored = await store.get_job("job_1")
    assert stored is not None and stored.webhook_state == "delivered"


async def test_a_client_error_is_not_retried_and_is_recorded(receiver: HttpReceiver) -> None:
    receiver.responses = [410]
    store = MemoryEdgeStore()
    job = _job(receiver.url)
    await store.submit(job, "")
    runner = _runner(store)
    try:
        assert await runner.deliver(job) is False
    finally:
        await runner.stop()
    assert len(receiver.received) == 1
    stored = await store.get_job("job_1")
    assert stored is not None and stored.webhook_state == "failed"


async def test_attempts_are_bounded(receiver: HttpReceiver) -> None:
    receiver.responses = [503]
    store = MemoryEdgeStore()
    job = _job(receiver.url)
    await store.submit(job, "")
    runner = _runner(store, attempts=4)
    try:
        assert await runner.deliver(job) is False
    finally:
        await runner.stop()
    assert len(receiver.received) == 4

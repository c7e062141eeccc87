"""Webhook delivery: signed with HMAC, retried with backoff on failures, recorded."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.edge.auth import KeysFileError
from services.edge.config import EdgeSettings
from services.edge.edge import ChatPipeline
from services.edge.jobs import JobRunner, sign, verify
from services.edge.metrics import EdgeMetrics
from services.edge.store import SUCCEEDED, JobRecord
from services.edge.store.memory import MemoryEdgeStore
from services.edge.webhooks import (
    IPAddress,
    Resolver,
    WebhookPolicy,
    WebhookSecrets,
    load_tenant_secrets,
)
from services.kit.config import Env
from services.kit.errors import InvalidArgument
from tests.support.http_receiver import HttpReceiver

SECRET = "whsec_test"


@pytest.fixture
async def receiver() -> AsyncIterator[HttpReceiver]:
    server = HttpReceiver()
    await server.start()
    yield server
    await server.close()


def _runner(
    store: MemoryEdgeStore,
    attempts: int = 6,
    *,
    allowed: tuple[str, ...] = ("127.0.0.1/32",),
    resolver: Resolver | None = None,
    secrets: WebhookSecrets | None = None,
    metrics: EdgeMetrics | None = None,
) -> JobRunner:
    settings = replace(
        EdgeSettings.from_env(Env({})),
        webhook_secret=SECRET,
        webhook_backoff=0.01,
        webhook_attempts=attempts,
        webhook_allowed=allowed,
    )
    policy = WebhookPolicy(allowed, resolver=resolver) if resolver is not None else None
    return JobRunner(
        settings,
        store,
        ChatPipeline.__new__(ChatPipeline),
        trace.NoOpTracer(),
        metrics,
        webhooks=policy,
        webhook_secrets=secrets,
    )


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


async def _deliver(receiver: HttpReceiver, statuses: list[int], attempts: int = 6) -> tuple[bool, str]:
    """One job's webhook delivered to a receiver answering `statuses` (the last repeats):
    whether it was delivered, and what the job's record says of it."""
    receiver.responses = statuses
    store = MemoryEdgeStore()
    job = _job(receiver.url)
    await store.submit(job, "")
    runner = _runner(store, attempts)
    try:
        delivered = await runner.deliver(job)
    finally:
        await runner.stop()
    stored = await store.get_job(job.job_id)
    assert stored is not None
    return delivered, stored.webhook_state


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
    assert await _deliver(receiver, [500, 503, 200]) == (True, "delivered")
    assert len(receiver.received) == 3
    # One delivery id on every attempt, so the receiver can drop the repeats.
    ids = {hook.headers["x-ballast-delivery-id"] for hook in receiver.received}
    assert len(ids) == 1 and ids.pop().startswith("dlv_")
    last = receiver.received[-1]
    assert last.method == "POST" and last.headers["x-ballast-delivery-attempt"] == "3"
    assert verify(SECRET, last.headers["x-ballast-timestamp"], last.body, last.headers["x-ballast-signature"])
    payload = json.loads(last.body)
    assert payload["job_id"] == "job_1" and payload["state"] == "JOB_STATE_SUCCEEDED"


@pytest.mark.parametrize("status", [410, 302], ids=["client-error", "redirect"])
async def test_a_client_error_or_a_redirect_is_not_retried_nor_followed(
    receiver: HttpReceiver, status: int
) -> None:
    assert await _deliver(receiver, [status]) == (False, "failed")
    assert len(receiver.received) == 1


async def test_attempts_are_bounded(receiver: HttpReceiver) -> None:
    assert await _deliver(receiver, [503], attempts=4) == (False, "failed")
    assert len(receiver.received) == 4


async def test_a_tenant_with_its_own_secret_signs_with_it(receiver: HttpReceiver) -> None:
    tenant_secret = "whsec_acme_own_secret"
    store = MemoryEdgeStore()
    job = _job(receiver.url)
    other = replace(_job(receiver.url), job_id="job_2", tenant_id="globex")
    await store.submit(job, "")
    await store.submit(other, "")
    runner = _runner(store, secrets=WebhookSecrets(SECRET, {"acme": tenant_secret}))
    try:
        assert await runner.deliver(job) is True
        assert await runner.deliver(other) is True
    finally:
        await runner.stop()
    acme, globex = receiver.received
    stamp, signature = acme.headers["x-ballast-timestamp"], acme.headers["x-ballast-signature"]
    assert verify(tenant_secret, stamp, acme.body, signature)
    assert not verify(SECRET, stamp, acme.body, signature)
    # A tenant without its own secret uses the global one.
    assert verify(
        SECRET, globex.headers["x-ballast-timestamp"], globex.body, globex.headers["x-ballast-signature"]
    )
    assert acme.headers["x-ballast-delivery-id"] != globex.headers["x-ballast-delivery-id"]


async def test_unsigned_webhooks_are_warned_about(
    receiver: HttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryEdgeStore()
    job = _job(receiver.url)
    await store.submit(job, "")
    runner = _runner(store, secrets=WebhookSecrets(""))
    caplog.set_level(logging.WARNING, "ballast.edge.webhooks")
    try:
        assert await runner.deliver(job) is True
    finally:
        await runner.stop()
    assert "x-ballast-signature" not in receiver.received[0].headers
    assert any(
        "unsigned" in record.getMessage() and "acme" in record.getMessage() for record in caplog.records
    )


# --- metrics ----------------------------------------------------------------------------------------


class _Meters:
    """EdgeMetrics on an in-memory reader: what the edge would export."""

    def __init__(self, store: MemoryEdgeStore, max_tenants: int = 1000) -> None:
        self.reader = InMemoryMetricReader()
        meter = MeterProvider(metric_readers=[self.reader]).get_meter("test")
        self.metrics = EdgeMetrics(meter, store, per_user=False, sample_every=60, max_tenants=max_tenants)

    def points(self, name: str) -> list[tuple[dict[str, object], object]]:
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, object], object]] = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        return found

    def attempts(self) -> dict[tuple[object, object], object]:
        return {
            (labels["tenant"], labels["outcome"]): point.value  # type: ignore[attr-defined]
            for labels, point in self.points("ballast.edge.webhook.attempts")
        }

    def durations(self) -> dict[object, int]:
        return {
            labels["outcome"]: point.count  # type: ignore[attr-defined]
            for labels, point in self.points("ballast.edge.webhook.delivery.duration")
        }


async def test_deliveries_are_counted_by_outcome_and_timed(receiver: HttpReceiver) -> None:
    receiver.responses = [503, 500, 200, 410]
    store = MemoryEdgeStore()
    meters = _Meters(store)
    delivered, failed = _job(receiver.url), replace(_job(receiver.url), job_id="job_2", tenant_id="globex")
    await store.submit(delivered, "")
    await store.submit(failed, "")
    runner = _runner(store, metrics=meters.metrics)
    try:
        assert await runner.deliver(delivered) is True
        assert await runner.deliver(failed) is False
    finally:
        await runner.stop()
    assert meters.attempts() == {("acme", "retried"): 2, ("acme", "delivered"): 1, ("globex", "failed"): 1}
    assert meters.durations() == {"delivered": 1, "failed": 1}
    (pending,) = meters.points("ballast.edge.webhook.pending")
    assert pending[1].value == 0  # type: ignore[attr-defined]


async def test_a_delivery_out_of_attempts_and_one_refused_at_delivery_are_counted(
    receiver: HttpReceiver,
) -> None:
    receiver.responses = [503]
    store = MemoryEdgeStore()
    meters = _Meters(store)
    job = _job(receiver.url)
    await store.submit(job, "")
    runner = _runner(store, attempts=3, metrics=meters.metrics)
    rebound = replace(_job(f"http://rebind.example:{receiver.port}/hook"), job_id="job_2")
    await store.submit(rebound, "")
    rebinding = _runner(
        store, allowed=(), resolver=_resolving(["93.184.216.34"], ["127.0.0.1"]), metrics=meters.metrics
    )
    try:
        assert await runner.deliver(job) is False
        await rebinding.vet_webhook(rebound.webhook_url)
        assert await rebinding.deliver(rebound) is False
    finally:
        await runner.stop()
        await rebinding.stop()
    assert meters.attempts() == {("acme", "retried"): 2, ("acme", "failed"): 1, ("acme", "refused"): 1}
    assert meters.durations() == {"failed": 1, "refused": 1}


async def test_webhook_tenants_past_the_bound_share_one_label(receiver: HttpReceiver) -> None:
    store = MemoryEdgeStore()
    meters = _Meters(store, max_tenants=2)
    runner = _runner(store, metrics=meters.metrics)
    try:
        for index, tenant in enumerate(("t1", "t2", "t3", "t4", "t1")):
            job = replace(_job(receiver.url), job_id=f"job_{index}", tenant_id=tenant)
            await store.submit(job, "")
            assert await runner.deliver(job) is True
    finally:
        await runner.stop()
    assert meters.attempts() == {
        ("t1", "delivered"): 2,
        ("t2", "delivered"): 1,
        ("(other)", "delivered"): 2,
    }


# --- webhooks cannot reach inside ---------------------------------------------------------------------

# Each of these names an internal address (or hides one); all must be refused.
INTERNAL_URLS = [
    "http://127.0.0.1:6379/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8080/hook",
    "http://localhost:8080/hook",
    "http://localhost./hook",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://0x7f.0.0.1/",
    "http://0x7f000001/",
    "http://017700000001/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://198.18.0.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[ff02::1]/",
    "http://[::]/",
    "http://[2002:7f00:1::1]/",
    "https://user:pass@example.com/hook",
    "https://user@example.com/hook",
    "ftp://example.com/",
    "http:///hook",
    "http://exa mple.com/",
]

# What a name may resolve to at delivery time after resolving to a public address when vetted.
INTERNAL_ADDRESSES = [
    "127.0.0.1",
    "10.0.0.5",
    "172.20.1.1",
    "192.168.0.10",
    "169.254.169.254",
    "100.100.100.200",
    "0.0.0.0",
    "224.0.0.251",
    "240.1.1.1",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::7f00:1",
    "fe80::1",
    "fd00::1",
    "ff02::1",
]


def _resolving(*answers: list[str]) -> Resolver:
    """A resolver that gives each answer in turn (the last repeats), as rebinding DNS would."""
    calls = 0

    async def resolve(host: str, port: int) -> list[IPAddress]:
        nonlocal calls
        answer = answers[min(calls, len(answers) - 1)]
        calls += 1
        return [ipaddress.ip_address(a) for a in answer]

    return resolve


@pytest.mark.parametrize("url", INTERNAL_URLS)
async def test_internal_webhook_urls_are_refused(url: str) -> None:
    policy = WebhookPolicy(resolver=_resolving(["127.0.0.1"]))
    with pytest.raises(InvalidArgument) as info:
        await policy.vet(url)
    assert info.value.field == "webhook_url"


async def test_a_name_with_one_internal_address_among_public_ones_is_refused() -> None:
    policy = WebhookPolicy(resolver=_resolving(["93.184.216.34", "10.0.0.1"]))
    with pytest.raises(InvalidArgument, match=r"10\.0\.0\.1"):
        await policy.vet("https://hooks.example.com/x")


async def test_public_addresses_pass_and_are_pinned() -> None:
    policy = WebhookPolicy(resolver=_resolving(["93.184.216.34"]))
    target = await policy.vet("https://Hooks.Example.com:8443/in?x=1")
    assert target.connect_url == "https://93.184.216.34:8443/in?x=1"
    assert target.host_header == "hooks.example.com:8443" and target.host == "hooks.example.com"
    for url in ("http://8.8.8.8/", "http://[2606:4700:4700::1111]/", "http://[64:ff9b::808:808]/"):
        assert (await policy.vet(url)).address


async def test_allowed_cidrs_and_names_open_internal_targets() -> None:
    policy = WebhookPolicy(["10.0.0.0/8", "hooks.internal"], resolver=_resolving(["192.168.1.9"]))
    assert str((await policy.vet("http://10.2.3.4/")).address) == "10.2.3.4"
    assert str((await policy.vet("http://[::ffff:10.2.3.4]/")).address) == "::ffff:a02:304"
    assert str((await policy.vet("http://hooks.internal/x")).address) == "192.168.1.9"
    with pytest.raises(InvalidArgument):
        await policy.vet("http://other.internal/x")
    with pytest.raises(InvalidArgument):
        await policy.vet("http://127.0.0.1/")


async def test_a_host_that_does_not_resolve_is_refused() -> None:
    async def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(InvalidArgument, match="does not resolve"):
        await WebhookPolicy(resolver=nxdomain).vet("https://nowhere.example/")


@pytest.mark.parametrize("address", INTERNAL_ADDRESSES)
async def test_a_name_that_turns_internal_by_delivery_is_not_called(
    receiver: HttpReceiver, address: str
) -> None:
    """DNS rebinding: public when the job was submitted, internal when it is delivered."""
    store = MemoryEdgeStore()
    url = f"http://rebind.example:{receiver.port}/hook"
    job = _job(url)
    await store.submit(job, "")
    runner = _runner(store, allowed=(), resolver=_resolving(["93.184.216.34"], [address]))
    try:
        await runner.vet_webhook(url)  # what SubmitChat does: public at this moment
        assert await runner.deliver(job) is False
    finally:
        await runner.stop()
    assert receiver.received == []
    stored = await store.get_job("job_1")
    assert stored is not None and stored.webhook_state == "failed"


@pytest.mark.parametrize("url", INTERNAL_URLS)
async def test_internal_urls_that_reached_the_store_are_not_delivered(url: str) -> None:
    """Jobs accepted before this check existed (or by a misconfigured replica) are vetted again."""
    store = MemoryEdgeStore()
    job = _job(url)
    await store.submit(job, "")
    runner = _runner(store, allowed=(), resolver=_resolving(["127.0.0.1"]))
    try:
        assert await runner.deliver(job) is False
    finally:
        await runner.stop()
    stored = await store.get_job("job_1")
    assert stored is not None and stored.webhook_state == "failed"


async def test_delivery_connects_to_the_vetted_address_with_the_original_host(receiver: HttpReceiver) -> None:
    # `receiver.test` exists only in the injected resolver: the delivery can only arrive if it
    # connected to the address the policy vetted instead of resolving the name again.
    store = MemoryEdgeStore()
    url = f"http://receiver.test:{receiver.port}/hook?x=1"
    job = _job(url)
    await store.submit(job, "")
    runner = _runner(store, allowed=("receiver.test",), resolver=_resolving(["127.0.0.1"]))
    try:
        assert await runner.deliver(job) is True
    finally:
        await runner.stop()
    (hook,) = receiver.received
    assert hook.headers["host"] == f"receiver.test:{receiver.port}" and hook.path == "/hook?x=1"


def test_tenant_secrets_come_from_the_keys_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "acme.secret"
    secret_file.write_text("whsec_from_a_mounted_file\n")
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [],
                "tenants": {
                    "acme": {"webhook_secret_file": str(secret_file)},
                    "globex": {"webhook_secret": "whsec_globex_inline_1"},
                    "initech": {},
                },
            }
        )
    )
    assert load_tenant_secrets(keys) == {
        "acme": "whsec_from_a_mounted_file",
        "globex": "whsec_globex_inline_1",
    }
    assert load_tenant_secrets(tmp_path / "missing.yaml") == {}
    keys.write_text(yaml.safe_dump({"tenants": {"acme": {"webhook_secret": "short"}}}))
    with pytest.raises(KeysFileError, match=r"keys.yaml:3: tenants\.acme: the webhook secret must be"):
        load_tenant_secrets(keys)
    keys.write_text(yaml.safe_dump({"tenants": {"acme": {"webhook_secret_file": str(tmp_path / "nope")}}}))
    with pytest.raises(KeysFileError, match=r"keys.yaml:3: tenants\.acme\.webhook_secret_file: No such file"):
        load_tenant_secrets(keys)


def test_allowed_targets_are_validated_at_start_up() -> None:
    settings = EdgeSettings.from_env(Env({"BALLAST_EDGE_WEBHOOK_ALLOWED": "10.0.0.0/8, hooks.internal"}))
    assert settings.webhook_allowed == ("10.0.0.0/8", "hooks.internal")
    env = Env({"BALLAST_EDGE_WEBHOOK_ALLOWED": "10.0.0.0/8,not a host!"})
    EdgeSettings.from_env(env)
    assert any("BALLAST_EDGE_WEBHOOK_ALLOWED" in problem for problem in env.problems)


async def test_a_host_that_does_not_resolve_at_delivery_is_retried(receiver: HttpReceiver) -> None:
    """A DNS blip is not a refusal: the delivery tries again (and still checks the answer)."""
    answers: list[list[str] | None] = [None, None, ["127.0.0.1"]]

    async def flaky(host: str, port: int) -> list[IPAddress]:
        answer = answers.pop(0) if answers else ["127.0.0.1"]
        if answer is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [ipaddress.ip_address(a) for a in answer]

    store = MemoryEdgeStore()
    job = _job(f"http://receiver.test:{receiver.port}/hook")
    await store.submit(job, "")
    runner = _runner(store, allowed=("127.0.0.1/32",), resolver=flaky)
    try:
        assert await runner.deliver(job) is True
    finally:
        await runner.stop()
    (hook,) = receiver.received
    assert hook.headers["x-ballast-delivery-attempt"] == "3"


async def test_https_deliveries_name_the_host_for_tls_while_connecting_to_the_vetted_address() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    store = MemoryEdgeStore()
    job = _job("https://Hooks.Example.com:8443/in?x=1")
    await store.submit(job, "")
    runner = _runner(store, allowed=(), resolver=_resolving(["93.184.216.34"]))
    runner._http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    try:
        assert await runner.deliver(job) is True
    finally:
        await runner.stop()
    (request,) = seen
    assert str(request.url) == "https://93.184.216.34:8443/in?x=1"
    assert request.headers["host"] == "hooks.example.com:8443"
    # httpcore uses this as the TLS server name, so the certificate is checked against the host.
    assert request.extensions["sni_hostname"] == "hooks.example.com"

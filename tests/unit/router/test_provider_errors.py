"""What each provider error means for routing, replayed from the providers' documented error
shapes: out of credit and refused keys take a provider out of rotation at once; a 429 without
retry-after waits for the reset header's time; callers see a summary, never the provider's body
(which may echo the key)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
from ballast.router.v1 import router_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.kit.config import Env, ServerSettings
from services.kit.errors import FailedPrecondition
from services.router.catalog import Provider, parse_catalog
from services.router.config import BreakerSettings, RetrySettings, RouterSettings
from services.router.health import HealthBook
from services.router.metrics import RouterMetrics
from services.router.model import ChatRequest, Message, Role
from services.router.providers.base import ClientOptions, Outcome, ProviderError, build_adapter
from services.router.providers.errors import http_error, redact
from services.router.router import Call, Gateway
from services.router.routing import Planner
from tests.conftest import SuiteFactory
from tests.unit.router.conftest import FAST_ENV, complete_request, write
from tests.unit.router.replay import ReplayServer, transcript
from tests.unit.router.test_adapters import Sink
from tests.unit.router.test_gateway import REQUEST, Clock, make
from tests.unit.router.test_replay import CLAUDE_SONNET, GPT_4O

R = router_pb2
OPENAI_KEY = "sk-proj-EchoedKey0123456789abcdefXYZ"
ANTHROPIC_KEY = "sk-ant-api03-EchoedKey0123456789abcdefXYZ"
ASK = ChatRequest((Message(Role.USER, "hello"),))


def provider(wire: str, url: str, key: str = "") -> Provider:
    base = f"{url}/v1" if wire == "openai" else url
    return Provider(name=wire, kind=wire, base_url=base, wire=wire, api_key=key)


async def replay_error(wire: str, name: str, **options: float) -> ProviderError:
    async with ReplayServer([transcript(name)]) as server:
        adapter = build_adapter(provider(wire, server.url), ClientOptions(**options), Sink())  # type: ignore[arg-type]
        try:
            with pytest.raises(ProviderError) as info:
                await adapter.complete(GPT_4O if wire == "openai" else CLAUDE_SONNET, ASK)
        finally:
            await adapter.aclose()
    return info.value


@pytest.mark.parametrize(
    ("wire", "name", "outcome", "category", "status"),
    [
        ("openai", "openai_error_insufficient_quota.http", Outcome.QUOTA_EXHAUSTED, "out_of_credit", 429),
        ("openai", "openai_error_invalid_key.http", Outcome.AUTH_ERROR, "authentication", 401),
        ("openai", "openai_error_rate_limit_reset.http", Outcome.RATE_LIMITED, "rate_limited", 429),
        ("anthropic", "anthropic_error_auth.http", Outcome.AUTH_ERROR, "authentication", 401),
        ("anthropic", "anthropic_error_permission.http", Outcome.AUTH_ERROR, "permission", 403),
        ("anthropic", "anthropic_error_billing.http", Outcome.QUOTA_EXHAUSTED, "out_of_credit", 402),
        ("anthropic", "anthropic_error_credit_balance.http", Outcome.QUOTA_EXHAUSTED, "out_of_credit", 400),
        ("anthropic", "anthropic_error_overloaded.http", Outcome.SERVER_ERROR, "overloaded", 529),
        ("anthropic", "anthropic_error_rate_limit_reset.http", Outcome.RATE_LIMITED, "rate_limited", 429),
    ],
)
async def test_each_error_gets_the_class_that_matches_what_it_means(
    wire: str, name: str, outcome: Outcome, category: str, status: int
) -> None:
    error = await replay_error(wire, name)
    assert (error.outcome, error.category, error.http_status) == (outcome, category, status)
    assert not error.caller_fault
    assert error.message == f"HTTP {status}: {category}"


@pytest.mark.parametrize(
    ("wire", "name"),
    [("openai", "openai_error_invalid_param.http"), ("anthropic", "anthropic_error_invalid_param.http")],
)
async def test_a_rejected_parameter_is_the_callers_fault_and_names_the_field(wire: str, name: str) -> None:
    error = await replay_error(wire, name)
    assert (error.outcome, error.caller_fault, error.field) == (Outcome.CLIENT_ERROR, True, "temperature")
    assert error.message == "HTTP 400: invalid_request (field temperature)"


async def test_a_429_without_retry_after_waits_for_the_exhausted_limits_reset() -> None:
    # OpenAI: requests are exhausted (reset 2s); tokens are not (reset 6m0s) and do not count.
    error = await replay_error("openai", "openai_error_rate_limit_reset.http")
    assert error.retry_after == pytest.approx(2.0)
    # Anthropic: RFC 3339 reset times; the exhausted request limit resets in 30 s.
    error = await replay_error("anthropic", "anthropic_error_rate_limit_reset.http")
    assert error.retry_after is not None and 25.0 < error.retry_after <= 30.0
    # ... never longer than the configured cap.
    error = await replay_error("anthropic", "anthropic_error_rate_limit_reset.http", max_reset_wait=10.0)
    assert error.retry_after == 10.0


async def test_the_gateway_waits_until_the_reset_then_succeeds() -> None:
    clock = Clock()
    catalog = parse_catalog(
        """
providers:
  openai: {kind: openai, base_url: "http://127.0.0.1:1/v1"}
models:
  gpt: {provider: openai, provider_model: gpt-4o}
aliases:
  budget: {candidates: [gpt]}
  reasoning: {candidates: [gpt]}
tier_defaults: {default: budget}
"""
    )
    async with ReplayServer(
        [transcript("openai_error_rate_limit_reset.http"), transcript("openai_chat_cached.http")]
    ) as server:
        catalog = catalog.with_provider(provider("openai", server.url))
        settings = RouterSettings(ServerSettings("router"), catalog, retry=RetrySettings(max_retry_after=5.0))
        health = HealthBook(BreakerSettings(), clock)
        gateway = Gateway(settings, Planner(catalog, health), health, {}, clock=clock, sleep=clock.sleep)
        gateway.adapters["openai"] = build_adapter(
            catalog.providers["openai"], ClientOptions(), gateway.observe("openai")
        )
        try:
            answer = await gateway.complete(Call(deadline=100.0), REQUEST)
        finally:
            await gateway.adapters["openai"].aclose()
    # Not ~50 ms of backoff: the reset time of the exhausted request limit.
    assert clock.slept == [pytest.approx(2.0)]
    assert [a.outcome for a in answer.attempts] == [Outcome.RATE_LIMITED, Outcome.OK]
    assert len(server.requests) == 2


# --- out of rotation -----------------------------------------------------------------------------


def metric_points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, object], object]]:
    data = reader.get_metrics_data()
    points: list[tuple[dict[str, object], object]] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    points += [(dict(p.attributes or {}), p.value) for p in metric.data.data_points]  # type: ignore[union-attr]
    return points


async def test_out_of_credit_fails_over_at_once_and_stays_out_until_a_probe_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway, clock, a, _ = make(RetrySettings(max_attempts=4))
    reader = InMemoryMetricReader()
    gateway.metrics = RouterMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"), gateway.health)
    quota = ProviderError(
        Outcome.QUOTA_EXHAUSTED, "HTTP 429: out_of_credit", http_status=429, category="out_of_credit"
    )
    a.script = [quota]
    with caplog.at_level(logging.ERROR, logger="ballast.router.gateway"):
        answer = await gateway.complete(Call(deadline=clock.now + 100.0), REQUEST)
    assert [(x.provider, x.outcome) for x in answer.attempts] == [
        ("a", Outcome.QUOTA_EXHAUSTED),
        ("b", Outcome.OK),
    ]
    assert clock.slept == []  # no backoff, no retry on a
    (record,) = [r for r in caplog.records if r.getMessage() == "provider out of rotation"]
    assert record.levelno == logging.ERROR
    fields = vars(record)
    assert (fields["alert"], fields["provider"], fields["reason"]) == (
        "router_provider_out_of_rotation",
        "a",
        "out_of_credit",
    )
    assert metric_points(reader, "ballast.router.provider.removals") == [
        ({"provider": "a", "reason": "out_of_credit"}, 1)
    ]
    assert metric_points(reader, "ballast.router.provider.out_of_rotation") == [
        ({"provider": "a", "reason": "out_of_credit"}, 1)
    ]

    # Skipped at no cost until the probe interval has passed: ranked last, never called.
    a.script = ["ok"]
    answer = await gateway.complete(Call(deadline=clock.now + 100.0), REQUEST)
    assert [(x.provider, x.outcome) for x in answer.attempts] == [("b", Outcome.OK)]
    with pytest.raises(FailedPrecondition) as info:
        await gateway.complete(Call(deadline=clock.now + 100.0, model="ma"), REQUEST)
    assert "a/ma: out_of_rotation (out of rotation (out_of_credit))" in info.value.message
    assert a.calls == 1

    # A failed probe keeps it out; a later successful one brings it back.
    clock.now += gateway.health.settings.rotation_probe_interval
    a.script = [quota]
    answer = await gateway.complete(Call(deadline=clock.now + 100.0), REQUEST)
    assert [x.outcome for x in answer.attempts] == [Outcome.QUOTA_EXHAUSTED, Outcome.OK]
    assert gateway.health.out_of_rotation("a") is not None
    clock.now += gateway.health.settings.rotation_probe_interval
    answer = await gateway.complete(Call(deadline=clock.now + 100.0), REQUEST)
    assert [(x.provider, x.outcome) for x in answer.attempts] == [("a", Outcome.OK)]
    assert gateway.health.out_of_rotation("a") is None
    assert metric_points(reader, "ballast.router.provider.out_of_rotation") == []
    # A second removal of the same provider while out is not counted again.
    assert metric_points(reader, "ballast.router.provider.removals") == [
        ({"provider": "a", "reason": "out_of_credit"}, 1)
    ]


async def test_every_provider_out_of_rotation_is_a_failed_precondition() -> None:
    gateway, clock, a, b = make()
    a.script = [ProviderError(Outcome.AUTH_ERROR, "HTTP 401: authentication", category="authentication")]
    b.script = [ProviderError(Outcome.QUOTA_EXHAUSTED, "HTTP 402: out_of_credit", category="out_of_credit")]
    with pytest.raises(FailedPrecondition):
        await gateway.complete(Call(deadline=100.0), REQUEST)
    with pytest.raises(FailedPrecondition) as info:
        await gateway.complete(Call(deadline=100.0), REQUEST)
    assert "out of rotation" in info.value.message
    assert (a.calls, b.calls, clock.slept) == (1, 1, [])


def test_a_probe_slot_is_one_request_at_a_time() -> None:
    clock = Clock()
    health = HealthBook(BreakerSettings(rotation_probe_interval=60.0), clock)
    target = ("p", "m")
    told: list[tuple[str, tuple[str, str], float | None]] = []
    health.listeners.append(lambda event, where, seconds: told.append((event, where, seconds)))
    health.get(target)
    assert health.take_out("p", "authentication", 401)
    # Other replicas (hints) and the limiter (headroom reporter) hear of it as an open breaker.
    assert told == [("open", target, 60.0)]
    assert not health.take_out("p", "authentication", 401)
    assert not health.acquire(target)
    clock.now = 60.0
    assert health.acquire(target)  # the probe
    assert not health.acquire(("p", "other-model"))  # one probe for the whole key
    health.release(target)  # cancelled: the next request may probe at once
    assert health.acquire(target)
    health.success(target, 0.1)
    assert health.out_of_rotation("p") is None and health.acquire(("p", "other-model"))
    assert ("close", target, None) in told


# --- through the router: failover, and no key in anything a client sees -------------------------


def two_real_providers(openai_url: str, anthropic_url: str) -> str:
    return f"""
providers:
  openai: {{kind: openai, base_url: "{openai_url}/v1", api_key_env: TEST_OPENAI_KEY}}
  anthropic: {{kind: anthropic, base_url: "{anthropic_url}", api_key_env: TEST_ANTHROPIC_KEY}}
models:
  gpt: {{provider: openai, provider_model: gpt-4o}}
  claude: {{provider: anthropic, provider_model: claude-sonnet-4-20250514}}
aliases:
  chain: {{candidates: [gpt, claude]}}
  openai-only: {{candidates: [gpt]}}
  anthropic-only: {{candidates: [claude]}}
  budget: {{candidates: [gpt]}}
  reasoning: {{candidates: [claude]}}
tier_defaults: {{default: chain}}
"""


KEYS = {"TEST_OPENAI_KEY": OPENAI_KEY, "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY}


async def test_insufficient_quota_replayed_through_the_router(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    async with (
        ReplayServer([transcript("openai_error_insufficient_quota.http")]) as openai,
        ReplayServer([transcript("anthropic_message_cached.http")]) as anthropic,
    ):
        env = {
            **FAST_ENV,
            **KEYS,
            "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_real_providers(openai.url, anthropic.url)),
        }
        suite = await suite_factory(["router"], env)
        first = await suite.router.Complete(complete_request(), timeout=10)
        second = await suite.router.Complete(complete_request(), timeout=10)
        status = await suite.router.GetProviderStatus(
            R.GetProviderStatusRequest(provider="openai"), timeout=10
        )
    assert [(a.provider, a.outcome, a.http_status) for a in first.attempts] == [
        ("openai", R.ATTEMPT_OUTCOME_QUOTA_EXHAUSTED, 429),
        ("anthropic", R.ATTEMPT_OUTCOME_OK, 200),
    ]
    assert first.attempts[0].error == "HTTP 429: out_of_credit"
    # Out of rotation: ranked last, so the next request goes straight to the fallback.
    assert [(a.provider, a.outcome) for a in second.attempts] == [("anthropic", R.ATTEMPT_OUTCOME_OK)]
    assert len(openai.requests) == 1  # failed over at once, never retried
    assert [s.out_of_rotation_reason for s in status.providers] == ["out_of_credit"]


def client_visible(error: grpc.aio.AioRpcError) -> bytes:
    """Everything a client receives with a failed call: code, message and every trailer
    (grpc-status-details-bin carries the google.rpc details)."""
    parts = [str(error.code()).encode(), (error.details() or "").encode()]
    for _, value in error.trailing_metadata() or ():
        parts.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(parts)


@pytest.mark.parametrize(
    ("model", "name", "code"),
    [
        ("openai-only", "openai_error_echo_key.http", grpc.StatusCode.INVALID_ARGUMENT),
        ("openai-only", "openai_error_echo_key_401.http", grpc.StatusCode.FAILED_PRECONDITION),
        ("anthropic-only", "anthropic_error_echo_key.http", grpc.StatusCode.INVALID_ARGUMENT),
        ("anthropic-only", "anthropic_error_echo_key_401.http", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_provider_echoing_the_key_never_puts_it_in_a_client_visible_message(
    suite_factory: SuiteFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    model: str,
    name: str,
    code: grpc.StatusCode,
    stream: bool,
) -> None:
    async with ReplayServer([transcript(name)]) as server:
        env = {
            **FAST_ENV,
            **KEYS,
            "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_real_providers(server.url, server.url)),
        }
        suite = await suite_factory(["router"], env)
        request = complete_request(model=model)
        with (
            caplog.at_level(logging.INFO, logger="ballast.router.providers"),
            pytest.raises(grpc.aio.AioRpcError) as info,
        ):
            if stream:
                async for _ in suite.router.StreamComplete(
                    R.StreamCompleteRequest(request=request), timeout=10
                ):
                    pass
            else:
                await suite.router.Complete(request, timeout=10)
    # The double really echoed the key it was sent ...
    sent = server.requests[0].headers
    assert OPENAI_KEY in sent.get("authorization", "") or sent.get("x-api-key") == ANTHROPIC_KEY
    assert info.value.code() == code
    visible = client_visible(info.value)
    for key in (OPENAI_KEY, ANTHROPIC_KEY):
        assert key.encode() not in visible
        assert key[8:24].encode() not in visible
    assert b"provider" in visible
    # ... and the raw body reached the log, redacted.
    (logged,) = [r for r in caplog.records if r.getMessage() == "provider error"]
    assert "[REDACTED]" in logged.body  # type: ignore[attr-defined]
    assert OPENAI_KEY not in logged.body and ANTHROPIC_KEY not in logged.body  # type: ignore[attr-defined]


async def test_an_echoed_key_in_a_failover_trail_stays_out_of_the_answer(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    async with (
        ReplayServer([transcript("openai_error_echo_key_401.http")]) as openai,
        ReplayServer([transcript("anthropic_message_cached.http")]) as anthropic,
    ):
        env = {
            **FAST_ENV,
            **KEYS,
            "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_real_providers(openai.url, anthropic.url)),
        }
        suite = await suite_factory(["router"], env)
        reply = await suite.router.Complete(complete_request(), timeout=10)
    assert reply.attempts[0].outcome == R.ATTEMPT_OUTCOME_AUTH_ERROR
    assert OPENAI_KEY.encode() not in reply.SerializeToString()


def test_redaction_catches_keys_in_every_shape() -> None:
    text = (
        f'{{"auth": "Bearer {OPENAI_KEY}", "x-api-key": "{ANTHROPIC_KEY}", "raw": "{OPENAI_KEY}",'
        ' "other": "sk-live-abcdefghijklmnop", "header": "Authorization: Basic dXNlcjpwYXNz"}'
    )
    clean = redact(text, [OPENAI_KEY, ANTHROPIC_KEY])
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, "abcdefghijklmnop", "dXNlcjpwYXNz"):
        assert secret not in clean
    assert clean.count("[REDACTED]") >= 5


def test_the_new_limits_are_validated_config_values() -> None:
    env = Env({"BALLAST_ROUTER_MAX_RESET_WAIT": "90s", "BALLAST_ROUTER_ROTATION_PROBE_INTERVAL": "2m"})
    settings = RouterSettings.from_env(env)
    assert (settings.retry.max_reset_wait, settings.breaker.rotation_probe_interval) == (90.0, 120.0)
    bad = Env(
        {"BALLAST_ROUTER_MAX_RESET_WAIT": "until reset", "BALLAST_ROUTER_ROTATION_PROBE_INTERVAL": "0s"}
    )
    RouterSettings.from_env(bad)
    problems = "\n".join(bad.problems)
    assert (
        "BALLAST_ROUTER_MAX_RESET_WAIT" in problems and "BALLAST_ROUTER_ROTATION_PROBE_INTERVAL" in problems
    )


async def test_a_providers_own_retry_after_is_not_capped_by_the_reset_wait() -> None:
    # A retry-after is the provider's explicit word (handled by MAX_RETRY_AFTER, and told to the
    # caller as is); only waits derived from reset headers are capped.
    raw = transcript("anthropic_error_rate_limit_reset.http").replace(
        b"x-should-retry: true\n", b"x-should-retry: true\nretry-after: 120\n"
    )
    async with ReplayServer([raw]) as server:
        adapter = build_adapter(provider("anthropic", server.url), ClientOptions(max_reset_wait=10.0), Sink())
        try:
            with pytest.raises(ProviderError) as info:
                await adapter.complete(CLAUDE_SONNET, ASK)
        finally:
            await adapter.aclose()
    assert info.value.retry_after == 120.0


def test_a_field_name_that_is_really_the_key_is_not_passed_on() -> None:
    # A key with no dashes or capitals looks like a field name; it is still refused.
    key = "plainlowercasekey0123456789"
    body = json.dumps({"error": {"type": "invalid_request_error", "param": key, "message": key}}).encode()
    error = http_error(Provider("openai", "openai", "http://127.0.0.1:1/v1", api_key=key), 400, body, None)
    assert error.field == "" and key not in error.message
    error = http_error(
        Provider("anthropic", "anthropic", "http://127.0.0.1:1", wire="anthropic", api_key=key),
        400,
        json.dumps({"error": {"type": "invalid_request_error", "message": f"{key}: bad"}}).encode(),
        None,
    )
    assert error.field == "" and key not in error.message


def test_a_probe_answered_with_a_rate_limit_proves_the_key_works() -> None:
    clock = Clock()
    health = HealthBook(BreakerSettings(rotation_probe_interval=60.0), clock)
    target = ("p", "m")
    health.take_out("p", "out_of_credit", 429)
    clock.now = 60.0
    assert health.acquire(target)
    health.failure(target, Outcome.SERVER_ERROR, 0.1)  # says nothing about the key: still out
    assert health.out_of_rotation("p") is not None and not health.acquire(target)
    clock.now = 120.0
    assert health.acquire(target)
    health.failure(target, Outcome.RATE_LIMITED, 0.1, retry_after=1.0)  # the account answers again
    assert health.out_of_rotation("p") is None

"""Fault tests: the primary fails in every way a provider does, and requests still succeed on the
fallback; the breaker spares requests the failure penalty and recovers; caller errors are final."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

import grpc
import pytest
from ballast.router.v1 import router_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.router.app import RouterApp
from services.router.catalog import SimSpec
from services.router.sim import Fault, SimServer
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.unit.router.conftest import FAST_ENV, SimFactory, complete_request, two_provider_catalog, write

R = router_pb2


async def start(
    suite_factory: SuiteFactory,
    sim_factory: SimFactory,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    primary_wire: str = "openai",
    secondary_wire: str = "anthropic",
) -> tuple[Suite, SimServer, SimServer]:
    primary = await sim_factory("sim-primary-test", SimSpec(latency_median_ms=0))
    secondary = await sim_factory("sim-secondary-test", SimSpec(latency_median_ms=0))
    catalog = two_provider_catalog(
        primary, secondary, primary_wire=primary_wire, secondary_wire=secondary_wire
    )
    suite = await suite_factory(
        ["router"], {**FAST_ENV, "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, catalog), **(env or {})}
    )
    return suite, primary, secondary


class OffsetClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def outcomes(reply: router_pb2.CompleteResponse) -> list[tuple[str, int]]:
    return [(a.provider, a.outcome) for a in reply.attempts]


@pytest.mark.parametrize("wires", [("openai", "anthropic"), ("anthropic", "openai")])
async def test_primary_500s_fail_over(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, wires: tuple[str, str]
) -> None:
    suite, primary, _ = await start(
        suite_factory, sim_factory, tmp_path, primary_wire=wires[0], secondary_wire=wires[1]
    )
    primary.set_fault(Fault("error", status=500))
    reply = await suite.router.Complete(complete_request(), timeout=5)
    assert outcomes(reply) == [
        ("primary", R.ATTEMPT_OUTCOME_SERVER_ERROR),
        ("secondary", R.ATTEMPT_OUTCOME_OK),
    ]
    assert reply.attempts[0].http_status == 500 and reply.attempts[0].error == "HTTP 500: server_error"
    assert (reply.provider, reply.model) == ("secondary", "secondary-model")
    assert reply.message.content.startswith("[simulated sim-secondary-test/s-model]")


async def test_primary_timeout_fails_over_within_the_callers_deadline(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, primary, _ = await start(suite_factory, sim_factory, tmp_path)
    primary.set_fault(Fault("hang"))
    reply = await suite.router.Complete(complete_request(), timeout=3.0)
    # The fallback answered within the caller's deadline (else DEADLINE_EXCEEDED) ...
    assert outcomes(reply) == [("primary", R.ATTEMPT_OUTCOME_TIMEOUT), ("secondary", R.ATTEMPT_OUTCOME_OK)]
    # ... because the first attempt got half of it (1.5 s; a busy machine only adds lag), not all.
    assert 1.4 < reply.attempts[0].latency.ToTimedelta().total_seconds() < 2.7


async def test_connection_errors_fail_over_and_never_become_successes(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, primary, secondary = await start(suite_factory, sim_factory, tmp_path)
    primary.set_fault(Fault("down"))
    reply = await suite.router.Complete(complete_request(), timeout=5)
    assert outcomes(reply)[0] == ("primary", R.ATTEMPT_OUTCOME_CONNECTION_ERROR)
    secondary.set_fault(Fault("break"))  # a truncated body on the fallback too
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(complete_request(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "primary/primary-model: connection_error" in (info.value.details() or "")


@pytest.mark.parametrize("mode", ["hang", "error", "down"])
async def test_streams_fail_over_before_the_first_token(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, mode: str
) -> None:
    suite, primary, _ = await start(suite_factory, sim_factory, tmp_path)
    primary.set_fault(Fault(mode))
    request = router_pb2.StreamCompleteRequest(request=complete_request())
    events = [e async for e in suite.router.StreamComplete(request, timeout=1.0)]
    assert events[0].start.provider == "secondary"
    done = events[-1].done
    assert [a.provider for a in done.attempts] == ["primary", "secondary"]
    assert done.attempts[-1].outcome == R.ATTEMPT_OUTCOME_OK
    assert "".join(e.delta.text for e in events[1:-1]) == done.message.content


@pytest.mark.parametrize("mode", ["stall", "break"])
@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_a_stream_that_breaks_after_the_first_token_ends_unavailable(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, mode: str, wire: str
) -> None:
    suite, primary, secondary = await start(
        suite_factory,
        sim_factory,
        tmp_path,
        primary_wire=wire,
        env={"BALLAST_ROUTER_STREAM_IDLE_TIMEOUT": "300ms"},
    )
    primary.set_fault(Fault(mode, after_tokens=3))
    request = router_pb2.StreamCompleteRequest(request=complete_request())
    kinds: list[str | None] = []
    text = ""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in suite.router.StreamComplete(request, timeout=5):
            kinds.append(event.WhichOneof("event"))
            text += event.delta.text
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "broke after it had started" in (info.value.details() or "")
    assert kinds[0] == "start" and "delta" in kinds and "done" not in kinds
    assert secondary.stats.requests == 0  # no failover once tokens reached the caller
    # The three tokens sent before the break (the sim's label and two words) reached the caller,
    # in as many deltas as they arrived in.
    primary.set_fault(None)
    whole = (await suite.router.Complete(complete_request(), timeout=5)).message.content
    label = whole[: whole.index("]") + 1]
    assert text == label + "".join(" " + word for word in whole[len(label) :].split(" ")[1:3])


async def test_open_breaker_spares_requests_the_penalty_and_recovers(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    env = {
        "BALLAST_ROUTER_BREAKER_FAILURES": "2",
        "BALLAST_ROUTER_BREAKER_OPEN_FOR": "1m",
        "BALLAST_ROUTER_ATTEMPT_TIMEOUT": "500ms",
    }
    suite, primary, _ = await start(suite_factory, sim_factory, tmp_path, env=env)
    router = suite.router
    # The breakers' clock is the real one plus an offset the test can move: no sleeping for a minute.
    clock = OffsetClock()
    cast(RouterApp, suite.running["router"].app).health.clock = clock
    primary.set_fault(Fault("hang"))
    for _ in range(2):
        slow = await router.Complete(complete_request(), timeout=5)
        assert outcomes(slow)[0] == ("primary", R.ATTEMPT_OUTCOME_TIMEOUT)
    seen = primary.stats.requests
    status = await router.GetProviderStatus(
        router_pb2.GetProviderStatusRequest(provider="primary"), timeout=5
    )
    assert {s.model: s.breaker for s in status.providers}["primary-model"] == R.BREAKER_STATE_OPEN
    for _ in range(5):
        fast = await router.Complete(complete_request(), timeout=5)
        # The open primary is ranked last, so the answer comes first-time from the secondary: no
        # attempt on the primary, so no 500 ms timeout paid.
        assert outcomes(fast) == [("secondary", R.ATTEMPT_OUTCOME_OK)]
    assert primary.stats.requests == seen  # the primary was not even contacted
    primary.set_fault(None)
    clock.offset += 61  # past BREAKER_OPEN_FOR: the next request probes the primary
    probe = await router.Complete(complete_request(), timeout=5)
    assert outcomes(probe) == [("primary", R.ATTEMPT_OUTCOME_OK)]
    status = await router.GetProviderStatus(
        router_pb2.GetProviderStatusRequest(provider="primary"), timeout=5
    )
    assert {s.model: s.breaker for s in status.providers}["primary-model"] == R.BREAKER_STATE_CLOSED


async def test_every_breaker_open_fails_fast_unavailable(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    env = {"BALLAST_ROUTER_BREAKER_FAILURES": "1", "BALLAST_ROUTER_BREAKER_OPEN_FOR": "1m"}
    suite, primary, secondary = await start(suite_factory, sim_factory, tmp_path, env=env)
    primary.set_fault(Fault("error"))
    secondary.set_fault(Fault("error"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(complete_request(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    before = primary.stats.requests + secondary.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(complete_request(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "open circuit breaker" in (info.value.details() or "")
    assert primary.stats.requests + secondary.stats.requests == before


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_a_provider_400_is_not_retried(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, wire: str
) -> None:
    suite, primary, secondary = await start(suite_factory, sim_factory, tmp_path, primary_wire=wire)
    from ballast.common.v1 import common_pb2

    bad = complete_request(params=common_pb2.GenerationParams(temperature=7.0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(bad, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "provider primary rejected the request" in (info.value.details() or "")
    assert "temperature" in (info.value.details() or "")
    assert (primary.stats.requests, secondary.stats.requests) == (1, 0)


async def test_429_retry_after_is_honoured(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, primary, _ = await start(suite_factory, sim_factory, tmp_path)
    primary.set_fault(Fault("rate_limit", until=time.monotonic() + 0.3, retry_after=1))
    started = time.monotonic()
    reply = await suite.router.Complete(complete_request(model="primary-model"), timeout=5)
    assert time.monotonic() - started >= 1.0  # waited the full retry-after, not the 10 ms backoff
    assert outcomes(reply) == [("primary", R.ATTEMPT_OUTCOME_RATE_LIMITED), ("primary", R.ATTEMPT_OUTCOME_OK)]


async def test_a_long_retry_after_comes_back_as_resource_exhausted(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, primary, _ = await start(
        suite_factory, sim_factory, tmp_path, env={"BALLAST_ROUTER_MAX_RETRY_AFTER": "500ms"}
    )
    primary.set_fault(Fault("rate_limit", retry_after=30))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(complete_request(model="primary-model"), timeout=20)
    # The 30 s retry-after was not waited for: that would have been DEADLINE_EXCEEDED.
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(cast(grpc.Call, info.value))
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details)
    assert retry.retry_delay.seconds == 30


async def test_deadline_exceeded_when_nobody_answers(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, primary, secondary = await start(suite_factory, sim_factory, tmp_path)
    primary.set_fault(Fault("hang"))
    secondary.set_fault(Fault("hang"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(complete_request(), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_region_and_exclusion_hints(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, _, _ = await start(suite_factory, sim_factory, tmp_path)
    from ballast.common.v1 import common_pb2

    eu = await suite.router.Complete(
        complete_request(caller=common_pb2.Caller(tenant_id="t", region="eu")), timeout=5
    )
    assert eu.provider == "secondary"
    excluded = await suite.router.Complete(
        complete_request(hints=router_pb2.RoutingHints(exclude_providers=["primary"])), timeout=5
    )
    assert excluded.provider == "secondary" and len(excluded.attempts) == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.router.Complete(
            complete_request(hints=router_pb2.RoutingHints(region="ap", region_required=True)), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_random_error_rate_is_absorbed_by_failover(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    primary = await sim_factory("flaky", SimSpec(latency_median_ms=0, error_rate=0.5, seed=3))
    secondary = await sim_factory("steady", SimSpec(latency_median_ms=0))
    env = {
        **FAST_ENV,
        "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, two_provider_catalog(primary, secondary)),
        "BALLAST_ROUTER_BREAKER_FAILURES": "100",
    }
    suite = await suite_factory(["router"], env)
    replies = [await suite.router.Complete(complete_request(), timeout=5) for _ in range(20)]
    providers = [r.provider for r in replies]
    assert "primary" in providers and "secondary" in providers
    failed = [a for r in replies for a in r.attempts[:-1]]
    assert failed and all(
        (a.provider, a.outcome) == ("primary", R.ATTEMPT_OUTCOME_SERVER_ERROR) for a in failed
    )
    assert all(r.attempts[-1].outcome == R.ATTEMPT_OUTCOME_OK for r in replies)


async def test_a_caller_who_hangs_up_mid_stream_hangs_up_the_provider_too(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    primary = await sim_factory(
        "sim-slow", SimSpec(latency_median_ms=0, tokens_per_second=50), latency_scale=1.0
    )
    secondary = await sim_factory("sim-spare")
    catalog = two_provider_catalog(primary, secondary)
    suite = await suite_factory(
        ["router"], {**FAST_ENV, "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, catalog)}
    )
    call = suite.router.StreamComplete(
        router_pb2.StreamCompleteRequest(request=complete_request()), timeout=10
    )
    seen = 0
    async for event in call:
        seen += event.WhichOneof("event") == "delta"
        if seen == 2:
            break
    call.cancel()
    for _ in range(100):
        if primary.stats.disconnects:
            break
        await asyncio.sleep(0.02)
    assert primary.stats.disconnects == 1  # the provider stopped generating for nobody
    status = await suite.router.GetProviderStatus(
        router_pb2.GetProviderStatusRequest(provider="primary"), timeout=5
    )
    model = next(s for s in status.providers if s.model == "primary-model")
    # a hang-up is not the provider's fault
    assert model.failures == 0 and model.breaker == R.BREAKER_STATE_CLOSED


async def test_a_provider_that_hangs_after_answering_quickly_is_left_fast(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path
) -> None:
    suite, primary, _ = await start(
        suite_factory, sim_factory, tmp_path, env={"BALLAST_ROUTER_STALL_FLOOR": "150ms"}
    )
    for _ in range(5):  # the primary's usual latency gets measured
        assert (await suite.router.Complete(complete_request(), timeout=5)).provider == "primary"
    primary.set_fault(Fault("hang"))
    reply = await suite.router.Complete(complete_request(), timeout=60)
    # Without stall detection the primary would have had half of the 60 s deadline; cut off as a
    # stall, it had a fraction of that (150 ms here, seconds on a busy machine).
    assert reply.attempts[0].latency.ToTimedelta().total_seconds() < 10
    assert outcomes(reply) == [("primary", R.ATTEMPT_OUTCOME_TIMEOUT), ("secondary", R.ATTEMPT_OUTCOME_OK)]


@pytest.mark.parametrize("wires", [("openai", "anthropic"), ("anthropic", "openai")])
async def test_a_primary_out_of_credit_leaves_rotation_and_the_fallback_answers(
    suite_factory: SuiteFactory, sim_factory: SimFactory, tmp_path: Path, wires: tuple[str, str]
) -> None:
    suite, primary, _ = await start(
        suite_factory, sim_factory, tmp_path, primary_wire=wires[0], secondary_wire=wires[1]
    )
    primary.set_fault(Fault("no_credit"))
    first = await suite.router.Complete(complete_request(), timeout=5)
    second = await suite.router.Complete(complete_request(), timeout=5)
    status = await suite.router.GetProviderStatus(R.GetProviderStatusRequest(provider="primary"), timeout=5)
    assert outcomes(first) == [
        ("primary", R.ATTEMPT_OUTCOME_QUOTA_EXHAUSTED),
        ("secondary", R.ATTEMPT_OUTCOME_OK),
    ]
    assert first.attempts[0].http_status == (429 if wires[0] == "openai" else 402)
    assert outcomes(second) == [("secondary", R.ATTEMPT_OUTCOME_OK)]
    assert primary.stats.requests == 1
    assert {s.out_of_rotation_reason for s in status.providers} == {"out_of_credit"}

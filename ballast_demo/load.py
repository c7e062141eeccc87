"""Drives the surge against a running edge: simulated agents, through the public gRPC API,
exactly as a customer's agents would call it. Records one event per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from ballast.router.v1 import router_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ballast_demo.scenario import ScenarioConfig, Turn, UserPlan
from services.kit.tasks import cancel_and_wait

WEATHER = common_pb2.ToolDefinition(
    name="get_weather",
    description="Current weather for a city",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
TERMINAL = {edge_pb2.JOB_STATE_SUCCEEDED, edge_pb2.JOB_STATE_FAILED, edge_pb2.JOB_STATE_CANCELLED}


@dataclass
class Event:
    """One answered (or refused) agent request."""

    t: float  # seconds since the load started, when the answer arrived
    tier: str
    latency: float
    outcome: str  # ok | cache_hit | limited | failed
    code: str = "OK"
    queued: bool = False
    provider: str = ""
    attempts: int = 0
    upstream_429s: int = 0
    cost_micros: int = 0
    # Model tokens the answer was billed for (0 for a cache hit).
    tokens: int = 0
    saved_tokens: int = 0
    kind: str = ""
    # Of the latency: the providers' own time (every attempt) and an adaptive-throttling delay.
    provider_s: float = 0.0
    throttle_s: float = 0.0


@dataclass
class LoadState:
    """What the live display and the report read while the load runs."""

    started: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)
    waiting_jobs: int = 0
    active_users: int = 0
    providers: dict[str, str] = field(default_factory=dict)
    outage: bool = False
    # The run's tenant and its users (user id -> tier), for reading back what was charged.
    tenant: str = ""
    users: dict[str, str] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.started


def _attempts(response: edge_pb2.ChatResponse) -> tuple[int, int]:
    rate_limited = sum(1 for a in response.attempts if a.outcome == router_pb2.ATTEMPT_OUTCOME_RATE_LIMITED)
    return len(response.attempts), rate_limited


def _retry_after(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    retry = error_details_pb2.RetryInfo()
    for detail in status.details if status is not None else []:
        if detail.Unpack(retry):
            delay: float = retry.retry_delay.ToNanoseconds() / 1e9
            return delay
    return 1.0


class SurgeLoad:
    def __init__(
        self, edge: grpc.aio.Channel, admin_key: str, config: ScenarioConfig, state: LoadState
    ) -> None:
        self._edge = edge_pb2_grpc.EdgeServiceStub(edge)
        self._admin = edge_pb2_grpc.EdgeAdminServiceStub(edge)
        self._admin_key = admin_key
        self._config = config
        self.state = state
        self._tenant = "surge-" + secrets.token_hex(3)
        state.tenant = self._tenant
        self._keys: dict[int, tuple[tuple[str, str], ...]] = {}

    def _record(self, started: float, tier: str, kind: str, **fields: object) -> None:
        now = self.state.now()
        self.state.events.append(Event(t=now, tier=tier, latency=now - started, kind=kind, **fields))  # type: ignore[arg-type]

    async def prepare(self, users: list[UserPlan]) -> None:
        """One API key per simulated user, made before the clock starts."""
        gate = asyncio.Semaphore(32)

        async def make(user: UserPlan) -> None:
            async with gate:
                created = await self._admin.CreateApiKey(
                    edge_pb2.CreateApiKeyRequest(
                        tenant_id=self._tenant, user_id=f"user-{user.index}", tier=user.tier
                    ),
                    metadata=(("x-admin-key", self._admin_key),),
                    timeout=30,
                )
                self._keys[user.index] = (("authorization", f"Bearer {created.api_key}"),)
                self.state.users[f"user-{user.index}"] = user.tier

        await asyncio.gather(*(make(user) for user in users))

    async def _chat(
        self, auth: tuple[tuple[str, str], ...], tier: str, request: edge_pb2.ChatRequest, kind: str
    ) -> edge_pb2.ChatResponse | None:
        started = self.state.now()
        try:
            response = await self._edge.Chat(request, metadata=auth, timeout=self._config.deadline_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._record(started, tier, kind, outcome="limited", code=error.code().name)
                # A well-behaved client honours RetryInfo (bounded by the run).
                await asyncio.sleep(min(_retry_after(error), 5.0))
            else:
                self._record(started, tier, kind, outcome="failed", code=error.code().name)
            return None
        attempts, rate_limited = _attempts(response)
        self._record(
            started,
            tier,
            kind,
            outcome="cache_hit" if response.cache_hit else "ok",
            provider=response.provider,
            attempts=attempts,
            upstream_429s=rate_limited,
            cost_micros=response.cost.total_cost_micros,
            tokens=response.usage.total_tokens,
            provider_s=sum(a.latency.ToNanoseconds() for a in response.attempts) / 1e9,
            throttle_s=response.throttle_delay.ToNanoseconds() / 1e9,
        )
        return response

    async def _queued(
        self, auth: tuple[tuple[str, str], ...], tier: str, request: edge_pb2.ChatRequest, kind: str
    ) -> None:
        started = self.state.now()
        try:
            job = (
                await self._edge.SubmitChat(
                    edge_pb2.SubmitChatRequest(chat=request), metadata=auth, timeout=10
                )
            ).job
        except grpc.aio.AioRpcError as error:
            self._record(started, tier, kind, outcome="failed", code=error.code().name, queued=True)
            return
        self.state.waiting_jobs += 1
        try:
            while job.state not in TERMINAL and self.state.now() < self._config.duration_s + 30:
                await asyncio.sleep(0.5)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    job = (
                        await self._edge.GetJob(
                            edge_pb2.GetJobRequest(job_id=job.job_id), metadata=auth, timeout=5
                        )
                    ).job
        finally:
            self.state.waiting_jobs -= 1
        if job.state == edge_pb2.JOB_STATE_SUCCEEDED:
            attempts, rate_limited = _attempts(job.result)
            outcome = "cache_hit" if job.result.cache_hit else "ok"
            self._record(
                started,
                tier,
                kind,
                outcome=outcome,
                queued=True,
                provider=job.result.provider,
                attempts=attempts,
                upstream_429s=rate_limited,
                cost_micros=job.result.cost.total_cost_micros,
                tokens=job.result.usage.total_tokens,
            )
        elif job.state in TERMINAL:
            code = next((c.name for c in grpc.StatusCode if c.value[0] == job.error.code), "UNKNOWN")
            # A job that waited its longest for the user's tier quota was refused by that quota.
            outcome = "limited" if code == "RESOURCE_EXHAUSTED" else "failed"
            self._record(started, tier, kind, outcome=outcome, code=code, queued=True)
        else:
            # Still waiting when the run ended: reported as such, never as a success.
            self._record(started, tier, kind, outcome="failed", code="STILL_QUEUED", queued=True)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._edge.CancelJob(
                    edge_pb2.CancelJobRequest(job_id=job.job_id), metadata=auth, timeout=5
                )

    async def _turn(
        self, auth: tuple[tuple[str, str], ...], user: UserPlan, session_id: str, turn: Turn
    ) -> None:
        request = edge_pb2.ChatRequest(
            session_id=session_id,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=turn.text)],
            tools=[WEATHER] if turn.tool else [],
        )
        if user.tier == "free" and self._config.free_uses_queue:
            await self._queued(auth, user.tier, request, turn.kind)
            return
        response = await self._chat(auth, user.tier, request, turn.kind)
        if response is None or not response.message.tool_calls:
            return
        # The agent runs the tool (cached results are reused) and sends the result back.
        call = response.message.tool_calls[0]
        try:
            begin = await self._edge.BeginToolCall(
                edge_pb2.BeginToolCallRequest(
                    session_id=session_id,
                    tool_name=call.name,
                    arguments_json=call.arguments_json,
                    use_cache=True,
                ),
                metadata=auth,
                timeout=10,
            )
            result = begin.cached_result if begin.cache_hit else '{"forecast": "rain", "celsius": 14}'
            if not begin.cache_hit:
                await self._edge.RecordToolResult(
                    edge_pb2.RecordToolResultRequest(
                        session_id=session_id,
                        tool_name=call.name,
                        arguments_json=call.arguments_json,
                        tool_call_id=call.id,
                        result=result,
                        cacheable=True,
                    ),
                    metadata=auth,
                    timeout=10,
                )
        except grpc.aio.AioRpcError as error:
            self._record(
                self.state.now(),
                user.tier,
                "tool",
                outcome="limited" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed",
                code=error.code().name,
            )
            return
        follow_up = edge_pb2.ChatRequest(
            session_id=session_id,
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, tool_call_id=call.id, content=result)
            ],
            tools=[WEATHER],
        )
        await self._chat(auth, user.tier, follow_up, "tool_result")

    async def run_user(self, user: UserPlan) -> None:
        auth = self._keys[user.index]
        await asyncio.sleep(max(0.0, user.arrive_s - self.state.now()))
        self.state.active_users += 1
        think = iter(user.think)
        try:
            for session in user.sessions:
                if self.state.now() >= self._config.duration_s:
                    return
                try:
                    created = await self._edge.CreateSession(
                        edge_pb2.CreateSessionRequest(), metadata=auth, timeout=10
                    )
                except grpc.aio.AioRpcError as error:
                    self._record(
                        self.state.now(), user.tier, "session", outcome="failed", code=error.code().name
                    )
                    await asyncio.sleep(1.0)
                    continue
                for turn in session:
                    if self.state.now() >= self._config.duration_s:
                        return
                    await self._turn(auth, user, created.session.session_id, turn)
                    await asyncio.sleep(next(think, 1.0))
        finally:
            self.state.active_users -= 1


async def script_outage(config: ScenarioConfig, state: LoadState) -> None:
    """Takes the primary provider down at the scheduled time, through the simulator's admin endpoint."""
    await asyncio.sleep(max(0.0, config.outage_start_s - state.now()))
    async with httpx.AsyncClient(timeout=5) as client:
        await client.post(
            f"http://127.0.0.1:{config.primary_port}/admin/fault",
            json={"mode": config.outage_mode, "duration_s": config.outage_s},
        )
    state.outage = True
    await asyncio.sleep(config.outage_s)
    state.outage = False


async def watch_providers(router: grpc.aio.Channel, state: LoadState, stop: asyncio.Event) -> None:
    from ballast.router.v1 import router_pb2_grpc

    stub = router_pb2_grpc.RouterServiceStub(router)
    while not stop.is_set():
        with contextlib.suppress(grpc.aio.AioRpcError):
            status = await stub.GetProviderStatus(router_pb2.GetProviderStatusRequest(), timeout=2)
            states: dict[str, str] = {}
            for provider in status.providers:
                name = router_pb2.BreakerState.Name(provider.breaker).removeprefix("BREAKER_STATE_").lower()
                # The worst breaker of a provider's models stands for the provider.
                if states.get(provider.provider) in (None, "closed") or name == "open":
                    states[provider.provider] = name
            state.providers = states
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def run_surge(
    edge: grpc.aio.Channel,
    router: grpc.aio.Channel,
    admin_key: str,
    config: ScenarioConfig,
    users: list[UserPlan],
    on_tick: Callable[[LoadState], Awaitable[None]] | None = None,
) -> LoadState:
    state = LoadState()
    load = SurgeLoad(edge, admin_key, config, state)
    await load.prepare(users)
    state.started = time.monotonic()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_providers(router, state, stop))
    outage = asyncio.create_task(script_outage(config, state)) if config.outage_s > 0 else None
    tasks = [asyncio.create_task(load.run_user(user)) for user in users]

    async def ticker() -> None:
        while not stop.is_set():
            if on_tick is not None:
                await on_tick(state)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in (watcher, tick, outage):
            await cancel_and_wait(task)
    return state

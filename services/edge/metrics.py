"""The edge's metrics: chats by outcome, tokens and cost per tenant and model, queue depth.

Labels stay bounded: tenant, tier, model and outcome; the user only when
BALLAST_METRICS_PER_USER is on. Queue depth and the oldest job's age are what an
autoscaler of edge workers scales on; they are sampled from the store in the background
because metric callbacks cannot await.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.edge.pacing import LoadGovernor
from services.edge.store import PRIORITY_ORDER, EdgeStore
from services.kit.tasks import cancel_and_wait

log = logging.getLogger("ballast.edge.metrics")


def failure_outcome(code: str) -> str:
    """The outcome label of a chat that ended with status `code`."""
    return "limited" if code == "RESOURCE_EXHAUSTED" else "error"


class EdgeMetrics:
    def __init__(
        self, meter: metrics.Meter, store: EdgeStore, *, per_user: bool, sample_every: float
    ) -> None:
        self._store = store
        self._per_user = per_user
        self._sample_every = sample_every
        self._depth: dict[str, int] = dict.fromkeys(PRIORITY_ORDER, 0)
        self._oldest_age = 0.0
        self._task: asyncio.Task[None] | None = None
        self._meter = meter
        self.chats = meter.create_counter(
            "ballast.edge.chats",
            unit="{request}",
            description="Chat calls by outcome (ok, cache_hit, limited, error)",
        )
        self.tokens = meter.create_counter(
            "ballast.usage.tokens",
            unit="{token}",
            description="Model tokens spent, by tenant, model and direction",
        )
        self.cost = meter.create_counter(
            "ballast.usage.cost",
            unit="{microdollar}",
            description="Model cost in micro-dollars, by tenant and model",
        )
        # By tier only (not tenant): what the overview compares, with bounded series.
        self.duration = meter.create_histogram(
            "ballast.edge.chat.duration",
            unit="s",
            description="Chat and ChatStream calls from arrival to the answer's end, by tier and outcome",
        )
        self.first_token = meter.create_histogram(
            "ballast.edge.chat.time_to_first_token",
            unit="s",
            description="From a chat's arrival to its first content (the whole answer for unary Chat), by tier",
        )
        self.cache_savings = meter.create_counter(
            "ballast.edge.cache_saved_tokens",
            unit="{token}",
            description="Model tokens not spent thanks to cache hits",
        )
        meter.create_observable_gauge(
            "ballast.edge.queue.depth",
            callbacks=[self._observe_depth],
            unit="{job}",
            description="Jobs waiting in the queue, by priority",
        )
        meter.create_observable_gauge(
            "ballast.edge.queue.oldest_age",
            callbacks=[self._observe_age],
            unit="s",
            description="Age of the oldest unfinished job",
        )

    def watch_governor(self, governor: LoadGovernor) -> None:
        """Exports each paced lane's allowance, and the loop lag that decides them."""
        self._meter.create_observable_gauge(
            "ballast.edge.paced.allowed",
            callbacks=[
                lambda options: [Observation(lane.allowed, {"lane": lane.name}) for lane in governor.lanes]
            ],
            unit="{slot}",
            description="Work allowed to run at once per lane (queue, free, interactive); fewer while high priority needs the CPU",
        )
        self._meter.create_observable_gauge(
            "ballast.edge.paced.waiting",
            callbacks=[
                lambda options: [Observation(lane.waiting, {"lane": lane.name}) for lane in governor.lanes]
            ],
            unit="{request}",
            description="Work waiting for a slot per lane",
        )
        self._meter.create_observable_gauge(
            "ballast.edge.loop_lag",
            callbacks=[lambda options: [Observation(governor.lag)]],
            unit="s",
            description="How late the edge's event loop ran its last timer (CPU saturation)",
        )

    def _labels(self, caller: common_pb2.Caller, **extra: str) -> dict[str, str]:
        labels = {"tenant": caller.tenant_id, "tier": caller.tier, **extra}
        if self._per_user:
            labels["user"] = caller.user_id
        return labels

    def chat(self, caller: common_pb2.Caller, response: edge_pb2.ChatResponse) -> None:
        outcome = "cache_hit" if response.cache_hit else "ok"
        self.chats.add(1, self._labels(caller, outcome=outcome))
        model = response.model or "unknown"
        if response.cache_hit:
            return
        usage = response.usage
        self.tokens.add(usage.input_tokens, self._labels(caller, model=model, direction="input"))
        self.tokens.add(usage.output_tokens, self._labels(caller, model=model, direction="output"))
        self.cost.add(response.cost.total_cost_micros, self._labels(caller, model=model))

    def failed(self, caller: common_pb2.Caller, code: str) -> None:
        self.chats.add(1, self._labels(caller, outcome=failure_outcome(code), code=code))

    def timed(self, caller: common_pb2.Caller, outcome: str, seconds: float) -> None:
        """A call answered (or refused) directly, not through the queue: its whole duration."""
        self.duration.record(seconds, {"tier": caller.tier, "outcome": outcome})

    def first_content(self, caller: common_pb2.Caller, mode: str, seconds: float) -> None:
        self.first_token.record(seconds, {"tier": caller.tier, "mode": mode})

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"priority": priority}) for priority, count in self._depth.items()]

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._oldest_age)]

    async def sample_once(self) -> None:
        self._depth = await self._store.depth()
        oldest = await self._store.oldest_enqueued_at()
        self._oldest_age = 0.0 if oldest is None else max(0.0, time.time() - oldest)

    async def _sample(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception as exc:  # a store outage must not stop sampling
                log.debug("queue sampling failed: %s", exc)
            await asyncio.sleep(self._sample_every)

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample(), name="edge-queue-metrics")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

"""The edge's metrics: chats by outcome, tokens and cost per tenant and model, what cache hits
saved, webhook deliveries, queue depth.

Labels stay bounded: tenant (at most BALLAST_METRICS_MAX_TENANTS distinct ones per replica, the
rest as `(other)`), tier, model and outcome; the user only when BALLAST_METRICS_PER_USER is on. Queue depth and the oldest job's age are what an
autoscaler of edge workers scales on; they are sampled from the store in the background
because metric callbacks cannot await.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.edge.pacing import LoadGovernor
from services.edge.store import PRIORITY_ORDER, EdgeStore
from services.kit.labels import BoundedLabel
from services.kit.tasks import cancel_and_wait

log = logging.getLogger("ballast.edge.metrics")


def failure_outcome(code: str) -> str:
    """The outcome label of a chat that ended with status `code`."""
    return "limited" if code == "RESOURCE_EXHAUSTED" else "error"


class EdgeMetrics:
    def __init__(
        self,
        meter: metrics.Meter,
        store: EdgeStore,
        *,
        per_user: bool,
        sample_every: float,
        max_tenants: int = 1000,
    ) -> None:
        self._store = store
        self._per_user = per_user
        self.tenant = BoundedLabel(max_tenants)
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
            description="Model tokens not spent thanks to cache hits (the cached answer's recorded usage), by tenant, model and direction",
        )
        self.cache_saved_cost = meter.create_counter(
            "ballast.edge.cache_saved_cost",
            unit="{microdollar}",
            description="Model cost in micro-dollars not spent thanks to cache hits (the cached answer's recorded cost), by tenant and model",
        )
        self.webhook_attempts = meter.create_counter(
            "ballast.edge.webhook.attempts",
            unit="{attempt}",
            description="Webhook delivery attempts by tenant and outcome (delivered, retried, failed, refused)",
        )
        self.webhook_duration = meter.create_histogram(
            "ballast.edge.webhook.delivery.duration",
            unit="s",
            description="From a job's end to its webhook's outcome (every attempt and backoff), by outcome",
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

    def watch_webhooks(self, pending: Callable[[], int]) -> None:
        """Exports the webhook deliveries this replica has under way (sending or backing off)."""
        self._meter.create_observable_gauge(
            "ballast.edge.webhook.pending",
            callbacks=[lambda options: [Observation(pending())]],
            unit="{delivery}",
            description="Webhook deliveries under way on this replica (sending or waiting to retry)",
        )

    def _labels(self, caller: common_pb2.Caller, **extra: str) -> dict[str, str]:
        labels = {"tenant": self.tenant(caller.tenant_id), "tier": caller.tier, **extra}
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

    def cache_saved(
        self, caller: common_pb2.Caller, model: str, usage: common_pb2.Usage, cost_micros: int
    ) -> None:
        """A cache hit: the tokens and cost the cached answer took when the model made it."""
        model = model or "unknown"
        self.cache_savings.add(usage.input_tokens, self._labels(caller, model=model, direction="input"))
        self.cache_savings.add(usage.output_tokens, self._labels(caller, model=model, direction="output"))
        self.cache_saved_cost.add(cost_micros, self._labels(caller, model=model))

    def webhook_attempt(self, tenant_id: str, outcome: str) -> None:
        """An attempt's outcome: `retried` attempts failed and another follows; a delivery ends
        with one `delivered`, `failed` (attempts spent, or an answer retrying cannot fix) or
        `refused` (the URL now resolves to an address webhooks may not call)."""
        self.webhook_attempts.add(1, {"tenant": self.tenant(tenant_id), "outcome": outcome})

    def webhook_done(self, tenant_id: str, outcome: str, seconds: float) -> None:
        """A delivery's last attempt, and how long it took from the job's end."""
        self.webhook_attempt(tenant_id, outcome)
        self.webhook_duration.record(max(0.0, seconds), {"outcome": outcome})

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

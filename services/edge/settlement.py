"""Settling what a chat spent after the model answered: never lost to a deadline.

The tokens were spent once the model answered, so the limiter's Commit must land even when the
limiter is slow (a replica short of CPU) or down. The limiter's Commit is idempotent by
reservation id (it remembers a settled reservation for its reservation_ttl + idempotency_ttl), so
a Commit whose reply was lost is sent again without charging twice. A chat's response waits for
the first try only (at most BALLAST_EDGE_SETTLE_WAIT). While the limiter is UNAVAILABLE or misses
its deadline, the Commit is retried with backoff in the background for up to SETTLE_WAIT, then
recorded in the edge store (Redis keeps it across an edge restart; memory:// in this process) and
the reconciler applies it later. A settlement runs in a task of its own: a client that hangs up
does not cancel it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from ballast.limiter.v1 import limiter_pb2
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.edge.config import EdgeSettings
from services.edge.downstream import Downstream
from services.edge.store import EdgeStore
from services.kit.backoff import Backoff
from services.kit.errors import BallastError, DeadlineExceeded, Unavailable
from services.kit.tasks import cancel_and_wait

log = logging.getLogger("ballast.edge.settlement")

# Worth another try: the limiter (or the way to it) is down or late. Anything else (a tier that
# no longer exists, a malformed request) would be refused again.
RETRYABLE = (Unavailable, DeadlineExceeded)


def unreserved_id() -> str:
    """The idempotency key of a settlement without a reservation (the Check failed open)."""
    return "unreserved-" + secrets.token_hex(12)


class Settler:
    """Commits spend to the limiter, retries, records what it cannot commit, applies it later."""

    def __init__(
        self,
        settings: EdgeSettings,
        downstream: Downstream,
        store: EdgeStore,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._settings = settings
        self._down = downstream
        self._store = store
        self._running: set[asyncio.Task[None]] = set()
        # Recording failed too (the edge store was down): kept here until it can be recorded.
        self._unrecorded: dict[str, bytes] = {}
        self._pending = 0  # recorded and not yet applied, as last counted
        self._task: asyncio.Task[None] | None = None
        meter = meter or metrics.NoOpMeter("ballast")
        self._outcomes = meter.create_counter(
            "ballast.edge.settlements",
            unit="{settlement}",
            description="Limiter settlements after the model answered, by outcome (settled, retried, "
            "deferred: recorded to apply later, applied_later, refused)",
        )
        meter.create_observable_gauge(
            "ballast.edge.settlements.pending",
            callbacks=[self._observe_pending],
            unit="{settlement}",
            description="Settlements recorded and not yet applied (the limiter was down or late)",
        )

    def _observe_pending(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(self._pending + len(self._unrecorded) + len(self._running))]

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # --- a chat's settlement --------------------------------------------------------------------------

    def settle(self, request: limiter_pb2.CommitRequest) -> asyncio.Future[limiter_pb2.CommitResponse | None]:
        """Settles `request`; the future gives the limiter's reply to the first try, or None when
        that failed.

        Settling starts here, before the caller awaits anything: a coroutine would start only when
        first awaited, and a caller cancelled before that (a client gone while its answer's jobs
        were being gathered) would lose the charge unseen. The caller waits for the first try only
        (at most BALLAST_EDGE_SETTLE_WAIT); retries and recording go on in the background, and
        cancelling the caller does not cancel them.
        """
        first: asyncio.Future[limiter_pb2.CommitResponse | None] = asyncio.get_running_loop().create_future()
        self.submit(request, first)
        return asyncio.shield(first)

    def submit(
        self,
        request: limiter_pb2.CommitRequest,
        first: asyncio.Future[limiter_pb2.CommitResponse | None] | None = None,
    ) -> asyncio.Task[None]:
        """Starts settling `request` in the background (drain() waits for it); `first` gets the
        outcome of the first try."""
        task = asyncio.ensure_future(self._settle(request, first))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _settle(
        self,
        request: limiter_pb2.CommitRequest,
        first: asyncio.Future[limiter_pb2.CommitResponse | None] | None,
    ) -> None:
        def answer(reply: limiter_pb2.CommitResponse | None) -> None:
            if first is not None and not first.done():
                first.set_result(reply)

        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._settings.settle_wait
        backoff = Backoff(
            self._settings.settle_backoff, max(self._settings.settle_backoff, self._settings.settle_wait)
        )
        done = False
        try:
            while True:
                try:
                    # Each try may take all the time left: a starved limiter is slow, not gone.
                    reply = await self._commit(request, give_up - loop.time())
                except RETRYABLE as exc:
                    answer(None)
                    wait = backoff.failed()
                    if loop.time() + wait >= give_up:
                        log.warning("settlement of %s deferred: %s", request.reservation_id, exc.message)
                        done = True  # recorded, or kept in this process when recording fails
                        await self._record(request)
                        return
                    self._outcomes.add(1, {"outcome": "retried"})
                    await asyncio.sleep(wait)
                except BallastError as exc:
                    done = True
                    self._refused(request, exc)
                    return
                else:
                    done = True
                    self._outcomes.add(1, {"outcome": "settled"})
                    answer(reply)
                    return
        finally:
            answer(None)
            if not done:
                # Stopped before the limiter answered (shutdown): stop() records it.
                self._unrecorded.setdefault(
                    request.reservation_id, request.SerializeToString(deterministic=True)
                )

    async def _commit(self, request: limiter_pb2.CommitRequest, seconds: float) -> limiter_pb2.CommitResponse:
        reply: limiter_pb2.CommitResponse = await self._down.call(
            "limiter", self._down.limiter.Commit, request, seconds
        )
        return reply

    def _refused(self, request: limiter_pb2.CommitRequest, exc: BallastError) -> None:
        self._outcomes.add(1, {"outcome": "refused"})
        log.error(
            "the limiter refused settlement %s (%d tokens of tenant %s): %s",
            request.reservation_id,
            request.actual_tokens,
            request.caller.tenant_id,
            exc.message,
        )

    async def _record(self, request: limiter_pb2.CommitRequest) -> None:
        self._outcomes.add(1, {"outcome": "deferred"})
        key, record = request.reservation_id, request.SerializeToString(deterministic=True)
        try:
            await self._store.put_settlement(key, record)
            self._pending += 1
        except BallastError as exc:
            log.error("could not record settlement %s (%s); kept in this process", key, exc.message)
            self._unrecorded[key] = record

    # --- the reconciler -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._reconcile_loop(), name="edge-settlement-reconciler")

    async def drain(self, grace: float) -> None:
        """Waits (up to `grace`) for the settlements under way; they record themselves when late."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace)

    async def stop(self) -> None:
        """Stops the reconciler and the settlements still retrying, and records what they had not
        settled (the store is closed after this; with Redis another replica applies them)."""
        await cancel_and_wait(self._task)
        self._task = None
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for key, record in list(self._unrecorded.items()):
            try:
                await self._store.put_settlement(key, record)
            except BallastError as exc:
                request = limiter_pb2.CommitRequest.FromString(record)
                log.error(
                    "settlement %s (%d tokens of tenant %s) lost at shutdown: %s",
                    key,
                    request.actual_tokens,
                    request.caller.tenant_id,
                    exc.message,
                )
            del self._unrecorded[key]

    async def _reconcile_loop(self) -> None:
        backoff = Backoff(
            self._settings.settle_interval,
            max(self._settings.settle_interval, self._settings.settle_retry_max),
        )
        while True:
            try:
                await self.reconcile()
            except RETRYABLE as exc:
                wait = backoff.failed()
                log.warning("recorded settlements not applied yet (%s); next try in %.1fs", exc.message, wait)
            except Exception:
                wait = backoff.failed()
                log.exception("settlement reconciler failed; next try in %.1fs", wait)
            else:
                backoff.succeeded()
                wait = self._settings.settle_interval
            await asyncio.sleep(wait)

    async def reconcile(self) -> int:
        """Applies recorded settlements; returns how many. Raises (UNAVAILABLE, DEADLINE_EXCEEDED)
        when the limiter or the store is still down, leaving the rest recorded."""
        for key, record in list(self._unrecorded.items()):
            await self._store.put_settlement(key, record)
            del self._unrecorded[key]
            self._pending += 1
        applied = 0
        pending = await self._store.pending_settlements(self._settings.settle_batch)
        for key, record in pending:
            request = limiter_pb2.CommitRequest.FromString(record)
            try:
                await self._commit(request, self._settings.settle_wait)
            except RETRYABLE:
                raise
            except BallastError as exc:
                self._refused(request, exc)
            else:
                applied += 1
                self._outcomes.add(1, {"outcome": "applied_later"})
            await self._store.drop_settlement(key)
        self._pending = await self._store.settlement_count()
        if applied:
            log.info("applied %d recorded settlements; %d still recorded", applied, self._pending)
        return applied

"""The burst queue: SubmitChat enqueues, workers run chats at the pace the limiter
allows, results are kept for GetJob and pushed to a signed webhook.

A job waiting for quota is parked until its retry time, not failed; a worker heartbeats
its claim while the model runs, and the store reclaims claims whose worker went silent,
so a job survives a worker's death. A job's end is recorded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2
from google.protobuf import json_format, timestamp_pb2
from google.rpc import status_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from services.edge.config import EdgeSettings
from services.edge.downstream import Deadline
from services.edge.edge import ChatPipeline
from services.edge.metrics import EdgeMetrics
from services.edge.pacing import Lane
from services.edge.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    CapReachedError,
    Claim,
    EdgeStore,
    JobCaps,
    JobRecord,
)
from services.edge.webhooks import (
    Target,
    WebhookPolicy,
    WebhookRefused,
    WebhookSecrets,
    WebhookUnresolved,
    delivery_id,
)
from services.kit.errors import BallastError, DeadlineExceeded, ResourceExhausted, Unavailable, to_status
from services.kit.protos import timestamp

log = logging.getLogger("ballast.edge.jobs")

STATES = {
    QUEUED: edge_pb2.JOB_STATE_QUEUED,
    RUNNING: edge_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: edge_pb2.JOB_STATE_SUCCEEDED,
    FAILED: edge_pb2.JOB_STATE_FAILED,
    CANCELLED: edge_pb2.JOB_STATE_CANCELLED,
}
PRIORITIES = {
    "low": common_pb2.PRIORITY_LOW,
    "normal": common_pb2.PRIORITY_NORMAL,
    "high": common_pb2.PRIORITY_HIGH,
    "critical": common_pb2.PRIORITY_CRITICAL,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    return timestamp(seconds) if seconds else None  # unset stays unset


def job_to_proto(job: JobRecord) -> edge_pb2.Job:
    proto = edge_pb2.Job(
        job_id=job.job_id,
        state=STATES[job.state],
        attempts=job.attempts,
        priority=PRIORITIES.get(job.priority, common_pb2.PRIORITY_UNSPECIFIED),
        webhook_state=job.webhook_state,
        created_at=_timestamp(job.created_at),
        started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at),
    )
    if job.result:
        proto.result.ParseFromString(job.result)
    if job.error:
        proto.error.ParseFromString(job.error)
    return proto


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<body>", as the `x-ballast-signature: v1=<hex>` header carries it."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: float = 300.0) -> bool:
    """What a webhook receiver does: constant-time compare and a replay window."""
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


class JobRunner:
    def __init__(
        self,
        settings: EdgeSettings,
        store: EdgeStore,
        pipeline: ChatPipeline,
        tracer: trace.Tracer,
        metrics: EdgeMetrics | None = None,
        clock: Callable[[], float] = time.time,
        lane: Lane | None = None,
        webhooks: WebhookPolicy | None = None,
        webhook_secrets: WebhookSecrets | None = None,
        role: str = "edge",
    ) -> None:
        self._metrics = metrics
        self._settings = settings
        self._store = store
        self._pipeline = pipeline
        self._tracer = tracer
        self._clock = clock
        # The role, pod (host) and process in the consumer's name, so XINFO CONSUMERS and
        # XPENDING say which replica holds a job.
        self.consumer = f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._tasks: list[asyncio.Task[None]] = []
        self._reclaimer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.webhooks = webhooks or WebhookPolicy(
            settings.webhook_allowed, resolve_timeout=settings.webhook_timeout
        )
        self._secrets = webhook_secrets or WebhookSecrets(settings.webhook_secret)
        # Connections go to vetted IPs with the URL's host as Host/SNI: no redirects, no proxy
        # from the environment, and no reuse (a kept-alive connection to an IP could otherwise
        # be reused for another host name served there).
        self._http = httpx.AsyncClient(
            timeout=settings.webhook_timeout,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._webhooks: set[asyncio.Task[bool]] = set()
        if metrics is not None:
            metrics.watch_webhooks(lambda: len(self._webhooks))
        # The governor's queue lane: how many workers may claim jobs now (pacing.py).
        self.lane = lane or Lane("queue", max(1, settings.workers), max(1, settings.workers))

    # --- submitting --------------------------------------------------------------------------------------

    async def submit(self, caller: common_pb2.Caller, request: edge_pb2.SubmitChatRequest) -> JobRecord:
        priority = self._settings.tier_priorities.get(caller.tier, "normal")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        job = JobRecord(
            job_id="job_" + secrets.token_hex(12),
            tenant_id=caller.tenant_id,
            user_id=caller.user_id,
            priority=priority,
            request=request.SerializeToString(),
            caller=caller.SerializeToString(),
            created_at=self._clock(),
            webhook_url=request.webhook_url,
            webhook_state="pending" if request.webhook_url else "",
            trace_context=carrier,
        )
        caps = self.caps(caller.tier)
        try:
            return await self._store.submit(job, request.idempotency_key, caps)
        except CapReachedError as exc:
            raise self._cap_error(exc.cap, caps, caller) from None

    def caps(self, tier: str) -> JobCaps:
        """The caps a job of `tier` is admitted under (a tier cap tightens the per-user one)."""
        settings = self._settings
        per_user = settings.max_queued_per_user
        tier_cap = settings.tier_max_queued.get(tier, 0)
        if tier_cap and (not per_user or tier_cap < per_user):
            per_user = tier_cap
        return JobCaps(
            queued_per_tenant=settings.max_queued_per_tenant,
            queued_per_user=per_user,
            stored_per_tenant=settings.max_stored_per_tenant,
            stored_per_user=settings.max_stored_per_user,
        )

    def _cap_error(self, cap: str, caps: JobCaps, caller: common_pb2.Caller) -> ResourceExhausted:
        limit = getattr(caps, cap)
        who = f"tenant {caller.tenant_id!r}" if cap.endswith("tenant") else f"user {caller.user_id!r}"
        if cap == "queued_per_user" and limit == self._settings.tier_max_queued.get(caller.tier):
            source = f"the {caller.tier} tier's cap (BALLAST_EDGE_TIER_MAX_QUEUED)"
        else:
            source = f"BALLAST_EDGE_MAX_{cap.upper()}"
        if cap.startswith("queued"):
            what, retry_after = "jobs waiting or running", self._settings.job_retry_backoff or 1.0
            hint = "submit more when some have finished"
        else:
            what, retry_after = "job records kept", None
            hint = f"records are kept for BALLAST_EDGE_JOB_TTL ({self._settings.job_ttl:.0f}s)"
        return ResourceExhausted(
            f"{who} has {limit} {what}, the most {source} allows; {hint}",
            retry_after=retry_after,
            reason=f"edge_jobs_{cap}",
        )

    # --- working -----------------------------------------------------------------------------------------

    def start(self) -> None:
        for index in range(self._settings.workers):
            self._tasks.append(asyncio.create_task(self._work(index), name=f"edge-worker-{index}"))
        # With its workers apart (`ballast serve worker`, scaled on the queue's lag, possibly to
        # zero), the edge still keeps the queue moving: it re-queues jobs whose worker died and
        # parked jobs whose time came, so they show as lag and an autoscaler brings a worker.
        self._reclaimer = asyncio.create_task(self._reclaim_loop(), name="edge-reclaimer")
        self._tasks.append(self._reclaimer)

    async def drain(self, grace: float) -> None:
        """Stops claiming jobs and lets the ones running finish, for at most `grace` seconds.

        A job still running after that is cut by `stop`; its entry stays pending and another
        worker reclaims it after BALLAST_EDGE_JOB_CLAIM_IDLE, so it is run again, not lost.
        """
        self._stopping.set()
        if self._reclaimer is not None:
            self._reclaimer.cancel()
        # Each worker loop ends by itself once its current job is done (a claim waits at most 1 s);
        # webhooks of jobs that ended are delivered meanwhile.
        pending: list[asyncio.Task[Any]] = [t for t in self._tasks if t is not self._reclaimer]
        pending.extend(self._webhooks)
        pending = [task for task in pending if not task.done()]
        if pending and grace > 0:
            _, running = await asyncio.wait(pending, timeout=grace)
            if running:
                log.warning(
                    "%d workers or webhooks still busy after the %.1fs drain; jobs cut now are reclaimed",
                    len(running),
                    grace,
                )

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for webhook in list(self._webhooks):
            webhook.cancel()
        await self._http.aclose()
        # Nothing runs here any more: what this consumer still holds was cut by the drain. Put
        # it back in line now (not after BALLAST_EDGE_JOB_CLAIM_IDLE) and leave no consumer
        # behind in the group (a scaled worker would otherwise add one per pod it ever ran).
        try:
            released = await self._store.release(self.consumer)
        except Exception as exc:
            log.warning(
                "could not hand back this worker's jobs; others reclaim them after "
                "BALLAST_EDGE_JOB_CLAIM_IDLE and remove the consumer after BALLAST_EDGE_CONSUMER_IDLE",
                extra={"consumer": self.consumer, "error": repr(exc)},
            )
        else:
            if released:
                log.warning(
                    "put %d jobs cut by the drain back in line", released, extra={"consumer": self.consumer}
                )

    async def _reclaim_loop(self) -> None:
        interval = max(0.05, self._settings.job_claim_idle / 2)
        if not self._settings.workers:
            # No claim loop here promotes parked jobs: wake often enough that one due is queued
            # within a second.
            interval = min(interval, 1.0)
        next_reap = 0.0
        while not self._stopping.is_set():
            try:
                count = await self._store.reclaim(self.consumer, self._settings.job_claim_idle)
                if count:
                    log.warning("reclaimed %d abandoned jobs", count)
                # Consumers of workers that died, once their jobs were reclaimed above; a few times
                # per BALLAST_EDGE_CONSUMER_IDLE is soon enough.
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self._settings.consumer_idle / 4
                    reaped = await self._store.reap(self.consumer, self._settings.consumer_idle)
                    if reaped:
                        log.info("removed %d idle consumers holding no job from the queue's group", reaped)
                if not self._settings.workers:
                    await self._store.promote_due()
            except Exception:
                # The store down, or a bug: this loop must outlive either, or abandoned jobs are
                # never reclaimed again; the traceback is logged and the next round tries again.
                log.exception("reclaiming abandoned jobs failed")
            await asyncio.sleep(interval)

    async def _work(self, index: int) -> None:
        while not self._stopping.is_set():
            # A slot first, then a claim: a job this replica has no capacity for stays in the
            # queue for another replica.
            async with self.lane.slot():
                if self._stopping.is_set():
                    return
                try:
                    claim = await self._store.claim(self.consumer, block=1.0)
                except Exception:
                    # The store down (its driver's own errors), or a bug: the worker must keep
                    # running, so it logs the traceback and claims again after a pause.
                    log.exception("claiming a job failed; retrying")
                    await asyncio.sleep(1.0)
                    continue
                if claim is None:
                    continue
                try:
                    await self.run(claim)
                except Exception:
                    # Ending the job failed (the store down while its result was written, or a
                    # bug): the worker must keep running. The claim stays pending in the store and
                    # is reclaimed, so the job is not lost.
                    log.exception("job %s could not be finished; it will be retried", claim.job.job_id)
                    await asyncio.sleep(0.5)

    async def _heartbeat(self, claim: Claim) -> None:
        interval = max(0.05, self._settings.job_claim_idle / 3)
        while True:
            await asyncio.sleep(interval)
            # A missed heartbeat (the store briefly down) only risks an early reclaim; it must
            # not end the job it keeps alive.
            with contextlib.suppress(Exception):
                await self._store.heartbeat(claim, self.consumer)

    async def run(self, claim: Claim) -> None:
        """Runs one claimed job to its end, or parks it until quota frees up."""
        job = claim.job
        submit = edge_pb2.SubmitChatRequest.FromString(job.request)
        caller = common_pb2.Caller.FromString(job.caller)
        parent = propagate.extract(job.trace_context)
        heartbeat = asyncio.create_task(self._heartbeat(claim))
        token = otel_context.attach(parent)
        try:
            with self._tracer.start_as_current_span("edge.job", attributes={"ballast.job.id": job.job_id}):
                try:
                    response = await self._pipeline.chat(caller, submit.chat, job.job_id, Deadline(None))
                except ResourceExhausted as exc:
                    waited = self._clock() - job.created_at
                    retry_after = exc.retry_after if exc.retry_after is not None else 1.0
                    if waited + retry_after <= self._settings.job_max_wait:
                        # Limited: wait for quota in the queue instead of failing.
                        await self._store.park(claim, self._clock() + retry_after)
                        return
                    await self._end(claim, job, error=exc)
                except (Unavailable, DeadlineExceeded) as exc:
                    # A backend blip (a replica going away, a restart) is retried from the queue;
                    # a job fails only after BALLAST_EDGE_JOB_ATTEMPTS tries or its longest wait.
                    backoff = min(30.0, self._settings.job_retry_backoff * 2 ** (job.attempts - 1))
                    waited = self._clock() - job.created_at
                    if (
                        job.attempts < self._settings.job_attempts
                        and waited + backoff <= self._settings.job_max_wait
                    ):
                        log.info("job %s: %s; retrying in %.1fs", job.job_id, exc.message, backoff)
                        await self._store.park(claim, self._clock() + backoff)
                        return
                    if self._metrics is not None:
                        self._metrics.failed(caller, exc.code.name)
                    await self._end(claim, job, error=exc)
                except BallastError as exc:
                    if self._metrics is not None:
                        self._metrics.failed(caller, exc.code.name)
                    await self._end(claim, job, error=exc)
                except Exception as exc:
                    # Anything else is a bug: the job ends failed (INTERNAL to its owner, with the
                    # traceback in the log) instead of being retried forever.
                    log.exception("job %s failed with a bug", job.job_id)
                    await self._end(claim, job, error=exc)
                else:
                    if self._metrics is not None:
                        self._metrics.chat(caller, response)
                    await self._end(claim, job, result=response)
        finally:
            otel_context.detach(token)
            heartbeat.cancel()

    async def _end(
        self,
        claim: Claim,
        job: JobRecord,
        *,
        result: edge_pb2.ChatResponse | None = None,
        error: BaseException | None = None,
    ) -> None:
        job.finished_at = self._clock()
        if result is not None:
            job.state = SUCCEEDED
            job.result = result.SerializeToString()
        else:
            job.state = FAILED
            if isinstance(error, BallastError):
                status = to_status(error)
                proto = status_pb2.Status(code=status.code.value[0], message=status.details)
            else:
                proto = status_pb2.Status(code=13, message="internal error")
            job.error = proto.SerializeToString()
        if not await self._store.finish(claim, job):
            log.info("job %s had already ended; this delivery is dropped", job.job_id)
            return
        if job.webhook_url:
            task = asyncio.create_task(self.deliver(job))
            self._webhooks.add(task)
            task.add_done_callback(self._webhooks.discard)

    # --- webhooks ----------------------------------------------------------------------------------------

    def webhook_body(self, job: JobRecord) -> bytes:
        payload = json_format.MessageToDict(job_to_proto(job), preserving_proto_field_name=True)
        return json.dumps(payload, sort_keys=True).encode()

    async def vet_webhook(self, url: str) -> Target:
        """The address `url` would be delivered to; WebhookRefused (INVALID_ARGUMENT) if internal."""
        return await self.webhooks.vet(url)

    async def _post(self, target: Target, body: bytes, headers: dict[str, str]) -> httpx.Response:
        headers = {**headers, "host": target.host_header}
        # The TLS server name (and the certificate check) is the URL's host, not the IP.
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request = self._http.build_request(
            "POST", target.connect_url, content=body, headers=headers, extensions=extensions
        )
        return await self._http.send(request)

    async def deliver(self, job: JobRecord) -> bool:
        """POSTs the result, retrying with exponential backoff; records delivered or failed."""
        body = self.webhook_body(job)
        delay = self._settings.webhook_backoff
        secret = self._secrets.for_tenant(job.tenant_id)
        outcome = "failed"
        with self._tracer.start_as_current_span("edge.webhook", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("ballast.job.id", job.job_id)
            for attempt in range(1, self._settings.webhook_attempts + 1):
                stamp = str(int(self._clock()))
                headers = {
                    "content-type": "application/json",
                    "x-ballast-job-id": job.job_id,
                    "x-ballast-delivery-id": delivery_id(job.job_id),
                    "x-ballast-timestamp": stamp,
                    "x-ballast-delivery-attempt": str(attempt),
                }
                if secret:
                    headers["x-ballast-signature"] = sign(secret, stamp, body)
                propagate.inject(headers)
                try:
                    # Vetted again at every attempt: the name may resolve elsewhere by now.
                    target = await self.webhooks.vet(job.webhook_url)
                    reply = await self._post(target, body, headers)
                    if 200 <= reply.status_code < 300:
                        outcome = "delivered"
                        break
                    # A redirect is not followed, and a 4xx other than 408/429 will not get
                    # better by retrying.
                    if 300 <= reply.status_code < 400 or (
                        400 <= reply.status_code < 500 and reply.status_code not in (408, 429)
                    ):
                        log.info("webhook for %s answered %d; not retried", job.job_id, reply.status_code)
                        break
                except WebhookUnresolved:
                    log.info(
                        "webhook attempt %d for %s failed: the host does not resolve", attempt, job.job_id
                    )
                except WebhookRefused as exc:
                    log.warning("webhook for %s not delivered: %s", job.job_id, exc.description)
                    outcome = "refused"
                    break
                except httpx.HTTPError as exc:
                    log.info("webhook attempt %d for %s failed: %s", attempt, job.job_id, type(exc).__name__)
                if attempt < self._settings.webhook_attempts:
                    if self._metrics is not None:
                        self._metrics.webhook_attempt(job.tenant_id, "retried")
                    await asyncio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
                    delay *= 2
            if self._metrics is not None:
                self._metrics.webhook_done(job.tenant_id, outcome, self._clock() - job.finished_at)
            job.webhook_state = "delivered" if outcome == "delivered" else "failed"
            await self._store.update(job)
            return outcome == "delivered"

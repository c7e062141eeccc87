"""Embeddings for the edge's callers: counted by the limiter like a chat turn (one request and
the tokens spent), then made by the router's embedding models."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ballast.common.v1 import common_pb2
from ballast.limiter.v1 import limiter_pb2
from ballast.router.v1 import router_pb2

from services.edge.config import EdgeSettings
from services.edge.downstream import Deadline, Downstream
from services.edge.edge import quota_metadata
from services.edge.settlement import Settler, unreserved_id
from services.kit.errors import BallastError, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger("ballast.edge.embeddings")


def _seconds(seconds: int, nanos: int) -> float:
    return seconds + nanos / 1e9


async def embed(
    settings: EdgeSettings,
    down: Downstream,
    request: router_pb2.EmbedRequest,
    request_id: str,
    deadline: Deadline,
    settler: Settler | None = None,
) -> router_pb2.EmbedResponse:
    """`request.caller` is the authenticated caller; the limiter decides before the router is called.

    With a `settler`, what the embedding spent is settled as a chat's is (retried, recorded and
    applied later when the limiter is late); without one, once, best effort.
    """
    caller = request.caller
    check = limiter_pb2.CheckRequest(
        caller=caller,
        requests=1,
        # A cheap upper bound for the reservation; the real count is committed after.
        reserve_tokens=sum(1 + len(text) // 3 for text in request.inputs),
        request_id=request_id,
    )
    decision: limiter_pb2.CheckResponse | None
    try:
        decision = await down.call("limiter", down.limiter.Check, check, down.timeout(deadline, caller))
    except (Unavailable, DeadlineExceeded) as exc:
        if settings.limiter_failure != "open":
            raise Unavailable("the limiter is unavailable and BALLAST_EDGE_LIMITER_FAILURE=closed") from exc
        log.warning("limiter unavailable; failing open", extra={"request_id": request_id})
        decision = None
    reservation = decision.reservation_id if decision is not None else ""
    if decision is not None and decision.decision != limiter_pb2.DECISION_ALLOW:
        wait = _seconds(decision.delay.seconds, decision.delay.nanos)
        if decision.decision == limiter_pb2.DECISION_DELAY and wait <= deadline.cap(
            settings.max_throttle_wait
        ):
            await asyncio.sleep(wait)
        else:
            await _settle(down, caller, reservation, 0)
            retry = _seconds(decision.retry_after.seconds, decision.retry_after.nanos) or wait
            error = ResourceExhausted(
                f"rate limited by {decision.reason or 'a limit'}; retry after {retry:.1f}s",
                retry_after=retry,
                reason=decision.reason,
            )
            error.trailing = quota_metadata([status.quota for status in decision.limits])
            raise error
    try:
        response: router_pb2.EmbedResponse = await down.call(
            "router", down.router.Embed, request, deadline.remaining()
        )
    except BaseException:
        await _settle(down, caller, reservation, 0)
        raise
    spent = response.usage.total_tokens or response.usage.input_tokens
    if settler is not None and (reservation or spent > 0):
        # Under an id of its own when the Check failed open or was replayed (see edge.py).
        replayed = decision is not None and decision.replayed
        await settler.settle(
            limiter_pb2.CommitRequest(
                reservation_id=unreserved_id() if replayed or not reservation else reservation,
                caller=caller,
                actual_tokens=spent,
                cost_micros=response.cost.total_cost_micros,
            )
        )
    else:
        await _settle(down, caller, reservation, spent, response.cost.total_cost_micros)
    return response


async def _settle(
    down: Downstream, caller: common_pb2.Caller, reservation: str, tokens: int, cost_micros: int = 0
) -> None:
    if not reservation:
        return
    # Settling must not fail the answer: an unsettled reservation expires by itself.
    with contextlib.suppress(BallastError):
        await down.call(
            "limiter",
            down.limiter.Commit,
            limiter_pb2.CommitRequest(
                reservation_id=reservation, caller=caller, actual_tokens=tokens, cost_micros=cost_micros
            ),
            down.timeout(Deadline(None)),
        )

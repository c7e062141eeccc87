"""What a limiter store does: decide a set of limit operations atomically, settle budgets.

The domain turns a request into `LimitOp`s (one per limit it touches) and the store decides
all of them in one atomic step: either every enforced limit has room and all are counted,
or nothing is counted. Each store implements the same three algorithms:

* WINDOW  - sliding window of `buckets` sub-buckets, counted conservatively (see README):
            never more than `limit` in any rolling window; `cost` hits per request.
* BUDGET  - a daily (UTC) token budget with reservations: available = limit - used - reserved;
            reservations expire after their TTL; settle() charges the actual tokens.
* COUNTER - a plain counter with an idle TTL (tool calls per session).
* FIXED   - envoyproxy/ratelimit's fixed window: windows of `period_ms` aligned to the epoch
            (a minute starts at :00); every call adds its cost, over the limit or not (as
            upstream increments before it compares), and a FIXED op never blocks the others.

A replica that decided on its own while the shared store was down hands what it counted to
`replay` on recovery (`Charge`s, in order), so the shared counters catch up.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

DAY_MS = 86_400_000


class Kind(enum.IntEnum):
    WINDOW = 1
    BUDGET = 2
    COUNTER = 3
    FIXED = 4


# LimitOp, OpResult and Outcome are built for every decision: slotted, not frozen (see
# CheckInput in limiter.py for why). Treat them as values; nothing changes them once built.
@dataclass(slots=True)
class LimitOp:
    kind: Kind
    # Store key without the store's key prefix; keys of one call share one hash tag.
    key: str
    # -1 = unlimited (budgets are still tracked so usage can be reported).
    limit: int
    # What this request adds (hits, tokens reserved, tool calls); 0 only reads.
    cost: int
    # WINDOW and FIXED: window length; COUNTER: idle TTL; BUDGET: unused.
    period_ms: int = 0
    # Reported, never enforced.
    shadow: bool = False


@dataclass(slots=True)
class OpResult:
    # The limit alone would refuse this request.
    over: bool
    # Left after this request (-1 when unlimited).
    remaining: int
    # Until the limit is fully replenished (0 when nothing is counted); FIXED: until the window ends.
    reset_ms: int
    # When over: until a retry of the same cost could fit.
    retry_ms: int
    # WINDOW: hits in the window; COUNTER: count; BUDGET: tokens settled today.
    used: int = 0
    # BUDGET: cost settled today (micro-dollars).
    cost_micros: int = 0


@dataclass(slots=True)
class Outcome:
    # Every enforced limit had room and all were counted (never true for a peek).
    admitted: bool
    results: tuple[OpResult, ...]
    # An earlier call with the same idempotency key decided this; nothing counted again.
    replayed: bool = False
    # The delay recorded with the admitted request (returned again on replay).
    delay_ms: int = 0
    reservation_id: str = ""
    # Decided by the fail mode because the shared store was unreachable.
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    results: tuple[OpResult, ...]
    reservation_found: bool
    already_settled: bool
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class BudgetRef:
    key: str
    limit: int


class ChargeKind(enum.Enum):
    DECIDE = "decide"
    SETTLE = "settle"
    HEADROOM = "headroom"


@dataclass(frozen=True, slots=True)
class Charge:
    """One call a replica decided (and counted) by itself while the shared store was down.

    Replayed on recovery at its own time `at_ms`, counted whatever the limits say now: the
    requests were admitted, so the shared counters must know. Each kind carries its arguments:
    DECIDE the ops and the idempotency and reservation details, SETTLE the budgets and the
    settlement, HEADROOM a provider report.
    """

    kind: ChargeKind
    at_ms: int
    ops: tuple[LimitOp, ...] = ()
    idempotency_key: str = ""
    idempotency_ttl_ms: int = 0
    reservation_id: str = ""
    reservation_ttl_ms: int = 0
    delay_ms: int = 0
    budgets: tuple[BudgetRef, ...] = ()
    actual_tokens: int = 0
    cost_micros: int = 0
    done_key: str = ""
    done_ttl_ms: int = 0
    field: str = ""
    record: str = ""
    ttl_ms: int = 0


class StoreUnavailableError(Exception):
    """The store could not be reached in time; the fail mode decides."""


class Store(Protocol):
    async def decide(
        self,
        ops: Sequence[LimitOp],
        *,
        peek: bool = False,
        idempotency_key: str = "",
        idempotency_ttl_ms: int = 0,
        reservation_id: str = "",
        reservation_ttl_ms: int = 0,
        delay_ms: int = 0,
    ) -> Outcome:
        """Decides every op atomically. With `peek`, nothing is written (a read of the state).

        With an idempotency key, an admitted outcome is remembered for the TTL and a later
        call with the same key returns it (replayed=True) without counting anything.
        Budget ops with a cost record a reservation under `reservation_id`.
        """
        ...

    async def settle(
        self,
        budgets: Sequence[BudgetRef],
        *,
        reservation_id: str,
        actual_tokens: int,
        cost_micros: int,
        done_key: str,
        done_ttl_ms: int,
    ) -> Settlement:
        """Releases the reservation (when still held) and charges the actual tokens, once."""
        ...

    async def put_headroom(self, field: str, record: str, ttl_ms: int) -> None:
        """Shares a provider headroom report with every replica."""
        ...

    async def get_headroom(self) -> dict[str, str]:
        """Every unexpired headroom report."""
        ...

    async def replay(self, charges: Sequence[Charge]) -> int:
        """Applies charges counted elsewhere, in order, forced past the limits; returns how many
        from the start were applied (the rest are tried again later)."""
        ...

    async def ping(self) -> None:
        """Returns when the backend answers, raises when it does not (readiness checks it)."""
        ...

    async def close(self) -> None: ...

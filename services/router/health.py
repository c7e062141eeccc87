"""Per provider+model health on this replica: circuit breaker, EWMA latency and error rate, headroom;
and per provider, whether it is out of rotation.

The breaker opens after `failure_threshold` consecutive failures, stays open for `open_for`
seconds (requests skip it without paying for a failure), then lets `half_open_probes` requests
through; a probe that succeeds closes it, one that fails opens it again. Time comes from an
injected clock.

A provider whose key is refused or whose account is out of credit is out of rotation: every model
behind that key is skipped at no cost (waiting seconds will not fix a billing problem) until a
probe succeeds. Every `rotation_probe_interval` one request may go through as the probe.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from services.router.config import BreakerSettings
from services.router.providers.base import Headroom, Outcome

Target = tuple[str, str]  # (provider, catalog model id)

# Outcomes that say the provider is unwell. Rate limits only cool a target down; the caller's own
# mistakes say nothing about the provider.
BREAKER_FAILURES = frozenset(
    {Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR, Outcome.PROTOCOL_ERROR}
)


# Answers that prove a provider accepted the router's key and account, even though they failed.
KEY_ACCEPTED = frozenset({Outcome.RATE_LIMITED, Outcome.CLIENT_ERROR})


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class TargetHealth:
    provider: str
    model: str
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probes_in_flight: int = 0
    ewma_latency: float | None = None
    # The same per kind of latency ("call": a whole answer; "first_token": a stream's first
    # content), with the number of samples behind each: what stall detection compares against.
    ewma_by_kind: dict[str, float] = field(default_factory=dict)
    samples_by_kind: dict[str, int] = field(default_factory=dict)
    # EWMA of failures as of error_at (this clock); read it through HealthBook.error_rate.
    error_rate: float = 0.0
    error_at: float = 0.0
    requests: int = 0
    failures: int = 0
    headroom: Headroom = field(default_factory=Headroom)
    # A 429 with retry-after: other candidates go first until then.
    cooldown_until: float = 0.0


@dataclass
class Removal:
    """Why and since when a provider is out of rotation."""

    provider: str
    # The error category that took it out: out_of_credit, authentication or permission.
    reason: str
    http_status: int
    since: float
    probe_at: float
    probing: bool = False


# Told when a breaker opens ("open", seconds) or closes ("close", None) and when a provider asks
# to back off ("cooldown", seconds): what other replicas may want to know (see hints.py).
HealthListener = Callable[[str, Target, float | None], None]


class HealthBook:
    def __init__(self, settings: BreakerSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self._targets: dict[Target, TargetHealth] = {}
        self.listeners: list[HealthListener] = []
        # Breakers other replicas opened, until when (this clock): treated as open here too.
        self.shared_open: dict[Target, float] = {}
        self._closed_at: dict[Target, float] = {}
        self.removed: dict[str, Removal] = {}

    def get(self, target: Target) -> TargetHealth:
        health = self._targets.get(target)
        if health is None:
            health = self._targets[target] = TargetHealth(*target)
        return health

    def all(self) -> list[TargetHealth]:
        return list(self._targets.values())

    def state(self, target: Target) -> BreakerState:
        """The breaker state now (an open breaker whose time is up reads as half-open)."""
        health = self.get(target)
        if health.state is BreakerState.OPEN and self.clock() - health.opened_at >= self.settings.open_for:
            return BreakerState.HALF_OPEN
        if (
            health.state is BreakerState.CLOSED
            and self.shared_open
            and self.shared_open.get(target, 0.0) > self.clock()
        ):
            return BreakerState.OPEN
        return health.state

    def take_out(self, provider: str, reason: str, http_status: int) -> bool:
        """Takes `provider` out of rotation; True when it was in rotation until now."""
        now = self.clock()
        removal = self.removed.get(provider)
        if removal is not None:
            # A failed probe: stay out, probe again after the interval.
            removal.reason, removal.http_status, removal.probing = reason, http_status, False
            removal.probe_at = now + self.settings.rotation_probe_interval
        else:
            self.removed[provider] = Removal(
                provider, reason, http_status, now, now + self.settings.rotation_probe_interval
            )
        # To the listeners it looks like an open breaker until the probe: other replicas skip the
        # provider's models too (hints.py) and the limiter stops judging by its last headroom.
        for target in self._targets_of(provider):
            self._tell("open", target, self.settings.rotation_probe_interval)
        return removal is None

    def _restore(self, provider: str) -> None:
        if self.removed.pop(provider, None) is None:
            return
        for known in self._targets_of(provider):
            self.shared_open.pop(known, None)
            self._closed_at[known] = self.clock()
            self._tell("close", known, None)

    def _targets_of(self, provider: str) -> list[Target]:
        return [target for target in self._targets if target[0] == provider]

    def out_of_rotation(self, provider: str) -> Removal | None:
        return self.removed.get(provider)

    def available(self, target: Target) -> bool:
        """Whether a request may go to `target` now, without reserving anything."""
        removal = self.removed.get(target[0])
        if removal is not None and (removal.probing or self.clock() < removal.probe_at):
            return False
        state = self.state(target)
        if state is BreakerState.OPEN:
            return False
        if state is BreakerState.HALF_OPEN:
            return self.get(target).probes_in_flight < self.settings.half_open_probes
        return True

    def acquire(self, target: Target) -> bool:
        """Admits one request; in half-open state it takes one of the probe slots."""
        if not self.available(target):
            return False
        removal = self.removed.get(target[0])
        if removal is not None:
            removal.probing = True
            removal.probe_at = self.clock() + self.settings.rotation_probe_interval
        health = self.get(target)
        if self.state(target) is BreakerState.HALF_OPEN:
            health.state = BreakerState.HALF_OPEN
            health.probes_in_flight += 1
        return True

    def error_rate(self, target: Target) -> float:
        """The recent failure share, decayed by the time since the last call finished."""
        health = self.get(target)
        return self._decayed(health, self.clock())

    def _decayed(self, health: TargetHealth, now: float) -> float:
        if not health.error_rate:
            return 0.0
        elapsed = max(0.0, now - health.error_at)
        return float(health.error_rate * 0.5 ** (elapsed / self.settings.error_half_life))

    def cooling_down(self, target: Target) -> bool:
        return self.get(target).cooldown_until > self.clock()

    def _ewma(self, previous: float | None, sample: float) -> float:
        alpha = self.settings.ewma_alpha
        return sample if previous is None else alpha * sample + (1 - alpha) * previous

    def _sample(self, health: TargetHealth, latency: float | None, failed: bool) -> None:
        health.requests += 1
        if latency is not None:
            health.ewma_latency = self._ewma(health.ewma_latency, latency)
        now = self.clock()
        health.error_rate = self._ewma(self._decayed(health, now), 1.0 if failed else 0.0)
        health.error_at = now

    def success(self, target: Target, latency: float, kind: str = "call") -> None:
        health = self.get(target)
        self._sample(health, latency, False)
        health.ewma_by_kind[kind] = self._ewma(health.ewma_by_kind.get(kind), latency)
        health.samples_by_kind[kind] = health.samples_by_kind.get(kind, 0) + 1
        health.consecutive_failures = 0
        # A success is the probe the provider was waiting for: back in rotation.
        self._restore(target[0])
        if health.state is not BreakerState.CLOSED:
            health.probes_in_flight = max(0, health.probes_in_flight - 1)
            health.state = BreakerState.CLOSED
            self.shared_open.pop(target, None)
            self._closed_at[target] = self.clock()
            self._tell("close", target, None)

    def failure(
        self, target: Target, outcome: Outcome, latency: float, retry_after: float | None = None
    ) -> None:
        health = self.get(target)
        removal = self.removed.get(target[0])
        if removal is not None and removal.probing and outcome in KEY_ACCEPTED:
            # The probe's answer says the key and the account work again (a rate limit, or a
            # complaint about the request itself): back in rotation. Only the probe's: a request
            # that was already in flight when the provider left rotation proves nothing new.
            self._restore(target[0])
        elif removal is not None:
            # The probe failed for a reason that says nothing of the key: out until the next one.
            removal.probing = False
        if outcome is Outcome.RATE_LIMITED:
            self._sample(health, None, True)
            health.cooldown_until = max(health.cooldown_until, self.clock() + (retry_after or 1.0))
            self._release_probe(health, reopen=False)
            self._tell("cooldown", target, retry_after or 1.0)
            return
        if outcome not in BREAKER_FAILURES:
            self._release_probe(health, reopen=False)
            return
        self._sample(health, latency if outcome is not Outcome.TIMEOUT else None, True)
        health.failures += 1
        health.consecutive_failures += 1
        if (
            health.state is BreakerState.HALF_OPEN
            or health.consecutive_failures >= self.settings.failure_threshold
        ):
            self._open(health)

    def release(self, target: Target) -> None:
        """An admitted request ended without telling anything about the provider (cancelled)."""
        removal = self.removed.get(target[0])
        if removal is not None and removal.probing:
            removal.probing = False
            removal.probe_at = self.clock()
        self._release_probe(self.get(target), reopen=False)

    def _release_probe(self, health: TargetHealth, *, reopen: bool) -> None:
        if health.state is BreakerState.HALF_OPEN:
            health.probes_in_flight = max(0, health.probes_in_flight - 1)
            if reopen:
                self._open(health)

    def _open(self, health: TargetHealth) -> None:
        health.state = BreakerState.OPEN
        health.opened_at = self.clock()
        health.probes_in_flight = 0
        self._tell("open", (health.provider, health.model), self.settings.open_for)

    def _tell(self, event: str, target: Target, seconds: float | None) -> None:
        for listener in self.listeners:
            listener(event, target, seconds)

    def apply_shared(
        self, open_for: dict[Target, float], cooldowns: dict[Target, float], read_at: float
    ) -> None:
        """Hints read from the other replicas at `read_at`: seconds left per target."""
        self.shared_open = {
            target: read_at + seconds
            for target, seconds in open_for.items()
            # A breaker this replica closed after the read saw a probe succeed: newer news.
            if self._closed_at.get(target, -1.0) < read_at
        }
        for target, seconds in cooldowns.items():
            health = self.get(target)
            health.cooldown_until = max(health.cooldown_until, read_at + seconds)

    def observe_headroom(self, target: Target, headroom: Headroom) -> None:
        health = self.get(target)
        health.headroom = headroom
        if headroom.rate_limited and headroom.retry_after:
            health.cooldown_until = max(health.cooldown_until, self.clock() + headroom.retry_after)

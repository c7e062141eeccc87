"""Which models may answer a request, and in what order to try them.

Resolution: an empty model means the caller tier's default; `auto` picks the simple or the
complex target by the rule below; an alias gives its candidates; a model id gives itself.
Candidates that cannot take the request (tools to a model without tool use, a sampling parameter
a model's catalog entry rejects) are left out; when none is left, the caller hears which field.
Ranking: the strategy orders the candidates (ordered, weighted, lowest latency, lowest cost),
then a stable sort moves less healthy ones back: open breaker, rate-limit cooldown, exhausted
headroom, a high recent error rate, and (when a region is preferred) other regions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.kit.errors import FailedPrecondition, InvalidArgument
from services.router.capabilities import refusal
from services.router.catalog import AUTO_ALIAS, AutoRule, Candidate, Catalog, Model, Provider, Strategy
from services.router.health import HealthBook
from services.router.model import ChatRequest, Role, request_tokens
from services.router.pricing import estimate
from services.router.providers.base import Headroom

# A target whose recent error rate is above this goes behind the healthier ones.
HIGH_ERROR_RATE = 0.5
# Output tokens assumed for cost caps when the request sets no maximum.
DEFAULT_OUTPUT_ESTIMATE = 256


@dataclass(frozen=True)
class Hints:
    strategy: Strategy | None = None
    region: str = ""
    region_required: bool = False
    exclude_providers: frozenset[str] = frozenset()
    max_cost_micros: int = 0
    max_attempts: int = 0


@dataclass(frozen=True)
class Choice:
    model: Model
    provider: Provider
    weight: float = 1.0

    @property
    def target(self) -> tuple[str, str]:
        return (self.provider.name, self.model.id)


@dataclass
class Plan:
    # What the request asked for after defaults and `auto` (an alias or a model id).
    resolved: str
    strategy: Strategy
    choices: list[Choice] = field(default_factory=list)


def is_complex(request: ChatRequest, rule: AutoRule) -> bool:
    """The `auto` rule: complex when the request has tools (if tools_are_complex), more estimated
    input tokens than long_input_tokens, more messages than max_simple_messages, or a complex
    keyword in the last user message; simple otherwise."""
    if rule.tools_are_complex and request.tools:
        return True
    if request_tokens(request) > rule.long_input_tokens:
        return True
    if len(request.messages) > rule.max_simple_messages:
        return True
    last_user = next((m.content for m in reversed(request.messages) if m.role is Role.USER), "")
    lowered = last_user.lower()
    return any(keyword in lowered for keyword in rule.complex_keywords)


class Planner:
    def __init__(
        self,
        catalog: Catalog,
        health: HealthBook,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        headroom_reserve: float = 0.0,
    ) -> None:
        self.catalog = catalog
        self.health = health
        self.rng = rng or random.Random()
        self.wall_clock = wall_clock
        self.headroom_reserve = headroom_reserve

    def effective_candidates(self, alias: str) -> list[Candidate]:
        """The alias's enabled candidates; simulated ones only if no real one is enabled (unless mixed)."""
        catalog = self.catalog
        enabled = [c for c in catalog.aliases[alias].candidates if catalog.provider_of(c.model).enabled]
        if catalog.mix_simulated:
            return enabled
        real = [c for c in enabled if not catalog.provider_of(c.model).simulated]
        return real or enabled

    def resolve(
        self, requested: str, tier: str, request: ChatRequest | None, kind: str
    ) -> tuple[str, list[Candidate], Strategy]:
        catalog = self.catalog
        name = requested
        if not name:
            name = (
                catalog.tier_defaults.get(tier) or catalog.tier_defaults["default"]
                if kind == "chat"
                else "embedding"
            )
        if name == AUTO_ALIAS:
            if kind != "chat" or request is None:
                raise InvalidArgument("model", "'auto' chooses chat models only")
            name = catalog.auto.complex if is_complex(request, catalog.auto) else catalog.auto.simple
        if name in catalog.aliases:
            alias = catalog.aliases[name]
            candidates = self.effective_candidates(name)
            if candidates and catalog.models[candidates[0].model].type != kind:
                raise InvalidArgument(
                    "model",
                    f"alias {name!r} holds {catalog.models[candidates[0].model].type} models, not {kind} models",
                )
            if not candidates:
                raise FailedPrecondition(
                    f"no model of alias {name!r} is enabled (set the API key variables of its providers)"
                )
            return name, candidates, alias.strategy
        if name in catalog.models:
            model = catalog.models[name]
            if model.type != kind:
                raise InvalidArgument("model", f"{name!r} is an {model.type} model, not a {kind} model")
            provider = catalog.providers[model.provider]
            if not provider.enabled:
                raise FailedPrecondition(
                    f"model {name!r} needs provider {provider.name!r}, which is off until {provider.api_key_env} is set"
                )
            return name, [Candidate(name)], Strategy.ORDERED
        known = sorted([*catalog.aliases, AUTO_ALIAS]) + sorted(
            m.id for m in catalog.enabled_models() if m.type == kind
        )
        raise InvalidArgument("model", f"unknown model or alias {name!r}; known: {', '.join(known)}")

    def plan(
        self,
        requested: str,
        *,
        tier: str = "",
        caller_region: str = "",
        hints: Hints = Hints(),
        request: ChatRequest | None = None,
        kind: str = "chat",
        input_tokens: int = 0,
        high_priority: bool = False,
    ) -> Plan:
        resolved, candidates, configured = self.resolve(requested, tier, request, kind)
        strategy = hints.strategy or configured
        region = hints.region or caller_region
        if request is not None:
            input_tokens = request_tokens(request)
            output_tokens = request.params.max_output_tokens or DEFAULT_OUTPUT_ESTIMATE
        else:
            output_tokens = 0
        choices: list[Choice] = []
        refused: list[InvalidArgument] = []
        for candidate in candidates:
            model = self.catalog.models[candidate.model]
            provider = self.catalog.providers[model.provider]
            if provider.name in hints.exclude_providers:
                continue
            if hints.region_required and region and provider.region != region:
                continue
            if kind == "chat" and input_tokens > model.context_window:
                continue
            problem = refusal(model, request) if request is not None else None
            if problem is not None:
                refused.append(problem)
                continue
            if hints.max_cost_micros and estimate(model, input_tokens, output_tokens) > hints.max_cost_micros:
                continue
            choices.append(Choice(model, provider, candidate.weight))
        if not choices and refused:
            # The request asks for something no candidate takes: the caller's to fix.
            raise refused[0]
        if not choices:
            raise FailedPrecondition(
                f"no candidate of {resolved!r} satisfies the request (region, excluded providers, "
                "cost cap or context window)"
            )
        ordered = self._order(choices, strategy, input_tokens, output_tokens)
        return Plan(resolved, strategy, self._by_health(ordered, region, high_priority))

    def _order(
        self, choices: list[Choice], strategy: Strategy, input_tokens: int, output_tokens: int
    ) -> list[Choice]:
        if strategy is Strategy.WEIGHTED:
            # Efraimidis–Spirakis: a weighted random permutation in one sort.
            return sorted(choices, key=lambda c: -(self.rng.random() ** (1.0 / max(c.weight, 1e-9))))
        if strategy is Strategy.LOWEST_LATENCY:
            # Unmeasured targets count as fastest so that each gets measured once.
            return sorted(choices, key=lambda c: self.health.get(c.target).ewma_latency or 0.0)
        if strategy is Strategy.LOWEST_COST:
            return sorted(
                choices,
                key=lambda c: (
                    estimate(c.model, max(input_tokens, 1), max(output_tokens, 1)),
                    c.model.input_price_micros_per_mtok + c.model.output_price_micros_per_mtok,
                ),
            )
        return choices

    def _by_health(self, choices: list[Choice], region: str, high_priority: bool = False) -> list[Choice]:
        now = self.wall_clock()
        reserve = 0.0 if high_priority else self.headroom_reserve

        def key(choice: Choice) -> tuple[bool, bool, bool, bool, bool, bool]:
            health = self.health.get(choice.target)
            room = health.headroom
            return (
                not self.health.available(choice.target),
                self.health.cooling_down(choice.target),
                _below(room, 0.0, now),
                reserve > 0 and _below(room, reserve, now),
                self.health.error_rate(choice.target) > HIGH_ERROR_RATE,
                bool(region) and choice.provider.region != region,
            )

        return sorted(choices, key=key)


def _below(room: Headroom, share: float, now: float) -> bool:
    """Whether the provider's last report, still current, left at most `share` of a limit
    (requests or tokens); share 0 means exhausted."""

    def low(remaining: int, limit: int, reset: float | None) -> bool:
        if remaining < 0 or now >= room.observed_at + (reset or 0):
            return False
        return remaining == 0 if share <= 0 else limit > 0 and remaining <= share * limit

    return low(room.remaining_requests, room.limit_requests, room.reset_requests) or low(
        room.remaining_tokens, room.limit_tokens, room.reset_tokens
    )

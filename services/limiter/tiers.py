"""The tiers file: per-tier limits, priorities and the throttling policy, validated on load.

A bad file never replaces a good one: `TiersError` names the file and the path of every
problem, and the service keeps deciding with the last good configuration.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRIORITIES = ("low", "normal", "high", "critical")
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES, start=1)}

REQUESTS = "requests"
USER_TOKENS = "user_tokens_per_day"
TENANT_TOKENS = "tenant_tokens_per_day"
TOOL_CALLS = "session_tool_calls"
LIMIT_NAMES = (REQUESTS, USER_TOKENS, TENANT_TOKENS, TOOL_CALLS)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
#: The longest `reservation_ttl` accepted (the Redis store keeps a budget to the end of the next day).
MAX_RESERVATION_TTL = 86400.0


class TiersError(ValueError):
    """The tiers file is invalid; lists every problem with its path in the file."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class Limit:
    """One limit of a tier. `limit` is ignored when `unlimited`."""

    limit: int = 0
    unlimited: bool = True
    # Window of a rate (requests only), seconds.
    window: float = 3600.0
    # Counted and reported, never enforced.
    shadow: bool = False


@dataclass(frozen=True)
class Tier:
    name: str
    priority: str
    requests: Limit
    user_tokens: Limit
    tenant_tokens: Limit
    tool_calls: Limit


@dataclass(frozen=True)
class PriorityPolicy:
    """Provider headroom (0..1) under which this priority is delayed, and under which it is denied."""

    delay_below: float
    deny_below: float


@dataclass(frozen=True)
class Throttle:
    # A headroom report stops applying after this long (or at the provider's reset, if sooner).
    stale_after: float = 60.0
    # Longest delay handed out; deeper shortage means a denial instead.
    max_delay: float = 10.0
    policies: Mapping[str, PriorityPolicy] = field(
        default_factory=lambda: {
            "low": PriorityPolicy(0.5, 0.2),
            "normal": PriorityPolicy(0.3, 0.1),
            "high": PriorityPolicy(0.1, 0.0),
            "critical": PriorityPolicy(0.0, 0.0),
        }
    )


@dataclass(frozen=True)
class TiersConfig:
    tiers: Mapping[str, Tier]
    default_tier: str = ""
    # An unsettled reservation is released after this long (a crashed caller leaks nothing).
    reservation_ttl: float = 600.0
    # A session's tool-call count is forgotten after this long without tool calls.
    session_ttl: float = 86400.0
    # A decision counts as "near limit" when this share of the limit is used (metrics).
    near_limit_ratio: float = 0.8
    throttle: Throttle = field(default_factory=Throttle)

    def tier(self, name: str) -> Tier | None:
        return self.tiers.get(name or self.default_tier)


class _Reader:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(path, "expected a mapping")
            return {}
        for key in value:
            if key not in allowed:
                self.bad(
                    f"{path}.{key}" if path else str(key), f"unknown key (allowed: {', '.join(allowed)})"
                )
        return value

    def integer(self, value: Any, path: str, default: int, minimum: int = 0) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.bad(path, f"expected an integer of at least {minimum}")
            return default
        return value

    def number(self, value: Any, path: str, default: float, lo: float, hi: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            self.bad(path, f"expected a number from {lo:g} to {hi:g}")
            return default
        return float(value)

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.bad(path, "expected true or false")
            return default
        return value

    def duration(self, value: Any, path: str, default: float, maximum: float | None = None) -> float:
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            seconds = float(value)
        else:
            match = _DURATION.match(str(value).lower()) if isinstance(value, str) else None
            if not match or float(match.group(1)) <= 0:
                self.bad(path, "expected a positive duration such as 500ms, 30s, 10m, 1h or 1d")
                return default
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if maximum is not None and seconds > maximum:
            self.bad(path, f"must be at most {maximum:g}s, got {seconds:g}s")
            return default
        return seconds

    def limit(self, value: Any, path: str, *, windowed: bool) -> Limit:
        if value is None:
            return Limit()
        allowed = ("limit", "unlimited", "shadow", *(("window",) if windowed else ()))
        data = self.mapping(value, path, allowed)
        unlimited = self.boolean(data.get("unlimited"), f"{path}.unlimited", False)
        if not unlimited and "limit" not in data:
            self.bad(path, "needs `limit` (or `unlimited: true`)")
        return Limit(
            limit=self.integer(data.get("limit"), f"{path}.limit", 0),
            unlimited=unlimited,
            window=self.duration(data.get("window"), f"{path}.window", 3600.0) if windowed else 86400.0,
            shadow=self.boolean(data.get("shadow"), f"{path}.shadow", False),
        )


def parse_tiers(data: Any, source: str = "tiers") -> TiersConfig:
    """Validates a parsed YAML document; raises TiersError listing every problem."""
    r = _Reader()
    root = r.mapping(
        data,
        "",
        ("tiers", "default_tier", "reservation_ttl", "session_ttl", "near_limit_ratio", "throttle"),
    )
    tiers: dict[str, Tier] = {}
    raw_tiers = root.get("tiers")
    if not isinstance(raw_tiers, dict) or not raw_tiers:
        r.bad("tiers", "expected a non-empty mapping of tier name to limits")
        raw_tiers = {}
    for name, raw in raw_tiers.items():
        path = f"tiers.{name}"
        if not isinstance(name, str) or not name:
            r.bad(path, "tier names are non-empty strings")
            continue
        spec = r.mapping(raw, path, ("priority", *LIMIT_NAMES))
        priority = spec.get("priority", "normal")
        if priority not in PRIORITIES:
            r.bad(f"{path}.priority", f"expected one of {', '.join(PRIORITIES)}")
            priority = "normal"
        tiers[name] = Tier(
            name=name,
            priority=priority,
            requests=r.limit(spec.get(REQUESTS), f"{path}.{REQUESTS}", windowed=True),
            user_tokens=r.limit(spec.get(USER_TOKENS), f"{path}.{USER_TOKENS}", windowed=False),
            tenant_tokens=r.limit(spec.get(TENANT_TOKENS), f"{path}.{TENANT_TOKENS}", windowed=False),
            tool_calls=r.limit(spec.get(TOOL_CALLS), f"{path}.{TOOL_CALLS}", windowed=False),
        )
    default_tier = root.get("default_tier") or ""
    if default_tier and default_tier not in tiers:
        r.bad("default_tier", f"{default_tier!r} is not a tier")
    throttle = _parse_throttle(r, root.get("throttle"))
    config = TiersConfig(
        tiers=tiers,
        default_tier=default_tier,
        # A reservation covers one model call in flight. At most a day, so a budget's keys (kept
        # to the end of the next day) outlive every reservation they count.
        reservation_ttl=r.duration(
            root.get("reservation_ttl"), "reservation_ttl", 600.0, maximum=MAX_RESERVATION_TTL
        ),
        session_ttl=r.duration(root.get("session_ttl"), "session_ttl", 86400.0),
        near_limit_ratio=r.number(root.get("near_limit_ratio"), "near_limit_ratio", 0.8, 0.0, 1.0),
        throttle=throttle,
    )
    if r.problems:
        raise TiersError(source, r.problems)
    return config


def _parse_throttle(r: _Reader, value: Any) -> Throttle:
    data = r.mapping(value, "throttle", ("stale_after", "max_delay", "priorities"))
    default = Throttle()
    policies = dict(default.policies)
    raw = r.mapping(data.get("priorities"), "throttle.priorities", PRIORITIES)
    for name, spec in raw.items():
        if name not in PRIORITIES:
            continue
        path = f"throttle.priorities.{name}"
        item = r.mapping(spec, path, ("delay_below", "deny_below"))
        base = policies[name]
        delay = r.number(item.get("delay_below"), f"{path}.delay_below", base.delay_below, 0.0, 1.0)
        deny = r.number(item.get("deny_below"), f"{path}.deny_below", base.deny_below, 0.0, 1.0)
        if deny > delay:
            r.bad(path, "deny_below must not exceed delay_below (requests are delayed before denied)")
        policies[name] = PriorityPolicy(delay, deny)
    return Throttle(
        stale_after=r.duration(data.get("stale_after"), "throttle.stale_after", default.stale_after),
        max_delay=r.duration(data.get("max_delay"), "throttle.max_delay", default.max_delay),
        policies=policies,
    )


def load_tiers(path: str | Path) -> TiersConfig:
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise TiersError(str(file), [f"cannot read: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise TiersError(str(file), [f"not valid YAML: {exc}"]) from exc
    return parse_tiers(data, str(file))

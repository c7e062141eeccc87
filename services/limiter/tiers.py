"""The tiers file: per-tier limits, priorities and the throttling policy, validated on load.

A bad file never replaces a good one: `TiersError` names the file, the line and the path of
every problem (`tiers.yaml:12: tiers.free.requests.limit: -3 must be at least 0`), and the
service keeps deciding with the last good configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.kit.yamlfile import Entry, YamlFileError, YamlReader, compose, read_text, value_node

PRIORITIES = ("low", "normal", "high", "critical")
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES, start=1)}

REQUESTS = "requests"
USER_TOKENS = "user_tokens_per_day"
TENANT_TOKENS = "tenant_tokens_per_day"
TOOL_CALLS = "session_tool_calls"
LIMIT_NAMES = (REQUESTS, USER_TOKENS, TENANT_TOKENS, TOOL_CALLS)

#: The longest `reservation_ttl` accepted (the Redis store keeps a budget to the end of the next day).
MAX_RESERVATION_TTL = 86400.0


class TiersError(YamlFileError):
    """The tiers file is invalid; `problems` holds every problem as `file:line: path: what`."""


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


def _limit(r: YamlReader, node: yaml.Node | None, what: str, *, windowed: bool) -> Limit:
    if node is None:
        return Limit()
    items = r.entries(node, what)
    r.unknown(items, {"limit", "unlimited", "shadow", *(("window",) if windowed else ())}, what)
    # A limit written out is enforced unless it says `unlimited: true`.
    unlimited = r.boolean(items, "unlimited", what, False)
    if not unlimited and "limit" not in items:
        r.bad(node, f"{what}: needs `limit` (or `unlimited: true`)")
    return Limit(
        limit=int(r.number(items, "limit", what, Limit.limit, integer=True)),
        unlimited=unlimited,
        window=r.duration(items, "window", what, Limit.window) if windowed else 86400.0,
        shadow=r.boolean(items, "shadow", what, Limit.shadow),
    )


def _tier(r: YamlReader, name: str, node: yaml.Node, what: str) -> Tier:
    items = r.entries(node, what)
    r.unknown(items, {"priority", *LIMIT_NAMES}, what)
    priority = r.string(items, "priority", what, "normal", choices=PRIORITIES)
    return Tier(
        name=name,
        priority=priority if priority in PRIORITIES else "normal",
        requests=_limit(r, value_node(items, REQUESTS), f"{what}.{REQUESTS}", windowed=True),
        user_tokens=_limit(r, value_node(items, USER_TOKENS), f"{what}.{USER_TOKENS}", windowed=False),
        tenant_tokens=_limit(r, value_node(items, TENANT_TOKENS), f"{what}.{TENANT_TOKENS}", windowed=False),
        tool_calls=_limit(r, value_node(items, TOOL_CALLS), f"{what}.{TOOL_CALLS}", windowed=False),
    )


_TOP_LEVEL = {"tiers", "default_tier", "reservation_ttl", "session_ttl", "near_limit_ratio", "throttle"}


def parse_tiers(text: str, source: str = "tiers") -> TiersConfig:
    """Validates the text of a tiers file; raises TiersError listing every problem at its line."""
    try:
        document = compose(text, source)
    except YamlFileError as exc:
        raise TiersError(exc.problems) from exc
    r = YamlReader(source)
    root = r.entries(document, "tiers file")
    r.unknown(root, _TOP_LEVEL, "tiers file")
    tiers = _parse_tier_list(r, root, document)
    default_tier = r.string(root, "default_tier", "", "")
    if default_tier and default_tier not in tiers:
        r.bad(value_node(root, "default_tier"), f"default_tier: {default_tier!r} is not a tier")
    config = TiersConfig(
        tiers=tiers,
        default_tier=default_tier,
        # A reservation covers one model call in flight. At most a day, so a budget's keys (kept
        # to the end of the next day) outlive every reservation they count.
        reservation_ttl=r.duration(
            root, "reservation_ttl", "", TiersConfig.reservation_ttl, maximum=MAX_RESERVATION_TTL
        ),
        session_ttl=r.duration(root, "session_ttl", "", TiersConfig.session_ttl),
        near_limit_ratio=float(
            r.number(root, "near_limit_ratio", "", TiersConfig.near_limit_ratio, maximum=1.0)
        ),
        throttle=_parse_throttle(r, value_node(root, "throttle")),
    )
    if r.problems:
        raise TiersError(r.problems)
    return config


def _parse_tier_list(r: YamlReader, root: Mapping[str, Entry], document: yaml.Node | None) -> dict[str, Tier]:
    node = value_node(root, "tiers")
    listed = r.mapping(node, "tiers") if node is not None else None
    if not listed:
        if listed is not None or node is None:
            r.bad(node or document, "tiers: expected a non-empty mapping of tier name to limits")
        return {}
    tiers: dict[str, Tier] = {}
    for name, (key, spec) in listed.items():
        if not name:
            r.bad(key, "tiers: tier names are non-empty strings")
            continue
        tiers[name] = _tier(r, name, spec, f"tiers.{name}")
    return tiers


def _parse_throttle(r: YamlReader, node: yaml.Node | None) -> Throttle:
    items = r.entries(node, "throttle")
    r.unknown(items, {"stale_after", "max_delay", "priorities"}, "throttle")
    default = Throttle()
    policies = dict(default.policies)
    listed = r.entries(value_node(items, "priorities"), "throttle.priorities")
    r.unknown(listed, set(PRIORITIES), "throttle.priorities")
    for name, (_, spec) in listed.items():
        if name not in PRIORITIES:
            continue
        what = f"throttle.priorities.{name}"
        item = r.entries(spec, what)
        r.unknown(item, {"delay_below", "deny_below"}, what)
        base = policies[name]
        delay = float(r.number(item, "delay_below", what, base.delay_below, maximum=1.0))
        deny = float(r.number(item, "deny_below", what, base.deny_below, maximum=1.0))
        if deny > delay:
            r.bad(
                spec, f"{what}: deny_below must not exceed delay_below (requests are delayed before denied)"
            )
        policies[name] = PriorityPolicy(delay, deny)
    return Throttle(
        stale_after=r.duration(items, "stale_after", "throttle", default.stale_after),
        max_delay=r.duration(items, "max_delay", "throttle", default.max_delay),
        policies=policies,
    )


def load_tiers(path: str | Path) -> TiersConfig:
    try:
        text = read_text(path, "tiers file")
    except YamlFileError as exc:
        raise TiersError(exc.problems) from exc
    return parse_tiers(text, str(path))

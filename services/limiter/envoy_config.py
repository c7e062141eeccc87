"""envoyproxy/ratelimit configuration files: domains of nested descriptors with rate limits.

The format operators already run with Envoy and Istio:

    domain: api
    descriptors:
      - key: remote_address            # key only: one counter per value
        rate_limit: {unit: second, requests_per_unit: 10}
      - key: path
        value: /admin*                 # `*` anywhere in a value matches any run of characters
        share_threshold: true          # ...and every matching value shares one counter
        rate_limit: {unit: minute, requests_per_unit: 5, name: admin}
        shadow_mode: true
      - key: plan
        value: gold
        descriptors:
          - key: user
            rate_limit: {unit: hour, requests_per_unit: 1000, replaces: [{name: admin}]}
            detailed_metric: true

Every key upstream documents is read and means what it means there (`unit_multiplier`,
`shadow_mode`, `replaces`, `unlimited`, `detailed_metric`, `value_to_metric`, `share_threshold`,
free-form `metadata`). Validation follows envoyproxy/ratelimit (unknown keys, bad units, empty
keys, duplicate composite keys and domains are errors naming the file).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.kit.yamlfile import YamlFileError, load, read_text
from services.limiter.reload import yaml_files

# envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit numbers, and their lengths, as
# envoyproxy/ratelimit counts them (a month is 30 days, a year 365).
UNITS: dict[str, tuple[int, int]] = {
    "second": (1, 1_000),
    "minute": (2, 60_000),
    "hour": (3, 3_600_000),
    "day": (4, 86_400_000),
    "month": (5, 30 * 86_400_000),
    "year": (6, 365 * 86_400_000),
    "week": (7, 7 * 86_400_000),
}
UNIT_MS = {number: ms for number, ms in UNITS.values()}

# Every key envoyproxy/ratelimit's file format documents. `metadata` holds free-form data of the
# operator's own (its keys are not checked); the others are checked recursively, as upstream does.
_VALID_KEYS = {
    "domain",
    "key",
    "value",
    "descriptors",
    "rate_limit",
    "unit",
    "unit_multiplier",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "name",
    "replaces",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
}
_FREE_FORM = {"metadata"}


class EnvoyConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EnvoyLimit:
    # domain.key_value.key... as in envoyproxy/ratelimit's stats keys.
    full_key: str
    requests_per_unit: int
    unit: int
    unlimited: bool = False
    shadow: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False
    # The window is `unit_multiplier` units long (upstream's `unit_multiplier`).
    unit_multiplier: int = 1

    @property
    def window_ms(self) -> int:
        return UNIT_MS[self.unit] * self.unit_multiplier


@dataclass(frozen=True, slots=True)
class Match:
    """The limit a descriptor falls under, and the names its counter and statistics go by."""

    limit: EnvoyLimit
    # Stats key (domain.key_value...), with runtime values where value_to_metric or
    # detailed_metric ask for them.
    stats_key: str
    # The counter's identity: the request's (key, value) pairs, a wildcard's pattern in place of
    # the value where share_threshold makes every matching value share one counter.
    counter: tuple[tuple[str, str], ...]


@dataclass
class Node:
    children: dict[str, Node] = field(default_factory=dict)
    # (key, value pattern with `*`, compiled pattern, node) in file order
    wildcards: list[tuple[str, str, re.Pattern[str], Node]] = field(default_factory=list)
    limit: EnvoyLimit | None = None
    # The config's own name for this level: `key` or `key_value` (a pattern keeps its `*`).
    final_key: str = ""
    share_threshold: bool = False
    value_to_metric: bool = False
    # Free-form data from the file (upstream's descriptor `metadata`), kept with the descriptor.
    metadata: dict[str, Any] = field(default_factory=dict)


def _glob(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters (none included), anywhere and any number of times."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


@dataclass(frozen=True)
class EnvoyConfig:
    domains: dict[str, Node]

    def find(self, domain: str, entries: Sequence[tuple[str, str]]) -> Match | None:
        """The limit for one descriptor, or None (unconfigured: the caller answers OK).

        As envoyproxy/ratelimit: at each level an exact `key_value` first, then the wildcard
        values in file order, then the key alone; the limit applies only when the descriptor
        ends at a level that has one.
        """
        root = self.domains.get(domain)
        if root is None:
            return None
        level = root
        found: EnvoyLimit | None = None
        metric: list[str] = []
        counter: list[tuple[str, str]] = []
        for i, (key, value) in enumerate(entries):
            node = level.children.get(f"{key}_{value}")
            wildcard = False
            if node is None:
                node = next((n for k, _, rx, n in level.wildcards if k == key and rx.fullmatch(value)), None)
                wildcard = node is not None
            if node is None:
                node = level.children.get(key)
            if node is None:
                return None
            shared = wildcard and node.share_threshold
            counter.append((key, node.final_key[len(key) + 1 :] if shared else value))
            explicit = node.final_key != key and not wildcard
            if node.value_to_metric and not shared and not explicit:
                metric.append(f"{key}_{value}")
            else:
                metric.append(node.final_key)
            if node.limit is not None and i == len(entries) - 1:
                found = node.limit
            if not node.children and not node.wildcards:
                break
            level = node
        if found is None:
            return None
        if found.detailed_metric and entries:
            stats_key = f"{found.full_key}_{entries[-1][1]}"
        else:
            stats_key = domain + "." + ".".join(metric)
        return Match(found, stats_key, tuple(counter))


def _validate_keys(name: str, data: Any) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str) or key not in _VALID_KEYS:
                raise EnvoyConfigError(f"{name}: config error, unknown key '{key}'")
            if key in _FREE_FORM:
                if value is not None and not isinstance(value, dict):
                    raise EnvoyConfigError(f"{name}: config error, '{key}' must be a map")
                continue
            _validate_keys(name, value)
    elif isinstance(data, list):
        for item in data:
            if not isinstance(item, dict):
                raise EnvoyConfigError(
                    f"{name}: config error, yaml file contains list of type other than map"
                )
            _validate_keys(name, item)
    elif data is not None and not isinstance(data, str | int | bool):
        raise EnvoyConfigError(f"{name}: config error, unsupported value {data!r}")


def _text(scalar: Any) -> str:
    """A YAML scalar as upstream's Go YAML reads it into a string (`true`, not Python's `True`)."""
    if scalar is None:
        return ""
    if isinstance(scalar, bool):
        return "true" if scalar else "false"
    return str(scalar)


def _flag(name: str, full_key: str, d: dict[str, Any], key: str) -> bool:
    value = d.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise EnvoyConfigError(f"{name}: {key} of '{full_key}' must be true or false")
    return value


def _load_descriptors(name: str, parent: Node, parent_key: str, descriptors: Any) -> None:
    if descriptors is None:
        return
    if not isinstance(descriptors, list):
        raise EnvoyConfigError(f"{name}: descriptors must be a list")
    for d in descriptors:
        key = _text(d.get("key"))
        if not key:
            raise EnvoyConfigError(f"{name}: descriptor has empty key")
        value = _text(d.get("value"))
        final = f"{key}_{value}" if value else key
        full_key = parent_key + final
        if final in parent.children:
            raise EnvoyConfigError(f"{name}: duplicate descriptor composite key '{full_key}'")
        node = Node(
            final_key=final,
            share_threshold=_flag(name, full_key, d, "share_threshold"),
            value_to_metric=_flag(name, full_key, d, "value_to_metric"),
            metadata=dict(d.get("metadata") or {}),
        )
        rl = d.get("rate_limit")
        if rl is not None:
            node.limit = _load_limit(name, full_key, d, rl)
        _load_descriptors(name, node, full_key + ".", d.get("descriptors"))
        parent.children[final] = node
        if "*" in value:
            parent.wildcards.append((key, value, _glob(value), node))


def _load_limit(name: str, full_key: str, d: dict[str, Any], rl: Any) -> EnvoyLimit:
    if not isinstance(rl, dict):
        raise EnvoyConfigError(f"{name}: rate_limit of '{full_key}' must be a map")
    unlimited = bool(rl.get("unlimited", False))
    unit_name = str(rl.get("unit") or "").lower()
    if unlimited:
        if unit_name in UNITS:
            raise EnvoyConfigError(f"{name}: should not specify rate limit unit when unlimited")
        unit = 0
    else:
        if unit_name not in UNITS:
            raise EnvoyConfigError(f"{name}: invalid rate limit unit '{rl.get('unit')}'")
        unit = UNITS[unit_name][0]
    rpu = rl.get("requests_per_unit", 0)
    if isinstance(rpu, bool) or not isinstance(rpu, int) or not 0 <= rpu <= 2**32 - 1:
        raise EnvoyConfigError(
            f"{name}: requests_per_unit of '{full_key}' must be an integer from 0 to 2^32-1"
        )
    multiplier = rl.get("unit_multiplier", 1)
    if isinstance(multiplier, bool) or not isinstance(multiplier, int) or not 1 <= multiplier <= 2**32 - 1:
        raise EnvoyConfigError(f"{name}: unit_multiplier of '{full_key}' must be an integer from 1 to 2^32-1")
    limit_name = str(rl.get("name") or "")
    replaces = []
    for item in rl.get("replaces") or []:
        replaced = str(item.get("name") or "")
        if not replaced:
            raise EnvoyConfigError(f"{name}: should not have an empty replaces entry")
        if replaced == limit_name:
            raise EnvoyConfigError(f"{name}: replaces should not contain name of same descriptor")
        replaces.append(replaced)
    return EnvoyLimit(
        full_key=full_key,
        requests_per_unit=rpu,
        unit=unit,
        unlimited=unlimited,
        shadow=_flag(name, full_key, d, "shadow_mode"),
        name=limit_name,
        replaces=tuple(replaces),
        detailed_metric=_flag(name, full_key, d, "detailed_metric"),
        unit_multiplier=multiplier,
    )


def parse_envoy_config(documents: Sequence[tuple[str, Any]]) -> EnvoyConfig:
    """(file name, parsed YAML) pairs into one config; a domain may appear in one file only."""
    domains: dict[str, Node] = {}
    for name, data in documents:
        if data is None:
            continue
        if not isinstance(data, dict):
            raise EnvoyConfigError(f"{name}: expected a map with `domain` and `descriptors`")
        _validate_keys(name, data)
        domain = str(data.get("domain") or "")
        if not domain:
            raise EnvoyConfigError(f"{name}: config file cannot have empty domain")
        if domain in domains:
            raise EnvoyConfigError(f"{name}: duplicate domain '{domain}' in config file")
        root = Node()
        _load_descriptors(name, root, domain + ".", data.get("descriptors"))
        domains[domain] = root
    return EnvoyConfig(domains)


def load_envoy_config(path: Path) -> EnvoyConfig:
    """One YAML file, or every *.yaml / *.yml file of a directory."""
    documents = []
    for file in yaml_files(path):
        try:
            documents.append((file.name, load(read_text(file, "Envoy config file"), str(file))))
        except YamlFileError as exc:
            raise EnvoyConfigError("\n".join(exc.problems)) from exc
    return parse_envoy_config(documents)

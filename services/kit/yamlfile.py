"""Reading a user-edited YAML file with every problem reported at its line.

Config files (the router's catalog, the limiter's tiers, Envoy descriptors, the cache policy,
API keys) are read from YAML nodes rather than plain dicts, so that a mistake is reported as
`catalog.yaml:12: models.gpt.input_price_micros_per_mtok: expected a number, got 'ten'`, and
all mistakes of a file at once: an operator fixes a file in one go, not one error per restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from services.kit.config import DURATION_EXAMPLES, parse_duration


class YamlFileError(ValueError):
    """A config file is unreadable or invalid; `problems` holds one located message each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# One entry of a mapping: its key's node and its value's node (each knows its line).
Entry = tuple[yaml.Node, yaml.Node]


def is_null(node: yaml.Node) -> bool:
    """Whether the node is an empty value (`key:`, `~` or `null`)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def value_node(items: Mapping[str, Entry], key: str) -> yaml.Node | None:
    """The value's node of `key` (None when not written), for a section read by its own function."""
    return items[key][1] if key in items else None


class Items(dict[str, Entry]):
    """A mapping's entries by key (key node, value node), remembering the mapping's own node."""

    def __init__(self, node: yaml.Node) -> None:
        super().__init__()
        self.node = node


def compose(text: str, source: str) -> yaml.Node | None:
    """The document's node tree (None if empty); a syntax error names its line."""
    try:
        node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise YamlFileError([f"{source}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from exc
    return node


def load(text: str, source: str) -> Any:
    """The document as plain data (None if empty), for a format whose rules are another
    program's and are written over plain values (envoyproxy/ratelimit's descriptor files);
    a syntax error names its line as compose's does."""
    node = compose(text, source)
    return None if node is None else yaml.SafeLoader("").construct_document(node)


def read_text(path: str | Path, what: str) -> str:
    """The file's text; an unreadable file is a YamlFileError naming it and why."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise YamlFileError([f"{path}: cannot read the {what} ({exc.strerror or exc})"]) from exc


def _at(what: str, key: str) -> str:
    """The dotted path of `key` inside `what`; an empty `what` is the file's top level."""
    return f"{what}.{key}" if what else key


class YamlReader:
    """Validating accessors over a composed document; problems collect in `problems`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def bad(self, node: yaml.Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.source}:{line}: {message}")

    def check(self) -> None:
        """Raises YamlFileError listing every problem found so far."""
        if self.problems:
            raise YamlFileError(self.problems)

    def mapping(self, node: yaml.Node, what: str) -> Items | None:
        if not isinstance(node, yaml.MappingNode):
            self.bad(node, f"{what} must be a mapping")
            return None
        out = Items(node)
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                self.bad(key, f"{what}: keys must be plain names")
                continue
            if key.value in out:
                self.bad(key, f"{what}: duplicate key {key.value!r}")
            out[key.value] = (key, value)
        return out

    def entries(self, node: yaml.Node | None, what: str) -> Mapping[str, Entry]:
        """A mapping's entries where leaving something empty (`key:`) means not writing it: an
        absent or empty mapping has no entries and an empty value is left out (its default applies)."""
        if node is None or is_null(node):
            return {}
        items = self.mapping(node, what)
        if items is None:
            return {}
        kept = Items(node)
        kept.update((name, entry) for name, entry in items.items() if not is_null(entry[1]))
        return kept

    def unknown(self, items: Mapping[str, tuple[yaml.Node, yaml.Node]], allowed: set[str], what: str) -> None:
        for name, (key, _) in items.items():
            if name not in allowed:
                self.bad(key, f"{what}: unknown key {name!r} (allowed: {', '.join(sorted(allowed))})")

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.bad(node, f"{what} must be a single value")
            return None
        return yaml.safe_load(yaml.serialize(node))

    def sequence(self, node: yaml.Node, what: str) -> Iterator[tuple[int, yaml.Node]]:
        """The items of a list with their index; anything else is a problem and yields nothing."""
        if not isinstance(node, yaml.SequenceNode):
            self.bad(node, f"{what} must be a list")
            return
        yield from enumerate(node.value)

    def each(self, node: yaml.Node, what: str, fn: Callable[[yaml.Node, int], None]) -> None:
        for index, item in self.sequence(node, what):
            fn(item, index)

    def string(
        self,
        items: Mapping[str, tuple[yaml.Node, yaml.Node]],
        key: str,
        what: str,
        default: str | None = None,
        choices: tuple[str, ...] = (),
    ) -> str:
        if key not in items:
            if default is None:
                self.bad(getattr(items, "node", None), f"{what}: {key} is required")
                return ""
            return default
        node = items[key][1]
        value = self.scalar(node, _at(what, key))
        if value is None:
            return default or ""
        text = str(value)
        if choices and text not in choices:
            self.bad(node, f"{_at(what, key)}: {text!r} is not one of {', '.join(choices)}")
        return text

    def number(
        self,
        items: Mapping[str, tuple[yaml.Node, yaml.Node]],
        key: str,
        what: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        integer: bool = False,
    ) -> Any:
        if key not in items:
            return default
        node = items[key][1]
        value = self.scalar(node, _at(what, key))
        kind = "an integer" if integer else "a number"
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            self.bad(node, f"{_at(what, key)}: expected {kind}, got {value!r}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            limit = f"from {minimum:g} to {maximum:g}" if maximum is not None else f"at least {minimum:g}"
            self.bad(node, f"{_at(what, key)}: {value!r} must be {limit}")
            return default
        return value

    def boolean(
        self, items: Mapping[str, tuple[yaml.Node, yaml.Node]], key: str, what: str, default: bool
    ) -> bool:
        if key not in items:
            return default
        node = items[key][1]
        value = self.scalar(node, _at(what, key))
        if not isinstance(value, bool):
            self.bad(node, f"{_at(what, key)}: expected true or false, got {value!r}")
            return default
        return value

    def duration(
        self,
        items: Mapping[str, tuple[yaml.Node, yaml.Node]],
        key: str,
        what: str,
        default: float,
        *,
        maximum: float | None = None,
        allow_zero: bool = False,
    ) -> float:
        """Seconds from a positive number or a duration text such as 500ms, 30s, 10m, 1h or 1d
        (or 0 where `allow_zero`, for a TTL whose 0 means "never keep")."""
        if key not in items:
            return default
        node = items[key][1]
        value = self.scalar(node, _at(what, key))
        seconds: float | None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            seconds = parse_duration(value) if isinstance(value, str) else None
        if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero):
            kind = "a duration (0 or more)" if allow_zero else "a positive duration"
            self.bad(node, f"{_at(what, key)}: expected {kind} such as {DURATION_EXAMPLES}")
            return default
        if maximum is not None and seconds > maximum:
            self.bad(node, f"{_at(what, key)}: must be at most {maximum:g}s, got {seconds:g}s")
            return default
        return seconds

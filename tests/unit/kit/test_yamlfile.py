"""The shared YAML reader: every problem of a file at once, each at its line."""

from __future__ import annotations

import pytest
import yaml

from services.kit.config import parse_duration
from services.kit.yamlfile import YamlFileError, YamlReader, compose, load

DOC = """\
name: limiter
count: ten
ratio: 0.5
window: 90s
never: -1s
enabled: maybe
extra: 1
kind: blue
items: [1, 2]
"""


def test_every_problem_is_reported_with_its_line() -> None:
    node = compose(DOC, "tiers.yaml")
    assert node is not None
    reader = YamlReader("tiers.yaml")
    items = reader.mapping(node, "root")
    assert items is not None
    reader.unknown(items, {"name", "count", "ratio", "window", "never", "enabled", "kind", "items"}, "root")
    assert reader.string(items, "name", "root") == "limiter"
    assert reader.number(items, "count", "root", 3, integer=True) == 3
    assert reader.number(items, "ratio", "root", 1.0, maximum=1.0) == 0.5
    assert reader.duration(items, "window", "root", 1.0) == 90.0
    assert reader.duration(items, "never", "root", 7.0) == 7.0
    assert reader.boolean(items, "enabled", "root", True) is True
    assert reader.string(items, "kind", "root", "red", choices=("red", "green")) == "blue"
    assert [index for index, _ in reader.sequence(items["items"][1], "root.items")] == [0, 1]
    assert reader.problems == [
        "tiers.yaml:7: root: unknown key 'extra' (allowed: count, enabled, items, kind, name, never, ratio, window)",
        "tiers.yaml:2: root.count: expected an integer, got 'ten'",
        "tiers.yaml:5: root.never: expected a positive duration such as 250ms, 5s, 2m, 1h or 1d",
        "tiers.yaml:6: root.enabled: expected true or false, got 'maybe'",
        "tiers.yaml:8: root.kind: 'blue' is not one of red, green",
    ]
    with pytest.raises(YamlFileError) as info:
        reader.check()
    assert info.value.problems == reader.problems


def test_duplicate_keys_and_syntax_errors_are_located() -> None:
    node = compose("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert node is not None
    reader = YamlReader("f.yaml")
    reader.mapping(node, "root")
    assert reader.problems == ["f.yaml:3: root: duplicate key 'a'"]
    with pytest.raises(YamlFileError, match=r"f.yaml:2: not valid YAML"):
        compose("a: [1,\nb: }\n", "f.yaml")


def test_a_duration_has_one_reading() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120.0
    assert parse_duration("1D") == 86400.0
    assert parse_duration("3") == 3.0
    assert parse_duration("soon") is None
    assert parse_duration("-1s") is None


def test_load_gives_the_plain_data_safe_load_gives_and_locates_syntax_errors() -> None:
    text = "a: 1\nb: [x, {c: true, d: 2020-01-01}]\nbase: &base {e: 2}\nf: {<<: *base, g: ~}\n"
    assert load(text, "f.yaml") == yaml.safe_load(text)
    assert load("", "f.yaml") is None
    with pytest.raises(YamlFileError) as info:
        load("a: 1\nb: [\n", "f.yaml")
    assert info.value.problems[0].startswith("f.yaml:3: not valid YAML")

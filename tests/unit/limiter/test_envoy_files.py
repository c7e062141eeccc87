"""Reading envoyproxy/ratelimit files from disk: what the file says is what the text says, and a
file that is not YAML is refused naming its line (the kit's reader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.limiter.envoy_config import EnvoyConfigError, load_envoy_config, parse_envoy_config

GOOD = """\
domain: files
descriptors:
  - key: flag
    value: true
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: n
    value: 42
"""


def test_a_directory_reads_as_its_parsed_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "ignored.txt").write_text("not: [yaml")
    loaded = load_envoy_config(tmp_path)
    expected = parse_envoy_config([("a.yaml", yaml.safe_load(GOOD))])
    assert loaded == expected and set(loaded.domains["files"].children) == {"flag_true", "n_42"}


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text("domain: b\ndescriptors: [\n")
    with pytest.raises(EnvoyConfigError, match=rf"{tmp_path / 'b.yaml'}:3: not valid YAML"):
        load_envoy_config(tmp_path)

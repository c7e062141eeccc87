"""The catalog file: the shipped one loads offline, and every mistake names its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.config import ConfigError, Env
from services.router.catalog import CatalogError, Strategy, load_catalog, parse_catalog
from services.router.config import RouterSettings

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "config" / "router_catalog.yaml"


def test_shipped_catalog_works_offline_with_sims_only() -> None:
    catalog = load_catalog(SHIPPED)
    enabled = {p.name for p in catalog.providers.values() if p.enabled}
    assert enabled == {"sim-primary", "sim-secondary"}
    assert {"reasoning", "fast", "budget"} <= set(catalog.aliases)
    assert catalog.aliases["budget"].strategy is Strategy.LOWEST_COST
    assert catalog.tier_defaults["default"] == "fast"
    assert catalog.models["sim-large"].input_price_micros_per_mtok == 2_000_000
    assert all(p.sim is not None for p in catalog.providers.values() if p.kind == "sim")


def test_a_key_variable_enables_the_real_provider() -> None:
    keys = {"OPENAI_API_KEY": "sk-test"}
    catalog = load_catalog(SHIPPED, keys.get)
    assert catalog.providers["openai"].enabled
    assert catalog.providers["openai"].api_key == "sk-test"
    assert not catalog.providers["anthropic"].enabled


def _problems(text: str) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, "cat.yaml")
    return info.value.problems


def test_errors_name_the_line() -> None:
    text = """providers:
  p:
    kind: openai
    base_url: https://x/v1
models:
  m:
    provider: p
    context_window: lots
  n:
    provider: nobody
aliases:
  budget:
    candidates: [m, ghost]
  reasoning:
    strategy: fastest
    candidates: [m]
tier_defaults:
  default: budget
  free: nothing
"""
    problems = _problems(text)
    assert "cat.yaml:8: models.m.context_window: expected an integer, got 'lots'" in problems
    assert "cat.yaml:10: models.n.provider: unknown provider 'nobody'" in problems
    assert "cat.yaml:13: aliases.budget.candidates[1]: unknown model 'ghost'" in problems
    assert any(p.startswith("cat.yaml:15: aliases.reasoning.strategy") for p in problems)
    assert any(p.startswith("cat.yaml:19: tier_defaults.free") for p in problems)


def test_unknown_keys_and_bad_yaml_are_reported() -> None:
    assert any(
        "unknown key 'colour'" in p and p.startswith("cat.yaml:3:")
        for p in _problems(
            "providers:\n  p:\n    colour: red\n    kind: sim\nmodels: {}\ntier_defaults: {default: x}\n"
        )
    )
    bad = _problems("providers: [\n")
    assert bad[0].startswith("cat.yaml:") and "not valid YAML" in bad[0]


def test_a_bad_catalog_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("providers: {}\nmodels:\n  m: {provider: none}\n")
    env = Env({"BALLAST_ROUTER_CATALOG_FILE": str(path)})
    RouterSettings.from_env(env)
    with pytest.raises(ConfigError) as info:
        env.check()
    assert "BALLAST_ROUTER_CATALOG_FILE" in str(info.value)
    assert f"{path}:3: models.m.provider: unknown provider 'none'" in str(info.value)


def test_missing_catalog_file_is_a_config_error(tmp_path: Path) -> None:
    env = Env({"BALLAST_ROUTER_CATALOG_FILE": str(tmp_path / "missing.yaml")})
    RouterSettings.from_env(env)
    with pytest.raises(ConfigError, match="cannot read the catalog"):
        env.check()


def test_router_variables_are_validated() -> None:
    env = Env({"BALLAST_ROUTER_BREAKER_FAILURES": "0", "BALLAST_ROUTER_ATTEMPT_TIMEOUT": "soon"})
    RouterSettings.from_env(env)
    with pytest.raises(ConfigError) as info:
        env.check()
    assert "BALLAST_ROUTER_BREAKER_FAILURES" in str(info.value)
    assert "BALLAST_ROUTER_ATTEMPT_TIMEOUT" in str(info.value)

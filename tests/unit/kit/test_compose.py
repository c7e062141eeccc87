"""No Docker engine runs here, so compose.yaml and the Dockerfile are checked against the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import registry
from services.edge.config import EdgeSettings
from services.kit.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, SERVICE_NAMES, Env

ROOT = Path(__file__).resolve().parents[3]
INFRA = {"redis", "postgres", "jaeger"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _known_variables() -> set[str]:
    env = Env({})
    for name in SERVICE_NAMES:
        registry.load_settings(name, env)
    return env.known


def test_every_service_and_backend_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(SERVICE_NAMES) | INFRA


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_service_command_port_and_health_check_match_the_code(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    port = DEFAULT_PORTS[name]
    assert service["command"] == ["serve", name]
    metrics = DEFAULT_METRICS_PORTS[name]
    # The edge also serves the OpenAI-compatible HTTP API.
    http = [f"{EdgeSettings.http_port}:{EdgeSettings.http_port}"] if name == "edge" else []
    assert service["ports"] == [f"{port}:{port}", f"{metrics}:{metrics}", *http]
    probe = service["healthcheck"]["test"]
    assert probe[:4] == ["CMD", "python", "-m", "services.kit.healthcheck"]
    assert probe[4] == f"127.0.0.1:{port}"


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"][0] == "CMD"


def test_environment_variables_exist_in_the_code(compose: dict[str, Any]) -> None:
    known = _known_variables()
    for name in SERVICE_NAMES:
        environment = compose["services"][name]["environment"]
        for variable, value in environment.items():
            if variable.startswith("BALLAST_"):
                assert variable in known, f"{name}: {variable} is not read by any service"
            if variable.endswith("_ADDR"):
                target = variable.removeprefix("BALLAST_").removesuffix("_ADDR").lower()
                assert value == f"{target}:{DEFAULT_PORTS[target]}", f"{variable}={value}"
        # The settings the compose file gives must pass the services' own validation.
        env = Env({k: str(v) for k, v in environment.items()})
        registry.load_settings(name, env)
        env.check()


def test_dependencies_name_services_with_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert rule["condition"] == "service_healthy", f"{name} -> {dependency}"
    assert set(services["edge"]["depends_on"]) >= {"router", "limiter", "cache", "sessions"}


def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path.rstrip("/")).exists(), f"Dockerfile copies missing {path}"
    assert 'ENTRYPOINT ["ballast"]' in dockerfile
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ballast"] == "services.cli:main"

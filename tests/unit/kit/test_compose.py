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
from services.kit.certs import make_certs
from services.kit.config import DEFAULT_HEALTH_PORTS, DEFAULT_METRICS_PORTS, DEFAULT_PORTS, SERVICE_NAMES, Env

ROOT = Path(__file__).resolve().parents[3]
INFRA = {"redis", "postgres", "jaeger", "prometheus", "grafana"}
# One-shot jobs the services wait for (condition: service_completed_successfully).
JOBS = {"certs"}
INTERNAL = [name for name in SERVICE_NAMES if name != "edge"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _interpolate(value: str) -> str:
    """What compose makes of ${VAR:?error} and ${VAR:-default}, with .env.example as the .env."""
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )

    def substitute(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if name in example:
            return example[name]
        assert operator == ":-", f"${{{name}}} is required but .env.example does not set it"
        return rest

    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", substitute, value)


def _known_variables() -> set[str]:
    env = Env({})
    for name in SERVICE_NAMES:
        registry.load_settings(name, env)
    return env.known


def test_every_service_and_backend_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(SERVICE_NAMES) | INFRA | JOBS


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_service_command_port_and_health_check_match_the_code(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    port = DEFAULT_PORTS[name]
    assert service["command"] == ["serve", name]
    metrics = DEFAULT_METRICS_PORTS[name]
    probe = service["healthcheck"]["test"]
    assert probe[:4] == ["CMD", "python", "-m", "services.kit.healthcheck"]
    if name == "edge":
        # gRPC and the OpenAI-compatible HTTP API.
        assert service["ports"] == [f"{port}:{port}", f"{EdgeSettings.http_port}:{EdgeSettings.http_port}"]
        assert service["expose"] == [str(metrics)]
        assert probe[4] == f"127.0.0.1:{port}"
    else:
        # The main port needs a client certificate; probes use the plaintext health-only port.
        health = DEFAULT_HEALTH_PORTS[name]
        assert "ports" not in service
        assert service["expose"] == [str(port), str(health), str(metrics)]
        assert probe[4] == f"127.0.0.1:{health}"


def test_only_the_edge_and_the_local_operator_uis_are_published(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if "ports" in s}
    assert published == {
        "edge": ["50051:50051", f"{EdgeSettings.http_port}:{EdgeSettings.http_port}"],
        # Operator UIs, on the host's loopback only.
        "jaeger": ["127.0.0.1:16686:16686"],
        "prometheus": ["127.0.0.1:9090:9090"],
        "grafana": ["127.0.0.1:3000:3000"],
    }


def test_backends_need_credentials_that_compose_requires(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_password = "${BALLAST_REDIS_PASSWORD:?"
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1].startswith(redis_password)
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith(redis_password)
    stores = {
        "router": "BALLAST_ROUTER_STORE",
        "limiter": "BALLAST_LIMITER_STORE",
        "cache": "BALLAST_CACHE_STORE",
        "edge": "BALLAST_EDGE_STORE",
    }
    for name, variable in stores.items():
        assert services[name]["environment"][variable].startswith(f"redis://:{redis_password}"), name
    postgres_password = "${BALLAST_POSTGRES_PASSWORD:?"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(postgres_password)
    assert postgres_password in services["sessions"]["environment"]["BALLAST_SESSIONS_STORE"]
    assert services["edge"]["environment"]["BALLAST_EDGE_ADMIN_KEY"].startswith("${BALLAST_EDGE_ADMIN_KEY:?")
    grafana_password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert grafana_password.startswith("${GRAFANA_ADMIN_PASSWORD:?")
    example = (ROOT / ".env.example").read_text()
    for variable in (
        "BALLAST_REDIS_PASSWORD",
        "BALLAST_POSTGRES_PASSWORD",
        "BALLAST_EDGE_ADMIN_KEY",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        assert f"\n{variable}=" in example


def test_every_service_uses_mtls_with_the_certificates_of_the_certs_job(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["certs"]["command"] == ["certs", "/certs"]
    assert services["certs"]["volumes"] == ["certs:/certs"]
    for name in SERVICE_NAMES:
        service = services[name]
        assert service["volumes"] == ["certs:/certs:ro"]
        assert service["depends_on"]["certs"] == {"condition": "service_completed_successfully"}
        environment = service["environment"]
        assert environment["BALLAST_TLS_CERT_FILE"] == f"/certs/{name}/tls.crt"
        assert environment["BALLAST_TLS_KEY_FILE"] == f"/certs/{name}/tls.key"
        assert environment["BALLAST_TLS_CA_FILE"] == f"/certs/{name}/ca.crt"
        assert "BALLAST_INSECURE_INTERNAL" not in environment


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in JOBS:
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"][0] == "CMD"


def test_environment_variables_exist_in_the_code(compose: dict[str, Any], tmp_path: Path) -> None:
    known = _known_variables()
    # The files `ballast certs /certs` writes in the certs job, made here by the same code.
    make_certs(tmp_path, SERVICE_NAMES)
    for name in SERVICE_NAMES:
        environment = {
            variable: _interpolate(value).replace("/certs/", f"{tmp_path}/")
            if isinstance(value, str)
            else value
            for variable, value in compose["services"][name]["environment"].items()
        }
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
            expected = "service_completed_successfully" if dependency in JOBS else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {dependency}"
    assert set(services["edge"]["depends_on"]) >= {"router", "limiter", "cache", "sessions"}


def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path.rstrip("/")).exists(), f"Dockerfile copies missing {path}"
    assert 'ENTRYPOINT ["ballast"]' in dockerfile
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ballast"] == "services.cli:main"

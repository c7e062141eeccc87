"""Typed settings from `BALLAST_*` environment variables, validated at start-up.

Every problem names the variable and what it accepts, and all problems are reported
at once, so a bad deployment fails before it serves a single call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from services.kit import tls

PREFIX = "BALLAST_"

# Well-known ports of the suite; each is overridable with BALLAST_<SERVICE>_PORT.
DEFAULT_PORTS: dict[str, int] = {
    "edge": 50051,
    "router": 50052,
    "limiter": 50053,
    "cache": 50054,
    "sessions": 50055,
}
SERVICE_NAMES: tuple[str, ...] = tuple(DEFAULT_PORTS)
# Prometheus text endpoints (/metrics), one per service; BALLAST_<SERVICE>_METRICS_PORT overrides.
DEFAULT_METRICS_PORTS: dict[str, int] = {name: 9451 + index for index, name in enumerate(DEFAULT_PORTS)}
# Plaintext ports serving only grpc.health.v1, opened when the main port serves TLS (Kubernetes'
# gRPC probe speaks plaintext); BALLAST_<SERVICE>_HEALTH_PORT overrides.
DEFAULT_HEALTH_PORTS: dict[str, int] = {name: port + 10 for name, port in DEFAULT_PORTS.items()}
# The one service the public calls; the others trust the caller their peers name.
PUBLIC_SERVICE = "edge"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
DURATION_EXAMPLES = "250ms, 5s, 2m, 1h or 1d"


def parse_duration(text: str) -> float | None:
    """Seconds from '250ms', '5s', '2m', '1h', '1d' or a plain number of seconds; None if not one.

    The one reading of a duration in Ballast's settings and config files."""
    match = _DURATION.match(text.lower())
    return None if match is None else float(match.group(1)) * _DURATION_UNITS[match.group(2)]


class ConfigError(ValueError):
    """One or more settings are invalid; the message names every bad variable."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class Env:
    """Reads and validates variables, collecting every problem before raising."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self.problems: list[str] = []
        # Every variable asked for, so tests can check deployment files against the code.
        self.known: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.known.add(name)
        value = self._environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def _bad(self, name: str, value: str, expected: str) -> None:
        self.problems.append(f"{name}={value!r} is invalid: expected {expected}")

    def string(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        expected = _range_text("an integer", minimum, maximum)
        try:
            number = int(value)
        except ValueError:
            self._bad(name, value, expected)
            return default
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            self._bad(name, value, expected)
            return default
        return number

    def number(
        self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        expected = _range_text("a number", minimum, maximum)
        try:
            number = float(value)
        except ValueError:
            self._bad(name, value, expected)
            return default
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            self._bad(name, value, expected)
            return default
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self._bad(name, value, "one of true, false (or 1, 0, yes, no, on, off)")
        return default

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        allowed = list(choices)
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() not in allowed:
            self._bad(name, value, "one of " + ", ".join(allowed))
            return default
        return value.lower()

    def duration(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """Seconds, from '250ms', '5s', '2m', '1h', '1d' or a plain number of seconds."""
        value = self.raw(name)
        if value is None:
            return default
        seconds = parse_duration(value)
        expected = f"a duration such as {DURATION_EXAMPLES} (at least {minimum:g}s)"
        if seconds is None or seconds < minimum:
            self._bad(name, value, expected)
            return default
        return seconds

    def url(self, name: str, default: str, schemes: Iterable[str]) -> str:
        allowed = list(schemes)
        value = self.raw(name)
        if value is None:
            return default
        scheme = urlsplit(value).scheme
        if scheme not in allowed:
            self._bad(name, value, "a URL starting with " + " or ".join(f"{s}://" for s in allowed))
            return default
        return value

    def address(self, name: str, default: str) -> str:
        """Where another Ballast service is: host:port, several replicas as host:port,host:port
        (balanced round robin), or a gRPC target such as dns:///router:50052."""
        value = self.raw(name)
        if value is None:
            return default
        if value.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
            return value
        for part in value.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                self._bad(
                    name,
                    value,
                    "host:port (for example 127.0.0.1:50052), a comma-separated list of replicas, "
                    "or a gRPC target such as dns:///router:50052",
                )
                return default
        return value

    def check(self) -> None:
        if self.problems:
            # Settings shared by several services (the TLS files) would repeat their problem once each.
            raise ConfigError(dict.fromkeys(self.problems))


def _bound_text(bound: float) -> str:
    # Whole bounds in full (1048576, not :g's 1.04858e+06); fractions as :g writes them.
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _range_text(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} from {_bound_text(minimum)} to {_bound_text(maximum)}"
    if minimum is not None:
        return f"{kind} of at least {_bound_text(minimum)}"
    if maximum is not None:
        return f"{kind} of at most {_bound_text(maximum)}"
    return kind


LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_REGION = "local"
# A region is a metric label and a resource attribute: short, and safe in both.
_REGION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def region_from_env(env: Env) -> str:
    """BALLAST_REGION: where this replica runs (`cloud.region` on telemetry, `cloud_region` on metrics)."""
    name = f"{PREFIX}REGION"
    value = env.string(name, DEFAULT_REGION)
    if not _REGION.match(value):
        env._bad(
            name, value, "lower-case letters, digits, '.', '_' or '-', at most 63 (for example eu-west-1)"
        )
        return DEFAULT_REGION
    return value


LOG_FORMATS = ("json", "text")
# The event loop a service runs on: uvloop (libuv) spends less CPU per socket event than
# asyncio's own selector loop; asyncio is there for platforms without uvloop and for comparison.
EVENT_LOOPS = ("uvloop", "asyncio")


def _local_address(name: str, env: Env) -> str:
    """Where service `name` listens when it runs on this host: its own port setting, so a suite
    started on moved ports (`BALLAST_ROUTER_PORT=…  ballast up`) still finds itself. Port 0
    (a free port, known only once bound) says nothing; the well-known port stands then."""
    port = env.integer(f"{PREFIX}{name.upper()}_PORT", DEFAULT_PORTS[name], minimum=0, maximum=65535)
    return f"127.0.0.1:{port or DEFAULT_PORTS[name]}"


@dataclass(frozen=True)
class ServerSettings:
    """How one service listens, logs and shuts down."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    grace_period: float = 10.0
    # After draining, how long closing pools and background work may take.
    close_timeout: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    log_format: str = "json"
    # Prompt/completion text in spans and logs: off unless an operator opts in.
    capture_content: bool = False
    # Where this service reaches the others (the edge uses all of them, sessions the router).
    addresses: Mapping[str, str] = field(default_factory=dict)
    # Prometheus endpoint of this service; off with BALLAST_METRICS=false, 0 picks a free port.
    metrics_enabled: bool = True
    metrics_port: int = 0
    # Per-user metric labels multiply series by the user count: off unless an operator opts in.
    metrics_per_user: bool = False
    # Distinct tenants a metric label names; later tenants share the label value `(other)`, so a
    # replica's series stay bounded whatever the callers send.
    metrics_max_tenants: int = 1000
    # TLS on this service's port: mutual for internal services (BALLAST_TLS_*), server-only on the
    # edge's public port (BALLAST_EDGE_TLS_*); None serves plaintext.
    server_tls: tls.TlsFiles | None = None
    # The certificate this service presents when it calls the others, and the CA it trusts.
    client_tls: tls.TlsFiles | None = None
    # Plaintext health-only port (None: health is on the main port only).
    health_port: int | None = None
    region: str = DEFAULT_REGION
    # Readiness follows the backends a service cannot answer without (ServiceApp.backend_probes):
    # each is checked this often, a check slower than the timeout fails, and this many failures
    # in a row turn health NOT_SERVING until one check passes again. Liveness never follows them.
    backend_check_interval: float = 5.0
    backend_check_timeout: float = 2.0
    backend_check_failures: int = 2
    # Calls to another service served by this same process (`ballast up`) skip the socket and go
    # to its handler directly (services/kit/local.py); plaintext channels only.
    local_calls: bool = True
    # glibc malloc arenas of the process (0: the C library's default, eight per core): every
    # thread's arena keeps what it once held mapped (services/kit/native.py).
    malloc_arenas: int = 2
    # Threads of numpy's BLAS (OpenBLAS; 0: its default, one per core), services/kit/native.py.
    blas_threads: int = 1
    # One of EVENT_LOOPS (services/kit/entry.py).
    event_loop: str = "uvloop"
    # Python's garbage collector (services/kit/collector.py): its young generation is collected
    # after this many net allocations (0: Python's default, 700), and what exists once the
    # services have started is frozen out of every later collection.
    gc_young_threshold: int = 10_000
    gc_freeze: bool = True

    @classmethod
    def from_env(cls, service: str, env: Env) -> ServerSettings:
        settings = cls._read(service, env)
        return replace(settings, **_tls_settings(settings, env))

    @classmethod
    def _read(cls, service: str, env: Env) -> ServerSettings:
        # Each default is the field's own (cls.<field>), written once above.
        upper = service.upper()
        return cls(
            service=service,
            host=env.string(f"{PREFIX}HOST", cls.host),
            port=env.integer(f"{PREFIX}{upper}_PORT", DEFAULT_PORTS[service], minimum=0, maximum=65535),
            grace_period=env.duration(f"{PREFIX}GRACE_PERIOD", cls.grace_period),
            close_timeout=env.duration(f"{PREFIX}CLOSE_TIMEOUT", cls.close_timeout, minimum=0.1),
            max_message_bytes=env.integer(
                f"{PREFIX}MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024, maximum=256 * 1024 * 1024
            ),
            log_level=env.choice(f"{PREFIX}LOG_LEVEL", cls.log_level, LOG_LEVELS),
            log_format=env.choice(f"{PREFIX}LOG_FORMAT", cls.log_format, LOG_FORMATS),
            capture_content=env.boolean(f"{PREFIX}CAPTURE_CONTENT", cls.capture_content),
            addresses={
                name: env.address(f"{PREFIX}{name.upper()}_ADDR", _local_address(name, env))
                for name in DEFAULT_PORTS
            },
            metrics_enabled=env.boolean(f"{PREFIX}METRICS", cls.metrics_enabled),
            metrics_per_user=env.boolean(f"{PREFIX}METRICS_PER_USER", cls.metrics_per_user),
            metrics_max_tenants=env.integer(
                f"{PREFIX}METRICS_MAX_TENANTS", cls.metrics_max_tenants, minimum=1, maximum=100_000
            ),
            region=region_from_env(env),
            backend_check_interval=env.duration(
                f"{PREFIX}BACKEND_CHECK_INTERVAL", cls.backend_check_interval, minimum=0.05
            ),
            backend_check_timeout=env.duration(
                f"{PREFIX}BACKEND_CHECK_TIMEOUT", cls.backend_check_timeout, minimum=0.01
            ),
            backend_check_failures=env.integer(
                f"{PREFIX}BACKEND_CHECK_FAILURES", cls.backend_check_failures, minimum=1, maximum=1000
            ),
            local_calls=env.boolean(f"{PREFIX}LOCAL_CALLS", cls.local_calls),
            malloc_arenas=env.integer(f"{PREFIX}MALLOC_ARENAS", cls.malloc_arenas, minimum=0, maximum=1024),
            blas_threads=env.integer(f"{PREFIX}BLAS_THREADS", cls.blas_threads, minimum=0, maximum=1024),
            event_loop=env.choice(f"{PREFIX}EVENT_LOOP", cls.event_loop, EVENT_LOOPS),
            gc_young_threshold=env.integer(
                f"{PREFIX}GC_YOUNG_THRESHOLD", cls.gc_young_threshold, minimum=0, maximum=10_000_000
            ),
            gc_freeze=env.boolean(f"{PREFIX}GC_FREEZE", cls.gc_freeze),
            metrics_port=env.integer(
                f"{PREFIX}{upper}_METRICS_PORT",
                DEFAULT_METRICS_PORTS.get(service, 0),
                minimum=0,
                maximum=65535,
            ),
        )


def _tls_settings(settings: ServerSettings, env: Env) -> dict[str, Any]:
    """TLS of one service. An internal service on a non-loopback address without TLS is a
    problem unless BALLAST_INSECURE_INTERNAL says a mesh already provides mutual TLS."""
    service = settings.service
    internal = _tls_files(env, tls.TLS_VARIABLES, mutual=True)
    if service == PUBLIC_SERVICE:
        public_vars = ("BALLAST_EDGE_TLS_CERT_FILE", "BALLAST_EDGE_TLS_KEY_FILE", "")
        served = _tls_files(env, public_vars, mutual=False)
    else:
        served = internal
    insecure = env.boolean(f"{PREFIX}INSECURE_INTERNAL", False)
    if service != PUBLIC_SERVICE and served is None and not insecure and not tls.is_loopback(settings.host):
        env.problems.append(tls.insecure_internal_problem(service, settings.host))
    health_var = f"{PREFIX}{service.upper()}_HEALTH_PORT"
    health_port: int | None = env.integer(
        health_var, DEFAULT_HEALTH_PORTS.get(service, 0), minimum=0, maximum=65535
    )
    if env.raw(health_var) is None and served is None:
        health_port = None  # plaintext: the main port answers health checks itself
    return {"server_tls": served, "client_tls": internal, "health_port": health_port}


def _tls_files(env: Env, variables: tuple[str, str, str], *, mutual: bool) -> tls.TlsFiles | None:
    """The files named by `variables` (certificate, key, CA), all or none of them set."""
    names = variables if mutual else variables[:2]
    values = [env.raw(name) for name in names]
    if not any(values):
        return None
    missing = [name for name, value in zip(names, values, strict=True) if not value]
    if missing:
        env.problems.append(f"{', '.join(missing)} must be set too: TLS needs {' and '.join(names)} together")
        return None
    files = tls.TlsFiles(
        cert_file=values[0] or "",
        key_file=values[1] or "",
        ca_file=(values[2] or "") if mutual else "",
        variables=variables,
    )
    env.problems.extend(tls.check(files))
    return files

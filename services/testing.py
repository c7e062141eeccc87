"""Test helpers: start any set of services in-process on free ports, with typed stubs.

Used by the test suite and the benchmarks; it starts the real servers (real gRPC on
127.0.0.1), never fakes of Ballast's own services.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from ballast.cache.v1 import cache_pb2_grpc
from ballast.edge.v1 import edge_pb2_grpc
from ballast.limiter.v1 import limiter_pb2_grpc
from ballast.router.v1 import router_pb2_grpc
from ballast.sessions.v1 import sessions_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from services import registry
from services.kit import tls
from services.kit.certs import Identity, make_certs
from services.kit.config import Env
from services.kit.server import RunningService, start_service
from services.kit.telemetry import setup_telemetry


@dataclass
class Suite:
    """Running services and client channels to them."""

    running: dict[str, RunningService]
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    #: The certificate the suite's own channels present when the services run mutual TLS.
    client_tls: tls.TlsFiles | None = None

    def address(self, name: str) -> str:
        return self.running[name].address

    def channel(self, name: str) -> grpc.aio.Channel:
        if name not in self._channels:
            served = self.running[name].app.server_settings.server_tls
            if served is None or self.client_tls is None:
                self._channels[name] = grpc.aio.insecure_channel(self.address(name))
            else:
                credentials = tls.channel_credentials(self.client_tls)
                self._channels[name] = grpc.aio.secure_channel(self.address(name), credentials)
        return self._channels[name]

    @property
    def edge(self) -> edge_pb2_grpc.EdgeServiceAsyncStub:
        return edge_pb2_grpc.EdgeServiceStub(self.channel("edge"))

    @property
    def edge_admin(self) -> edge_pb2_grpc.EdgeAdminServiceAsyncStub:
        return edge_pb2_grpc.EdgeAdminServiceStub(self.channel("edge"))

    @property
    def router(self) -> router_pb2_grpc.RouterServiceAsyncStub:
        return router_pb2_grpc.RouterServiceStub(self.channel("router"))

    @property
    def limiter(self) -> limiter_pb2_grpc.LimiterServiceAsyncStub:
        return limiter_pb2_grpc.LimiterServiceStub(self.channel("limiter"))

    @property
    def cache(self) -> cache_pb2_grpc.CacheServiceAsyncStub:
        return cache_pb2_grpc.CacheServiceStub(self.channel("cache"))

    @property
    def sessions(self) -> sessions_pb2_grpc.SessionsServiceAsyncStub:
        return sessions_pb2_grpc.SessionsServiceStub(self.channel("sessions"))

    async def stop(self, grace: float = 0.5) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        for name in reversed(list(self.running)):
            await self.running[name].stop(grace)


async def start_suite(
    names: Iterable[str],
    environ: Mapping[str, str] | None = None,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    base_environ: Mapping[str, str] | None = None,
    tls_dir: Path | None = None,
) -> Suite:
    """Starts `names` in dependency order on free ports of 127.0.0.1.

    `environ` overrides the process environment; each service learns the addresses
    of the ones started before it through BALLAST_<NAME>_ADDR, as in production.
    With `tls_dir`, every service runs mutual TLS with its own certificate from a CA kept
    there (suites started with the same folder trust each other), a plaintext health port,
    and the suite's channels present a certificate of their own.
    """
    env_vars = dict(os.environ if base_environ is None else base_environ)
    env_vars.setdefault("OTEL_SDK_DISABLED", "false" if span_processors else "true")
    env_vars.update(environ or {})
    env_vars["BALLAST_HOST"] = "127.0.0.1"
    ordered = registry.ordered(list(names))
    identities = make_certs(tls_dir, [*ordered, "tests"]) if tls_dir is not None else {}
    running: dict[str, RunningService] = {}
    suite = Suite(running)
    if "tests" in identities:
        suite.client_tls = _tls_files(identities["tests"])
    try:
        for name in ordered:
            env_vars[f"BALLAST_{name.upper()}_PORT"] = "0"
            env_vars[f"BALLAST_{name.upper()}_METRICS_PORT"] = "0"
            if name in identities:
                identity = identities[name]
                env_vars["BALLAST_TLS_CERT_FILE"] = str(identity.cert_file)
                env_vars["BALLAST_TLS_KEY_FILE"] = str(identity.key_file)
                env_vars["BALLAST_TLS_CA_FILE"] = str(identity.ca_file)
                env_vars[f"BALLAST_{name.upper()}_HEALTH_PORT"] = "0"
            # The edge's OpenAI-compatible HTTP face too: suites run side by side on one machine.
            env_vars["BALLAST_EDGE_HTTP_PORT"] = "0"
            env = Env(env_vars)
            settings = registry.load_settings(name, env)
            env.check()
            telemetry = setup_telemetry(name, environ=env_vars, extra_processors=span_processors)
            service = await start_service(registry.build_app(name, settings, telemetry))
            running[name] = service
            env_vars[f"BALLAST_{name.upper()}_ADDR"] = service.address
    except BaseException:
        await suite.stop()
        raise
    return suite


def _tls_files(identity: Identity) -> tls.TlsFiles:
    return tls.TlsFiles(str(identity.cert_file), str(identity.key_file), str(identity.ca_file))

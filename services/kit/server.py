"""One bootstrap for every service: a grpc.aio server with health, reflection,
tracing and error mapping, and a graceful shutdown.

Shutdown order (as envoyproxy/ratelimit does it): health goes NOT_SERVING so load
balancers stop sending, the server stops accepting and drains in-flight calls within
the grace period, then the service closes its pools and telemetry is flushed.

Health has two meanings, for Kubernetes' two probes. Readiness (the server's overall status,
service "", and each service's full name) is SERVING once the app is ready, turns NOT_SERVING
while a backend the service cannot answer without keeps failing its probe (`backend_probes`),
and for good when the drain begins. Liveness (service "liveness") says only that the process
serves: a backend outage must take a pod out of rotation, never restart it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import metrics
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from services.kit import local, tls
from services.kit.config import ServerSettings
from services.kit.errors import ErrorInterceptor
from services.kit.interceptors import Around, AroundInterceptor, Context
from services.kit.tasks import cancel_and_wait
from services.kit.telemetry import Telemetry

log = logging.getLogger("ballast.kit.server")

#: The health service name a liveness probe asks for: SERVING from start-up until shutdown,
#: whatever the backends do.
LIVENESS = "liveness"

#: Checks one backend: returns when it answers, raises when it does not.
BackendProbe = Callable[[], Awaitable[None]]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceApp:
    """What a service gives the bootstrap. Subclasses register servicers and own their pools."""

    #: Short name: edge, router, limiter, cache or sessions.
    name: str = ""

    def __init__(self, settings: ServerSettings, telemetry: Telemetry) -> None:
        self.server_settings = settings
        self.telemetry = telemetry

    def service_names(self) -> Sequence[str]:
        """Full proto service names, for health and reflection."""
        raise NotImplementedError

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicers to the server."""
        raise NotImplementedError

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """Service-specific interceptors, run inside tracing and outside error mapping."""
        return ()

    async def start(self) -> None:
        """Opens pools and starts background work, before the port accepts calls."""

    async def drain(self, grace: float) -> None:
        """Within `grace`, while the gRPC server drains its calls: stops the service's other doors
        (the edge's HTTP face) and lets background work in flight (queued jobs) finish; nothing
        new may start."""

    async def close(self) -> None:
        """Closes pools and stops background work, after in-flight calls drained."""

    def ready(self) -> Awaitable[None] | None:
        """None when the service can answer once the port opens; otherwise an awaitable that
        finishes when it can. Health reports NOT_SERVING until then, so probes and load
        balancers wait for it, while the port is already open (other services in the same
        process start meanwhile)."""
        return None

    def backend_probes(self) -> Mapping[str, BackendProbe]:
        """The backends this service cannot answer without, by name ("redis", "postgresql"),
        each with a check that raises when it is unreachable. While one fails
        BALLAST_BACKEND_CHECK_FAILURES checks in a row, readiness is NOT_SERVING; liveness is
        untouched. Only what is required: a backend the service answers well without (a fail
        mode that decides locally) is not listed."""
        return {}


class _Readiness:
    """What readiness is made of: the app became ready and every required backend answers.
    Publishes the result to the health servicer when it changes (after the drain began the
    servicer ignores it: NOT_SERVING stays)."""

    def __init__(self, servicer: health.aio.HealthServicer, names: Sequence[str]) -> None:
        self._servicer = servicer
        self._names = ["", *names]
        self.app_ready = False
        self.backends_down: frozenset[str] = frozenset()
        self._published: int | None = None
        # Setting a status awaits Watch subscribers: one publication at a time, so a stale one
        # cannot finish after a newer one.
        self._lock = asyncio.Lock()

    async def publish(self) -> None:
        async with self._lock:
            status = _SERVING if self.app_ready and not self.backends_down else _NOT_SERVING
            if status == self._published:
                return
            self._published = status
            for name in self._names:
                await self._servicer.set(name, status)


async def _watch_backends(app: ServiceApp, probes: Mapping[str, BackendProbe], readiness: _Readiness) -> None:
    """Checks each backend every interval; a backend is down after `failures` failed checks in a
    row and up again after one that passes. Each change is logged once."""
    settings = app.server_settings
    misses = dict.fromkeys(probes, 0)

    async def check(name: str, probe: BackendProbe) -> None:
        try:
            async with asyncio.timeout(settings.backend_check_timeout):
                await probe()
        except Exception as exc:
            misses[name] += 1
            if misses[name] == settings.backend_check_failures:
                log.warning(
                    "backend unreachable; readiness NOT_SERVING until it answers",
                    extra={
                        "service": app.name,
                        "backend": name,
                        "failed_checks": misses[name],
                        "error": repr(exc) if str(exc) else type(exc).__name__,
                    },
                )
            return
        if misses[name] >= settings.backend_check_failures:
            log.info("backend reachable again", extra={"service": app.name, "backend": name})
        misses[name] = 0

    while True:
        await asyncio.sleep(settings.backend_check_interval)
        await asyncio.gather(*(check(name, probe) for name, probe in probes.items()))
        readiness.backends_down = frozenset(
            name for name, count in misses.items() if count >= settings.backend_check_failures
        )
        await readiness.publish()


class MetricsInterceptor(AroundInterceptor):
    """Counts calls and their duration per method and status (`rpc.server.call.duration`)."""

    def __init__(self, meter: metrics.Meter) -> None:
        super().__init__()
        self._duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of gRPC calls handled, by method and status",
        )

    def around(self, method: str) -> Around | None:
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return None
        service, _, name = method.lstrip("/").partition("/")
        record = self._duration.record
        labels = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        by_code: dict[grpc.StatusCode, dict[str, str]] = {}

        def done(started: float, code: grpc.StatusCode | None) -> None:
            code = code or grpc.StatusCode.OK
            attributes = by_code.get(code)
            if attributes is None:
                attributes = by_code[code] = {**labels, "rpc.grpc.status_code": code.name}
            record(time.perf_counter() - started, attributes)

        class Timed:
            # A plain class, not @asynccontextmanager: this runs around every call, and a
            # generator-based context manager costs three times as much to enter and leave.
            __slots__ = ("context", "started")

            def __init__(self, context: Context) -> None:
                self.context = context

            async def __aenter__(self) -> None:
                self.started = time.perf_counter()

            async def __aexit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
                code = self.context.code()
                if kind is not None and not code:
                    # A client that goes away cancels the handler: CANCELLED, not an unknown failure.
                    cancelled = issubclass(kind, asyncio.CancelledError) or self.context.cancelled()
                    code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
                done(self.started, code)

        return Timed


@dataclass
class RunningService:
    app: ServiceApp
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    #: Port of the Prometheus /metrics endpoint, 0 when disabled.
    metrics_port: int = 0
    #: Plaintext health-only port, 0 when there is none.
    health_port: int = 0
    _metrics_http: Any = field(default=None, repr=False)
    _health_server: grpc.aio.Server | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    #: What the app awaits to become ready (cancelled by stop), and the task that then sets SERVING.
    _becoming_ready: asyncio.Future[None] | None = field(default=None, repr=False)
    _ready_watch: asyncio.Task[None] | None = field(default=None, repr=False)
    _backend_watch: asyncio.Task[None] | None = field(default=None, repr=False)
    #: The handlers that calls from this process reach without the socket (services/kit/local.py).
    _local: local.LocalServer | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, drain within the grace period, close the app, flush telemetry."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.app.server_settings.grace_period if grace is None else grace
        if self._becoming_ready is not None:
            self._becoming_ready.cancel()
        await cancel_and_wait(self._backend_watch)
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"service": self.app.name, "grace_s": grace})
        draining = [self.server.stop(grace), self.app.drain(grace)]
        if self._local is not None:
            # New in-process calls go to the port from now on, and find it closed, as a client
            # over the network does; the ones in progress drain with the server's.
            local.withdraw(self.port, self._local)
            draining.append(self._local.drain(grace))
        await asyncio.gather(*draining)
        if self._health_server is not None:
            await self._health_server.stop(0)
        try:
            # Closing pools must not hold the process forever (a pool waiting for a connection
            # that a dead backend never returns): bounded, and the overrun is logged.
            async with asyncio.timeout(self.app.server_settings.close_timeout):
                await self.app.close()
        except TimeoutError:
            log.error(
                "closing took longer than %.1fs; exiting anyway",
                self.app.server_settings.close_timeout,
                extra={"service": self.app.name},
            )
        finally:
            if self._metrics_http is not None:
                # Waits for the serving thread's loop (at most _METRICS_POLL): off the event loop.
                await asyncio.to_thread(self._metrics_http.shutdown)
                self._metrics_http.server_close()
            # Flushing exporters blocks on network I/O: keep the event loop free meanwhile.
            await asyncio.to_thread(self.app.telemetry.shutdown)
        log.info("stopped", extra={"service": self.app.name})


# How often the metrics thread looks for a shutdown request. prometheus_client's own
# start_http_server looks every 0.5 s, which every stopping service (each test's) waited out.
_METRICS_POLL = 0.05


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _MetricsServer(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


def serve_metrics(host: str, port: int, registry: CollectorRegistry, name: str) -> ThreadingWSGIServer:
    """Prometheus' text endpoint on a thread of its own, as prometheus_client's
    start_http_server serves it, but quick to shut down; port 0 picks a free one."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = _MetricsServer6 if family == socket.AF_INET6 else _MetricsServer
    httpd = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": _METRICS_POLL},
        name=f"{name}-metrics",
        daemon=True,
    )
    thread.start()
    return httpd


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC enables SO_REUSEPORT by default, which lets a second process silently share a
        # port that is already taken; a clash must fail at start-up instead.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def start_service(app: ServiceApp) -> RunningService:
    """Starts `app` on its configured host and port (port 0 picks a free one)."""
    settings = app.server_settings
    interceptors = [
        *app.telemetry.server_interceptors(),
        MetricsInterceptor(app.telemetry.meter),
        *app.interceptors(),
        ErrorInterceptor(),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    # The same handlers behind the same interceptors, for calls from this process.
    in_process = local.LocalServer(interceptors, settings.max_message_bytes)
    health_servicer = health.aio.HealthServicer()
    # The servicer starts with "" SERVING; the probe port opens before the app has started.
    await health_servicer.set("", _NOT_SERVING)
    await health_servicer.set(LIVENESS, _NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, in_process.recording(server))
    app.register(in_process.recording(server))
    names = list(app.service_names())
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    if settings.server_tls is not None:
        port = server.add_secure_port(address, tls.server_credentials(settings.server_tls))
    else:
        if app.name != "edge" and not tls.is_loopback(settings.host):
            # Config allowed it only with BALLAST_INSECURE_INTERNAL: say so in every start-up log.
            log.warning(
                "serving without TLS beyond loopback (BALLAST_INSECURE_INTERNAL=true): only a mesh "
                "providing mutual TLS keeps other callers out",
                extra={"service": app.name, "host": settings.host},
            )
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"{app.name}: cannot listen on {settings.host}:{settings.port}")
    health_server = await _start_health_server(app, health_servicer)
    try:
        await app.start()
        await server.start()
    except BaseException:
        if health_server is not None:
            await health_server[0].stop(0)
        raise
    running = RunningService(app=app, server=server, health=health_servicer, port=port)
    if settings.local_calls and settings.server_tls is None:
        # With TLS on the port, calls from this process go through it too, so its checks hold.
        local.serve(settings.host, port, in_process)
        running._local = in_process
    if health_server is not None:
        running._health_server, running.health_port = health_server
    if settings.metrics_enabled:
        httpd = serve_metrics(settings.host, settings.metrics_port, app.telemetry.registry, app.name)
        running._metrics_http = httpd
        running.metrics_port = int(httpd.server_port)
    await health_servicer.set(LIVENESS, _SERVING)
    readiness = _Readiness(health_servicer, names)
    pending = app.ready()
    readiness.app_ready = pending is None
    await readiness.publish()
    if pending is not None:
        running._becoming_ready = becoming = asyncio.ensure_future(pending)
        running._ready_watch = asyncio.create_task(_serve_when_ready(app, becoming, readiness))
    probes = app.backend_probes()
    if probes:
        running._backend_watch = asyncio.create_task(
            _watch_backends(app, probes, readiness), name=f"{app.name} backend checks"
        )
    log.info(
        "serving",
        extra={
            "service": app.name,
            "host": settings.host,
            "port": port,
            "metrics_port": running.metrics_port,
            "tls": "off" if settings.server_tls is None else "mutual" if settings.server_tls.mutual else "on",
            "health_port": running.health_port,
        },
    )
    return running


async def _serve_when_ready(app: ServiceApp, pending: Awaitable[None], readiness: _Readiness) -> None:
    try:
        await pending
    except Exception:
        # Whatever the app's readiness raised: the process keeps serving what it can, and the
        # probes keep it out of rotation.
        log.exception("never became ready; health stays NOT_SERVING", extra={"service": app.name})
        return
    readiness.app_ready = True
    # SERVING unless a backend is down; after shutdown began the servicer ignores it.
    await readiness.publish()
    log.info("ready", extra={"service": app.name})


async def _start_health_server(
    app: ServiceApp, servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int] | None:
    """A plaintext port serving only grpc.health.v1, for probes that cannot present a client
    certificate (Kubernetes' gRPC probe speaks plaintext). It reads the same servicer as the
    main port, so it reports NOT_SERVING the moment shutdown begins. It reveals only whether
    the service is serving."""
    settings = app.server_settings
    if settings.health_port is None:
        return None
    server = grpc.aio.server(options=server_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    if port == 0:
        raise RuntimeError(f"{app.name}: cannot listen on {settings.host}:{settings.health_port} (health)")
    await server.start()
    return server, port


async def run_until_signal(apps: Sequence[ServiceApp], started: Callable[[], object] | None = None) -> None:
    """Starts every app, calls `started` once all are serving, serves until SIGTERM or SIGINT,
    then shuts all down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running: list[RunningService] = []
    try:
        for app in apps:
            running.append(await start_service(app))
        if started is not None:
            started()
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        # Stop in reverse start order: the edge drains before the services it calls.
        for service in reversed(running):
            await service.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

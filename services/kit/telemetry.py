"""OpenTelemetry set-up per service, from the standard OTEL_* variables.

Each service gets its own TracerProvider (so `ballast up` still reports five service
names from one process) and explicit gRPC interceptors instead of global patching.
Health checks are left out of traces.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    Histogram,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import (
    Aggregation,
    DefaultAggregation,
    ExplicitBucketHistogramAggregation,
    View,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry

from services.kit import tracing
from services.kit.config import Env, region_from_env
from services.kit.tallies import Tallies, TallyMeter
from services.kit.tracing import ClientSpans, ServerTracing, SpanProcessors

_logger = logging.getLogger(__name__)

#: The instrumentation scope of every service's own metrics.
METER_NAME = "ballast"


@dataclass
class Telemetry:
    """Tracing and metrics handles for one service."""

    service_name: str
    tracer_provider: trace.TracerProvider
    _sdk_provider: TracerProvider | None = field(default=None, repr=False)
    meter_provider: metrics.MeterProvider = field(default_factory=metrics.NoOpMeterProvider)
    #: This service's own Prometheus registry, served on its metrics port.
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    _sdk_meters: MeterProvider | None = field(default=None, repr=False)
    #: Counters and histograms aggregated without the SDK's per-record work (tallies.py); None
    #: where they cannot serve (exemplars, a delta or differently bucketed OTLP reader, no SDK).
    _tallies: Tallies | None = field(default=None, repr=False)

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer("ballast")

    @property
    def lean_tracer(self) -> trace.Tracer:
        """The tracer for spans started on a hot path (see tracing.LeanTracer): the router's
        provider calls."""
        return tracing.LeanTracer(self.tracer_provider, "ballast")

    @property
    def meter(self) -> metrics.Meter:
        meter = self.meter_provider.get_meter(METER_NAME)
        return meter if self._tallies is None else TallyMeter(meter, self._tallies)

    @property
    def tracing(self) -> bool:
        return self._sdk_provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # With tracing off the interceptor would only make no-op spans: skip its cost on every call.
        if not self.tracing:
            return []
        return [ServerTracing(self.tracer_provider)]

    def client_spans(self) -> ClientSpans | None:
        """CLIENT spans for the calls this service makes (tracing.TracedChannel, and in-process
        calls, services/kit/local.py); None with tracing off."""
        return ClientSpans(self.tracer_provider) if self.tracing else None

    def shutdown(self) -> None:
        """Flushes and stops exporters (after the server has drained)."""
        if self._sdk_provider is not None:
            self._sdk_provider.force_flush()
            self._sdk_provider.shutdown()
        if self._sdk_meters is not None:
            self._sdk_meters.shutdown()


def store_system(url: str) -> str:
    """The `db.system.name` of a store URL: redis, postgresql, or memory."""
    scheme = url.split("://", 1)[0].lower()
    return {"rediss": "redis", "postgres": "postgresql"}.get(scheme, scheme)


def store_address(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


# Readiness checks (ServiceApp.backend_probes) run every few seconds and are no user's request.
_UNTRACED = frozenset({"ping"})


def trace_store(store: object, telemetry: Telemetry, system: str, address: str = "") -> None:
    """Gives every public coroutine method of `store` a client span (database conventions:
    `db.system.name`, `db.operation.name`, `server.address`), so Redis and PostgreSQL work
    shows in the request's trace. Patched on the instance: its type and behaviour are unchanged.
    Nothing is done when tracing is off or for in-memory stores.
    """
    if not telemetry.tracing or system == "memory":
        return
    tracer = telemetry.tracer
    for name in dir(type(store)):
        method = getattr(store, name, None)
        if name.startswith("_") or name in _UNTRACED or not inspect.iscoroutinefunction(method):
            continue

        def wrap(method: Callable[..., Awaitable[Any]], operation: str) -> Callable[..., Awaitable[Any]]:
            attributes = {"db.system.name": system, "db.operation.name": operation}
            if address:
                attributes["server.address"] = address

            @functools.wraps(method)
            async def traced(*args: Any, **kwargs: Any) -> Any:
                with tracer.start_as_current_span(
                    f"{operation} {system}", kind=trace.SpanKind.CLIENT, attributes=attributes
                ):
                    return await method(*args, **kwargs)

            return traced

        setattr(store, name, wrap(method, name))


# The SDK's default buckets (0, 5, 10, 25 … 10000) suit milliseconds; Ballast records seconds and
# token counts, so percentiles need the buckets the semantic conventions advise for each.
_SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# The specification's default for explicit-bucket histograms, as the SDK writes it (floats).
_SPEC_DEFAULT_BUCKETS = (
    0.0,
    5.0,
    10.0,
    25.0,
    50.0,
    75.0,
    100.0,
    250.0,
    500.0,
    750.0,
    1000.0,
    2500.0,
    5000.0,
    7500.0,
    10000.0,
)
_BUCKETS_BY_UNIT: dict[str, tuple[float, ...]] = {"s": _SECONDS_BUCKETS, "{token}": _TOKEN_BUCKETS}
_VIEWS = tuple(
    View(
        instrument_type=Histogram,
        instrument_unit=unit,
        aggregation=ExplicitBucketHistogramAggregation(buckets),
    )
    for unit, buckets in _BUCKETS_BY_UNIT.items()
)


def histogram_buckets(unit: str, advisory: Sequence[float] | None = None) -> Sequence[float]:
    """The buckets the SDK gives a histogram of `unit` under _VIEWS: the view's, else the
    instrument's advice, else the SDK's default."""
    buckets = _BUCKETS_BY_UNIT.get(unit)
    if buckets is not None:
        return buckets
    if advisory is not None:
        return tuple(advisory)
    return _SPEC_DEFAULT_BUCKETS


# OTEL_METRICS_EXEMPLAR_FILTER's values, as the SDK names them.
_EXEMPLAR_FILTERS: dict[str, Callable[[], ExemplarFilter]] = {
    "always_off": AlwaysOffExemplarFilter,
    "trace_based": TraceBasedExemplarFilter,
    "always_on": AlwaysOnExemplarFilter,
}


def _insecure(env: Mapping[str, str], endpoint: str) -> bool:
    """Plain-text gRPC for http:// endpoints (as a local Jaeger or collector), or when asked."""
    flag = env.get("OTEL_EXPORTER_OTLP_INSECURE", "").lower()
    return flag == "true" or (flag != "false" and endpoint.startswith("http://"))


class _HashedOnce(Resource):
    """A Resource whose hash is computed once. The OTLP span exporter groups every span it sends
    by its resource, and Resource.__hash__ serialises the attributes to JSON each time (with an
    exporter, a cache-hit chat cost 9% more CPU for it: bench/results/chat_cpu_resource_hash.md);
    a resource never changes after it is made. Equality stays Resource's own."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _cumulative_with_default_aggregation(exporter: MetricExporter) -> bool:
    """Whether OTLP wants what the Prometheus reader aggregates: cumulative sums and histograms
    with the views' buckets (the default unless OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE
    or OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION says otherwise)."""
    temporality = exporter._preferred_temporality or {}
    aggregation = exporter._preferred_aggregation or {}
    default = ExplicitBucketHistogramAggregation()  # what DefaultAggregation gives a histogram

    def same_as_default(value: Aggregation) -> bool:
        if isinstance(value, DefaultAggregation):
            return True
        return (
            type(value) is ExplicitBucketHistogramAggregation
            and value._boundaries == default._boundaries
            and value._record_min_max == default._record_min_max
        )

    return all(value is AggregationTemporality.CUMULATIVE for value in temporality.values()) and all(
        same_as_default(value) for value in aggregation.values()
    )


class TallyingPrometheusReader(PrometheusMetricReader):
    """The Prometheus endpoint's reader, handing on the tallies' metrics (tallies.py) with the
    SDK's own at every collection."""

    def __init__(self, tallies: Tallies | None = None, **prometheus: Any) -> None:
        super().__init__(**prometheus)
        self._tallies = tallies
        self._received = threading.local()

    # The SDK marks collect() final; this one only adds to it. The SDK hands a collection on
    # (_receive_metrics) only when it aggregated something of its own, and a service whose every
    # measurement so far went to tallies would otherwise show none of them.
    def collect(self, timeout_millis: float = 10_000) -> None:  # type: ignore[misc]
        self._received.done = False
        super().collect(timeout_millis=timeout_millis)
        if self._tallies is not None and not self._received.done:
            # The SDK had nothing of its own, so it did not hand anything on: the tallies may have.
            merged = self._tallies.merged(None)
            if merged is not None:
                self._deliver(merged, timeout_millis)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self._received.done = True
        if self._tallies is not None:
            metrics_data = self._tallies.merged(metrics_data) or metrics_data
        self._deliver(metrics_data, timeout_millis, **kwargs)

    def _deliver(self, metrics_data: MetricsData, timeout_millis: float, **kwargs: Any) -> None:
        """Where a collection goes: the Prometheus collector, for the next scrape to write."""
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


class PushingPrometheusReader(TallyingPrometheusReader):
    """The Prometheus endpoint's reader, which also sends what it aggregated over OTLP every
    OTEL_METRIC_EXPORT_INTERVAL milliseconds. The SDK's way, a PeriodicExportingMetricReader
    beside it, aggregates every measurement a second time (each reader keeps its own): about
    5 us per counter add or histogram record, on every call of every service. A push collects
    on its own thread; what it collects goes to the exporter, never into the Prometheus
    collector's queue (a scrape collects for itself)."""

    def __init__(
        self,
        exporter: MetricExporter,
        interval_ms: int,
        timeout_ms: int,
        tallies: Tallies | None = None,
        **prometheus: Any,
    ) -> None:
        super().__init__(tallies, **prometheus)
        self._exporter = exporter
        self._interval_s = interval_ms / 1000
        self._timeout_ms = timeout_ms
        self._pushing = threading.local()
        self._push_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="OtelMetricPush", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self._push()

    def _push(self) -> None:
        with self._push_lock:
            self._pushing.active = True
            try:
                self.collect(timeout_millis=self._timeout_ms)
            except Exception:
                _logger.exception("Collecting metrics for OTLP failed")
            finally:
                self._pushing.active = False

    def _deliver(self, metrics_data: MetricsData, timeout_millis: float, **kwargs: Any) -> None:
        if not getattr(self._pushing, "active", False):
            super()._deliver(metrics_data, timeout_millis, **kwargs)
            return
        # The exporter's own gRPC calls are no request of anyone's: not traced.
        token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self._exporter.export(metrics_data, timeout_millis=timeout_millis)
        except Exception:
            _logger.exception("Exporting metrics over OTLP failed")
        finally:
            otel_context.detach(token)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        self._push()
        return self._exporter.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._stopped.set()
        self._thread.join(timeout=timeout_millis / 1000)
        self._push()  # what was recorded since the last push
        self._exporter.shutdown(timeout_millis=timeout_millis)
        super().shutdown(timeout_millis, **kwargs)


def _exporter_wanted(env: Mapping[str, str], variable: str) -> bool:
    """OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER: OTLP unless the signal's exporter is none."""
    return env.get(variable, "otlp").lower() != "none"


def setup_telemetry(
    service: str,
    *,
    environ: Mapping[str, str] | None = None,
    extra_processors: Sequence[SpanProcessor] = (),
) -> Telemetry:
    """Builds the tracer provider for `service` ("ballast-<service>" unless OTEL_SERVICE_NAME is set).

    Spans and metrics are exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT (or the
    per-signal variants) is set, unless OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER is none;
    OTEL_SDK_DISABLED=true turns the SDK off as OpenTelemetry specifies, metrics included (the
    SDK's MeterProvider reads it from the process environment and hands out no-op meters, so the
    Prometheus endpoint then serves no Ballast series). Having no span exporter and no
    `extra_processors` turns only tracing off: nobody would see the spans, so none are made
    (logs then carry no trace ids). OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG are read by
    the SDK itself.
    """
    env = os.environ if environ is None else environ
    name = f"ballast-{service}"
    # In all-in-one mode one OTEL_SERVICE_NAME would merge five services into one; suffix it instead.
    base = env.get("OTEL_SERVICE_NAME")
    if base:
        name = f"{base}-{service}"
    settings = Env(env)
    region = region_from_env(settings)
    # Read here, not by the SDK from the process environment, so a bad value is an error that names it.
    push_interval = settings.integer("OTEL_METRIC_EXPORT_INTERVAL", 60_000, minimum=1)
    push_timeout = settings.integer("OTEL_METRIC_EXPORT_TIMEOUT", 30_000, minimum=1)
    exemplar_filter = settings.choice("OTEL_METRICS_EXEMPLAR_FILTER", "always_off", _EXEMPLAR_FILTERS)
    settings.check()
    resource = _HashedOnce(
        Resource.create({"service.name": name, "service.namespace": "ballast", "cloud.region": region})
    )
    # Metrics are always collected for the service's Prometheus endpoint; OTLP export is optional.
    # The region is copied onto every series (one value per replica, so no extra cardinality).
    registry = CollectorRegistry(auto_describe=True)
    prometheus: dict[str, Any] = {
        "registry": registry,
        "resource_attribute_filter": lambda key: key == "cloud.region",
    }
    metrics_endpoint = (
        env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or ""
    )
    # A trace-only collector such as Jaeger refuses metrics: OTEL_METRICS_EXPORTER=none keeps them off OTLP.
    otlp_metrics = bool(metrics_endpoint) and _exporter_wanted(env, "OTEL_METRICS_EXPORTER")
    pushed: MetricExporter | None = None
    if otlp_metrics:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        pushed = OTLPMetricExporter(endpoint=metrics_endpoint, insecure=_insecure(env, metrics_endpoint))
    disabled = env.get("OTEL_SDK_DISABLED", "").lower() == "true"
    one_reader = pushed is None or _cumulative_with_default_aggregation(pushed)
    # Tallies serve cumulative readers without exemplars; the SDK's instruments serve the rest.
    tallies = None
    if one_reader and exemplar_filter == "always_off" and not disabled:
        tallies = Tallies(resource, InstrumentationScope(METER_NAME), histogram_buckets)
    readers: list[MetricReader]
    if pushed is not None and one_reader:
        readers = [PushingPrometheusReader(pushed, push_interval, push_timeout, tallies, **prometheus)]
    else:
        readers = [TallyingPrometheusReader(tallies, **prometheus)]
        if pushed is not None:
            # Delta temporality or another histogram aggregation asked of OTLP: the two readers
            # aggregate apart (every measurement twice, about 5 us a call each).
            readers.append(
                PeriodicExportingMetricReader(
                    pushed, export_interval_millis=push_interval, export_timeout_millis=push_timeout
                )
            )
    traces_endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or ""
    )
    exporting = bool(traces_endpoint) and _exporter_wanted(env, "OTEL_TRACES_EXPORTER")
    # Spans that no processor takes are made, timed and dropped on every call: about a tenth of a
    # chat's CPU (bench/chat_cpu.py). With nothing to export, tracing is off, as with OTEL_SDK_DISABLED.
    tracing = not disabled and (exporting or bool(extra_processors))
    # Exemplars (a sampled span's trace id kept beside a measurement) are offered only when asked:
    # OTEL_METRICS_EXEMPLAR_FILTER=trace_based. Only OTLP carries them (the Prometheus endpoint
    # drops them), and with every trace exported they cost 7% of an exact hit's CPU and 10% of a
    # session chat's (bench/results/chat_cpu_exemplars.md): each measurement in a sampled span
    # looks up the current span and offers itself to a reservoir per reader.
    exemplars = _EXEMPLAR_FILTERS[exemplar_filter]()
    meters = MeterProvider(resource=resource, metric_readers=readers, views=_VIEWS, exemplar_filter=exemplars)
    if not tracing:
        return Telemetry(name, trace.NoOpTracerProvider(), None, meters, registry, meters, tallies)
    processors = list(extra_processors)
    if exporting:
        from services.kit.spanwire import QueuingSpanProcessor, WireSpanExporter

        exporter = WireSpanExporter(endpoint=traces_endpoint, insecure=_insecure(env, traces_endpoint))
        processors.insert(0, QueuingSpanProcessor(exporter))
    provider = TracerProvider(resource=resource, active_span_processor=SpanProcessors())
    for processor in processors:
        provider.add_span_processor(processor)
    return Telemetry(name, provider, provider, meters, registry, meters, tallies)

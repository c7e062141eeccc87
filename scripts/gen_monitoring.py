"""Writes Ballast's Grafana dashboards (deploy/grafana/dashboards/*.json) from one description,
and the Kubernetes PrometheusRule (deploy/kubernetes/components/monitoring/prometheusrule.yaml)
from the Prometheus rule files (deploy/prometheus/rules/*.yaml).

The JSON is generated so every dashboard shares the same variables, datasource and filters,
and a test can check that every query names real metrics; the PrometheusRule so Kubernetes runs
exactly the rules promtool tests. Edit this file or the rules, then run
`python scripts/gen_monitoring.py` and commit the output; `--check` fails when it is stale.

Money in the raw metrics is integer micro-dollars: panels divide by 1e6 and show dollars.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"
COMPONENT = ROOT / "deploy" / "kubernetes" / "components" / "monitoring"
PROMETHEUS_RULE = COMPONENT / "prometheusrule.yaml"
DASHBOARDS_CONFIGMAP = COMPONENT / "dashboards.yaml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Filters every query applies; `$var` is a regex (multi-value, "All" = .*).
R = 'cloud_region=~"$region"'
RT = f'{R}, tenant=~"$tenant", tier=~"$tier"'
RTM = f'{RT}, model=~"$model"'
RM = f'{R}, model=~"$model"'
RTI = f'{R}, tier=~"$tier"'
WT = f'{R}, tenant=~"$tenant"'  # webhooks carry a tenant, not a tier
SERVER_ERRORS = (
    'rpc_grpc_status_code=~"UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"'
)
EDGE = 'rpc_service="ballast.edge.v1.EdgeService"'
RATE = "$__rate_interval"


@dataclass
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass
class Panel:
    title: str
    queries: list[Query]
    description: str = ""
    kind: str = "timeseries"  # timeseries | stat | table
    unit: str = "short"
    width: int = 12
    height: int = 8


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    tags: list[str] = field(default_factory=lambda: ["ballast"])


def _variable(name: str, label: str, metric: str, label_name: str) -> dict[str, Any]:
    query = f"label_values({metric}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,  # on time range change: new tenants and models appear
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            },
            _variable("region", "Region", "target_info", "cloud_region"),
            _variable("tenant", "Tenant", f"ballast_usage_cost_total{{{R}}}", "tenant"),
            _variable("tier", "Tier", f"ballast_edge_chats_total{{{R}}}", "tier"),
            _variable("model", "Model", f"ballast_usage_cost_total{{{R}}}", "model"),
        ]
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for index, query in enumerate(panel.queries):
        target: dict[str, Any] = {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": not query.instant,
            "instant": query.instant,
        }
        if panel.kind == "table":
            target["format"] = "table"
        targets.append(target)
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return body


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    panels = []
    x = y = row_height = 0
    for panel_id, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": dashboard.tags,
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": templating(),
        "panels": panels,
        "links": [{"type": "dashboards", "tags": ["ballast"], "title": "Ballast", "asDropdown": True}],
    }


def _stat(
    title: str, queries: list[Query], description: str = "", unit: str = "short", height: int = 4
) -> Panel:
    """A quarter-width single-number panel, as the rows of headline figures use."""
    return Panel(title, queries, description, kind="stat", unit=unit, width=6, height=height)


def _rate(metric: str, selector: str, by: str = "") -> str:
    """Per-second rate of a counter over the dashboard's interval, summed (by `by`)."""
    rate = f"rate({metric}{{{selector}}}[{RATE}])"
    return f"sum by ({by}) ({rate})" if by else f"sum({rate})"


def _ratio(part: str, whole: str, by: str = "") -> str:
    """part/whole where a missing part (nothing failed) counts as 0, not as no data."""
    group = f" by ({by})" if by else ""
    return f"(sum{group} ({part}) or 0 * sum{group} ({whole})) / sum{group} ({whole})"


def _quantile(q: float, bucket: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({bucket}[{RATE}])))"


def _rpc_panels(service: str) -> list[Panel]:
    """Traffic, errors and latency of one service's RPCs (the kit's rpc.server.call.duration)."""
    sel = f'{R}, rpc_service=~"ballast.{service}.v1.*"'
    calls = f"rate(rpc_server_call_duration_seconds_count{{{sel}}}[{RATE}])"
    errors = f"rate(rpc_server_call_duration_seconds_count{{{sel}, {SERVER_ERRORS}}}[{RATE}])"
    return [
        Panel(
            "Calls/s by method and status",
            [
                Query(
                    f"sum by (rpc_method, rpc_grpc_status_code) ({calls})",
                    "{{rpc_method}} {{rpc_grpc_status_code}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Server-error ratio by method",
            [Query(_ratio(errors, calls, "rpc_method"), "{{rpc_method}}")],
            "UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS, UNIMPLEMENTED over all calls.",
            unit="percentunit",
        ),
        Panel(
            "Latency by method (p50, p95, p99)",
            [
                Query(
                    _quantile(q, f"rpc_server_call_duration_seconds_bucket{{{sel}}}", "rpc_method"),
                    f"{{{{rpc_method}}}} p{int(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s",
            width=24,
        ),
    ]


def overview() -> Dashboard:
    chats = f"rate(ballast_edge_chats_total{{{RT}}}[{RATE}])"
    answered = f'rate(ballast_edge_chats_total{{{RT}, outcome=~"ok|cache_hit"}}[{RATE}])'
    hits = f'rate(ballast_edge_chats_total{{{RT}, outcome="cache_hit"}}[{RATE}])'
    edge_calls = f"rate(rpc_server_call_duration_seconds_count{{{R}, {EDGE}}}[{RATE}])"
    edge_errors = f"rate(rpc_server_call_duration_seconds_count{{{R}, {EDGE}, {SERVER_ERRORS}}}[{RATE}])"
    return Dashboard(
        "ballast-overview",
        "Ballast / Overview",
        "Traffic, errors, latency and time to first token by tier, spend and the error budget.",
        [
            Panel("Chats/s", [Query(f"sum({chats})")], kind="stat", unit="reqps", width=6, height=4),
            _stat(
                "Server-error ratio (edge)",
                [Query(_ratio(edge_errors, edge_calls))],
                "Edge calls that failed on the suite's side (limits are not errors).",
                unit="percentunit",
            ),
            _stat(
                "Spend ($/h)",
                [Query(f"{_rate('ballast_usage_cost_total', RTM)} * 3600 / 1e6")],
                unit="currencyUSD",
            ),
            _stat(
                "Answered from cache",
                [Query(_ratio(hits, answered))],
                unit="percentunit",
            ),
            Panel("Chats/s by outcome", [Query(f"sum by (outcome) ({chats})", "{{outcome}}")], unit="reqps"),
            Panel("Chats/s by tier", [Query(f"sum by (tier) ({chats})", "{{tier}}")], unit="reqps"),
            Panel(
                "Chat latency by tier (p50, p95)",
                [
                    Query(
                        _quantile(q, f"ballast_edge_chat_duration_seconds_bucket{{{RTI}}}", "tier"),
                        f"{{{{tier}}}} p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
                "Arrival to the answer's end at the edge, for calls answered directly (not queued).",
                unit="s",
            ),
            Panel(
                "Time to first token by tier (p50, p95)",
                [
                    Query(
                        _quantile(
                            q, f"ballast_edge_chat_time_to_first_token_seconds_bucket{{{RTI}}}", "tier"
                        ),
                        f"{{{{tier}}}} p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
                "First delta of a ChatStream; the whole answer of a unary Chat.",
                unit="s",
            ),
            Panel(
                "Server errors by RPC",
                [
                    Query(
                        f"sum by (rpc_service, rpc_method) ({edge_errors}) or 0 * sum by (rpc_service, rpc_method) ({edge_calls})",
                        "{{rpc_method}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Error budget burn rate (edge SLO)",
                [
                    Query(
                        f"ballast:edge_slo_errors:ratio_rate{window}{{{R}}} / scalar(ballast:slo_error_budget:ratio)",
                        f"{{{{cloud_region}}}} {window}",
                    )
                    for window in ("5m", "1h", "6h")
                ],
                "1 spends the budget exactly over 30 days; the fast alert pages at 14.4, the slow one at 6.",
            ),
            Panel(
                "Limited chats/s by tier",
                [
                    Query(
                        f'sum by (tier) (rate(ballast_edge_chats_total{{{RT}, outcome="limited"}}[{RATE}])) or 0 * sum by (tier) ({chats})',
                        "{{tier}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Services up",
                [Query('sum by (job) (up{job=~"ballast-.*"})', "{{job}}")],
                "Replicas Prometheus can scrape, per service.",
            ),
        ],
    )


def cost() -> Dashboard:
    spend = f"ballast_usage_cost_total{{{RTM}}}"
    saved = f"ballast_edge_cache_saved_cost_total{{{RTM}}}"
    rate = f"rate({spend}[{RATE}])"
    return Dashboard(
        "ballast-cost",
        "Ballast / Cost",
        "Who spends what on which model: spend and tokens per tenant, model and tier, cache savings, "
        "top spenders and projected daily usage against budgets.",
        [
            _stat(
                "Spend in range ($)",
                [
                    Query(
                        f"sum(clamp_min(({spend} - {spend} offset $__range) or {spend}, 0)) / 1e6",
                        instant=True,
                    )
                ],
                "Exact sum of what the edge charged in the selected range: counter differences, no "
                "extrapolation (series that appeared in the range count whole). A replica restarted "
                "within the range counts from its restart.",
                unit="currencyUSD",
                height=5,
            ),
            _stat(
                "Tokens in range",
                [
                    Query(
                        f"sum(clamp_min((ballast_usage_tokens_total{{{RTM}}} - ballast_usage_tokens_total{{{RTM}}} offset $__range) or ballast_usage_tokens_total{{{RTM}}}, 0))",
                        instant=True,
                    )
                ],
                height=5,
            ),
            _stat(
                "Spend rate ($/h)",
                [Query(f"sum({rate}) * 3600 / 1e6")],
                unit="currencyUSD",
                height=5,
            ),
            _stat(
                "Cache savings in range ($)",
                [
                    Query(
                        f"sum(clamp_min(({saved} - {saved} offset $__range) or {saved}, 0)) / 1e6",
                        instant=True,
                    )
                ],
                "What cache hits did not spend in the selected range: each hit counts the cost its "
                "cached answer had when the model made it. Set it beside Spend in range.",
                unit="currencyUSD",
                height=5,
            ),
            Panel(
                "Spend by tenant ($/h, top 10)",
                [Query(f"topk(10, sum by (tenant) ({rate})) * 3600 / 1e6", "{{tenant}}")],
                unit="currencyUSD",
            ),
            Panel(
                "Spend by model ($/h)",
                [Query(f"sum by (model) ({rate}) * 3600 / 1e6", "{{model}}")],
                unit="currencyUSD",
            ),
            Panel(
                "Spend by tier ($/h)",
                [Query(f"sum by (tier) ({rate}) * 3600 / 1e6", "{{tier}}")],
                unit="currencyUSD",
            ),
            Panel(
                "Tokens/s by model and direction",
                [
                    Query(
                        _rate("ballast_usage_tokens_total", RTM, "model, direction"),
                        "{{model}} {{direction}}",
                    )
                ],
            ),
            Panel(
                "Top spenders in range",
                [
                    Query(
                        f"topk(10, sum by (tenant, tier) (clamp_min(({spend} - {spend} offset $__range) or {spend}, 0))) / 1e6",
                        instant=True,
                    )
                ],
                kind="table",
                unit="currencyUSD",
            ),
            Panel(
                "Projected daily spend ($, at the last hour's pace)",
                [Query(f"topk(10, sum by (tenant) (ballast:cost_usd:projected1d{{{RT}}}))", "{{tenant}}")],
                unit="currencyUSD",
            ),
            Panel(
                "Projected daily tokens over the tier's tenant budget",
                [
                    Query(
                        'topk(10, ballast:tenant_tokens_projected1d:budget_ratio{tenant=~"$tenant", tier=~"$tier"})',
                        "{{tenant}} ({{tier}})",
                    )
                ],
                "1 means the tenant spends its whole tenant_tokens_per_day at the last hour's pace.",
                unit="percentunit",
            ),
            Panel(
                "Daily token budget spent (limiter)",
                [
                    Query(
                        f"topk(10, ballast:tenant_budget_used:ratio{{{RT}}})",
                        "{{tenant}} ({{tier}})",
                    )
                ],
                "Share of each tenant's tenant_tokens_per_day spent today, as the limiter saw it; the "
                "near-budget alert fires past the tiers file's near_limit_ratio.",
                unit="percentunit",
            ),
            Panel(
                "Cache savings by tier ($/h)",
                [Query(f"sum by (tier) (ballast:cache_saved_usd:rate5m{{{RT}}}) * 3600", "{{tier}}")],
                unit="currencyUSD",
            ),
            Panel(
                "Tokens saved by cache hits/s by model and direction",
                [
                    Query(
                        f"sum by (model, direction) (rate(ballast_edge_cache_saved_tokens_total{{{RTM}}}[{RATE}]))",
                        "{{model}} {{direction}}",
                    )
                ],
                "The cached answers' recorded usage: tokens the models were not asked for again.",
            ),
            Panel(
                "Provider cost by provider ($/h)",
                [
                    Query(
                        f"{_rate('ballast_router_cost_total', RM, 'provider')} * 3600 / 1e6",
                        "{{provider}}",
                    )
                ],
                "What the router paid providers (includes sessions' summaries, which no tenant chat is charged for).",
                unit="currencyUSD",
                width=24,
            ),
        ],
    )


def providers() -> Dashboard:
    attempts = f"rate(ballast_router_attempts_total{{{RM}}}[{RATE}])"
    return Dashboard(
        "ballast-providers",
        "Ballast / Providers",
        "Provider attempts, 429s, failed attempts (retries and failovers), breakers and headroom.",
        [
            Panel(
                "Attempts/s by provider and outcome",
                [Query(f"sum by (provider, outcome) ({attempts})", "{{provider}} {{outcome}}")],
                unit="reqps",
            ),
            Panel(
                "Upstream 429 ratio by provider",
                [
                    Query(
                        _ratio(
                            f'rate(ballast_router_attempts_total{{{RM}, outcome="rate_limited"}}[{RATE}])',
                            f'rate(ballast_router_attempts_total{{{RM}, outcome!="breaker_open"}}[{RATE}])',
                            "provider",
                        ),
                        "{{provider}}",
                    )
                ],
                unit="percentunit",
            ),
            Panel(
                "Failed attempts/s (each retried, failed over or failed)",
                [
                    Query(
                        f'sum by (provider, model) (rate(ballast_router_attempts_total{{{RM}, outcome=~"rate_limited|server_error|timeout|connection_error|protocol_error"}}[{RATE}])) or 0 * sum by (provider, model) ({attempts})',
                        "{{provider}} {{model}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Breaker state (0 closed, 1 half-open, 2 open)",
                [
                    Query(
                        f"max by (provider, model) (ballast_router_breaker_state{{{RM}}})",
                        "{{provider}} {{model}}",
                    )
                ],
            ),
            Panel(
                "Headroom: requests left in the provider's window",
                [
                    Query(
                        f"min by (provider, model) (ballast_router_headroom_remaining_requests{{{RM}}})",
                        "{{provider}} {{model}}",
                    )
                ],
            ),
            Panel(
                "Headroom: tokens left in the provider's window",
                [
                    Query(
                        f"min by (provider, model) (ballast_router_headroom_remaining_tokens{{{RM}}})",
                        "{{provider}} {{model}}",
                    )
                ],
            ),
            Panel(
                "Provider call latency p95",
                [
                    Query(
                        _quantile(
                            0.95,
                            f'gen_ai_client_operation_duration_seconds_bucket{{{R}, gen_ai_request_model=~"$model"}}',
                            "gen_ai_provider_name, gen_ai_request_model",
                        ),
                        "{{gen_ai_provider_name}} {{gen_ai_request_model}}",
                    )
                ],
                unit="s",
            ),
            Panel(
                "Recent latency (EWMA) per provider and model",
                [
                    Query(
                        f"max by (provider, model) (ballast_router_ewma_latency_seconds{{{RM}}})",
                        "{{provider}} {{model}}",
                    )
                ],
                unit="s",
            ),
        ],
    )


def queue() -> Dashboard:
    return Dashboard(
        "ballast-queue",
        "Ballast / Queue",
        "The burst queue (SubmitChat): depth by priority, the oldest job's age, submissions and job polls, "
        "webhook deliveries.",
        [
            Panel(
                "Jobs waiting",
                [Query(f"sum(ballast_edge_queue_depth{{{R}}})")],
                kind="stat",
                width=8,
                height=4,
            ),
            Panel(
                "Oldest job age",
                [Query(f"max(ballast_edge_queue_oldest_age_seconds{{{R}}})")],
                kind="stat",
                unit="s",
                width=8,
                height=4,
            ),
            Panel(
                "Submissions/s",
                [
                    Query(
                        f'sum(rate(rpc_server_call_duration_seconds_count{{{R}, {EDGE}, rpc_method="SubmitChat"}}[{RATE}]))'
                    )
                ],
                kind="stat",
                unit="reqps",
                width=8,
                height=4,
            ),
            Panel(
                "Depth by priority",
                [Query(f"sum by (priority) (ballast_edge_queue_depth{{{R}}})", "{{priority}}")],
            ),
            Panel(
                "Oldest job age",
                [
                    Query(
                        f"max by (cloud_region) (ballast_edge_queue_oldest_age_seconds{{{R}}})",
                        "{{cloud_region}}",
                    )
                ],
                unit="s",
            ),
            Panel(
                "Queue calls/s (submit, poll, cancel)",
                [
                    Query(
                        f'sum by (rpc_method) (rate(rpc_server_call_duration_seconds_count{{{R}, {EDGE}, rpc_method=~"SubmitChat|GetJob|CancelJob"}}[{RATE}]))',
                        "{{rpc_method}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Work allowed and waiting per lane (edge pacing)",
                [
                    Query(f"sum by (lane) (ballast_edge_paced_allowed{{{R}}})", "{{lane}} allowed"),
                    Query(f"sum by (lane) (ballast_edge_paced_waiting{{{R}}})", "{{lane}} waiting"),
                ],
                "Queue workers back off first while the edge's event loop runs late.",
            ),
            Panel(
                "Webhook attempts/s by outcome",
                [
                    Query(
                        f"sum by (outcome) (rate(ballast_edge_webhook_attempts_total{{{WT}}}[{RATE}]))",
                        "{{outcome}}",
                    )
                ],
                "A delivery ends delivered, failed (attempts spent, or an answer retrying cannot fix) or "
                "refused (its URL now points at an internal address); retried attempts were tried again.",
                unit="reqps",
            ),
            Panel(
                "Webhook deliveries that failed (share)",
                [Query(f"ballast:webhook_failure_ratio:rate5m{{{R}}}", "{{cloud_region}}")],
                "Failed and refused deliveries over all that ended; the webhook alert tickets past 10%.",
                unit="percentunit",
            ),
            Panel(
                "Webhook failures/s by tenant (top 10)",
                [
                    Query(
                        f'topk(10, sum by (tenant, outcome) (rate(ballast_edge_webhook_attempts_total{{{WT}, outcome=~"retried|failed|refused"}}[{RATE}])))',
                        "{{tenant}} {{outcome}}",
                    )
                ],
                "One tenant's broken receiver, or every tenant's deliveries failing (the edge's egress).",
                unit="reqps",
            ),
            Panel(
                "Webhook delivery time and deliveries under way",
                [
                    Query(
                        _quantile(
                            0.95, f"ballast_edge_webhook_delivery_duration_seconds_bucket{{{R}}}", "outcome"
                        ),
                        "p95 {{outcome}}",
                    ),
                    Query(f"sum(ballast_edge_webhook_pending{{{R}}})", "under way"),
                ],
                "From a job's end to its webhook's outcome, every attempt and backoff included; and the "
                "deliveries the edge replicas are sending or waiting to retry.",
                unit="s",
            ),
        ],
    )


def edge() -> Dashboard:
    return Dashboard(
        "ballast-edge",
        "Ballast / Service: edge",
        "The public API: RPCs, chats by outcome, loop lag and pacing.",
        [
            *_rpc_panels("edge"),
            Panel(
                "Chats/s by tenant and outcome (top 10)",
                [
                    Query(
                        f"topk(10, {_rate('ballast_edge_chats_total', RT, 'tenant, outcome')})",
                        "{{tenant}} {{outcome}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Event loop lag",
                [Query(f"max by (instance) (ballast_edge_loop_lag_seconds{{{R}}})", "{{instance}}")],
                unit="s",
            ),
        ],
    )


def router() -> Dashboard:
    return Dashboard(
        "ballast-router",
        "Ballast / Service: router",
        "RPCs, provider tokens per call and cost paid per model.",
        [
            *_rpc_panels("router"),
            Panel(
                "Tokens per provider call (p95)",
                [
                    Query(
                        _quantile(
                            0.95,
                            f'gen_ai_client_token_usage_bucket{{{R}, gen_ai_request_model=~"$model"}}',
                            "gen_ai_request_model, gen_ai_token_type",
                        ),
                        "{{gen_ai_request_model}} {{gen_ai_token_type}}",
                    )
                ],
            ),
            Panel(
                "Cost paid per model ($/h)",
                [
                    Query(
                        f"{_rate('ballast_router_cost_total', RM, 'model')} * 3600 / 1e6",
                        "{{model}}",
                    )
                ],
                unit="currencyUSD",
            ),
        ],
    )


def limiter() -> Dashboard:
    return Dashboard(
        "ballast-limiter",
        "Ballast / Service: limiter",
        "Decisions, denials and delays by reason, limits reached, degraded mode.",
        [
            *_rpc_panels("limiter"),
            Panel(
                "Decisions/s by outcome and reason",
                [
                    Query(
                        _rate("ballast_limiter_decisions_total", R, "decision, reason"),
                        "{{decision}} {{reason}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Over and near limit/s by limit",
                [
                    Query(
                        _rate("ballast_limiter_over_limit_total", R, "limit"),
                        "over {{limit}}",
                    ),
                    Query(
                        _rate("ballast_limiter_near_limit_total", R, "limit"),
                        "near {{limit}}",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "Degraded decisions/s (no shared store)",
                [Query(_rate("ballast_limiter_degraded_decisions_total", R))],
                unit="reqps",
            ),
            Panel(
                "Configured limits per tier",
                [Query(f"max by (tier, limit) (ballast_limiter_configured_limit{{{RTI}}})", instant=True)],
                kind="table",
            ),
        ],
    )


def cache() -> Dashboard:
    lookups = f"rate(ballast_cache_lookups_total{{{R}}}[{RATE}])"
    return Dashboard(
        "ballast-cache",
        "Ballast / Service: cache",
        "RPCs, lookups by result (exact, semantic, miss), hit ratio and stores refused.",
        [
            *_rpc_panels("cache"),
            Panel("Lookups/s by result", [Query(f"sum by (result) ({lookups})", "{{result}}")], unit="reqps"),
            Panel(
                "Hit ratio",
                [Query(_ratio(f'rate(ballast_cache_lookups_total{{{R}, result!="miss"}}[{RATE}])', lookups))],
                unit="percentunit",
            ),
            Panel(
                "Stores/s by result",
                [Query(_rate("ballast_cache_stores_total", R, "result"), "{{result}}")],
                unit="reqps",
            ),
        ],
    )


def sessions() -> Dashboard:
    return Dashboard(
        "ballast-sessions",
        "Ballast / Service: sessions",
        "RPCs (UNAVAILABLE when PostgreSQL is down), turns appended and context size.",
        [
            *_rpc_panels("sessions"),
            Panel(
                "Turns appended/s",
                [Query(_rate("ballast_sessions_turns_total", R))],
                unit="reqps",
            ),
            Panel(
                "Context tokens returned (p50, p95)",
                [
                    Query(
                        f"histogram_quantile({q}, {_rate('ballast_sessions_context_tokens_bucket', R, 'le')})",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
            ),
        ],
    )


DASHBOARDS = (overview, cost, providers, queue, edge, router, limiter, cache, sessions)


def render() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    files = {}
    for build in DASHBOARDS:
        dashboard = build()
        files[f"{dashboard.uid}.json"] = json.dumps(dashboard_json(dashboard), indent=2) + "\n"
    return files


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL, runbooks) as `|` blocks, as the rule files have them."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _string)


def prometheus_rule(rules_dir: Path = RULES) -> str:
    """The rule files' groups as one PrometheusRule (the Prometheus Operator's resource)."""
    groups: list[dict[str, Any]] = []
    for path in sorted(rules_dir.glob("*.yaml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "ballast"},
        "spec": {"groups": groups},
    }
    header = (
        "# Generated by scripts/gen_monitoring.py from deploy/prometheus/rules/*.yaml: edit those\n"
        "# (promtool tests them) and regenerate. The Prometheus Operator loads it into Prometheus.\n"
    )
    return header + yaml.dump(resource, Dumper=_BlockDumper, sort_keys=False, width=200)


def dashboards_configmap(files: dict[str, str]) -> str:
    """The dashboards as a ConfigMap for Grafana's dashboard sidecar (label grafana_dashboard=1)."""
    resource = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "ballast-dashboards",
            "labels": {"grafana_dashboard": "1"},
            "annotations": {"grafana_folder": "Ballast"},
        },
        "data": dict(sorted(files.items())),
    }
    header = (
        "# Generated by scripts/gen_monitoring.py (the same JSON as deploy/grafana/dashboards): Grafana's\n"
        "# dashboard sidecar (kube-prometheus-stack) loads ConfigMaps labelled grafana_dashboard=1.\n"
    )
    return header + yaml.dump(resource, Dumper=_BlockDumper, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write Ballast's Grafana dashboards and PrometheusRule.")
    parser.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--component", type=Path, default=COMPONENT)
    args = parser.parse_args(argv)
    files = render()
    generated = {
        args.component / PROMETHEUS_RULE.name: prometheus_rule(),
        args.component / DASHBOARDS_CONFIGMAP.name: dashboards_configmap(files),
    }
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (args.out / name).exists() or (args.out / name).read_text() != text
        ]
        extra = sorted({p.name for p in args.out.glob("*.json")} - set(files))
        stale += [
            str(path) for path, text in generated.items() if not path.exists() or path.read_text() != text
        ]
        if stale or extra:
            print(
                f"stale: {stale}, not generated: {extra}; run python scripts/gen_monitoring.py",
                file=sys.stderr,
            )
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    for path, text in generated.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

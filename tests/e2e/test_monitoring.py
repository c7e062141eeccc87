"""A real Prometheus (Debian's package, loopback only) scrapes the whole suite while a short
surge runs and a few queued jobs report to a webhook receiver (one delivery retried, one failed);
then every PromQL expression of every dashboard panel, every dashboard variable and every
recording rule is evaluated through Prometheus's HTTP API. Each must return data, and the cost
dashboard's total for the run must equal what the edge reported to its clients."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc

from ballast_demo.load import run_surge
from ballast_demo.scenario import ScenarioConfig, plan_users, write_suite_config
from services.kit.config import SERVICE_NAMES
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.backends import free_port
from tests.support.http_receiver import HttpReceiver
from tests.support.prometheus import PrivatePrometheus
from tests.unit.ops.dashboards import RULES, dashboards, fill_variables, panel_queries, rule_groups

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "monitoring-admin"
REGION = "e2e-test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Wider than the run: rates and ranges in the panels cover all of it.
RATE_INTERVAL = "5m"
RANGE = "1h"
WEBHOOK_JOBS = 4


async def _webhook_jobs(channel: grpc.aio.Channel, receiver: HttpReceiver) -> int:
    """Queued chats that report to `receiver`, which answers 503 (retried), then 410 (a delivery
    that fails), then 200: every webhook outcome but `refused`. Returns the cost the clients
    were told (in the jobs' results)."""
    admin = edge_pb2_grpc.EdgeAdminServiceStub(channel)
    edge = edge_pb2_grpc.EdgeServiceStub(channel)
    created = await admin.CreateApiKey(
        edge_pb2.CreateApiKeyRequest(tenant_id="webhooks", user_id="hooked", tier="enterprise"),
        metadata=(("x-admin-key", ADMIN),),
    )
    auth = (("authorization", f"Bearer {created.api_key}"),)
    receiver.responses = [503, 410, 200]
    jobs = []
    for index in range(WEBHOOK_JOBS):
        message = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Report back, job {index}")
        submitted = await edge.SubmitChat(
            edge_pb2.SubmitChatRequest(
                chat=edge_pb2.ChatRequest(messages=[message]), webhook_url=receiver.url
            ),
            metadata=auth,
        )
        jobs.append(submitted.job.job_id)
    # One attempt per job, and one more for the delivery that was answered 503.
    await receiver.wait_for(WEBHOOK_JOBS + 1, within=60)
    cost = 0
    for job_id in jobs:

        async def ended(job_id: str = job_id) -> bool:
            job = (await edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=auth)).job
            return job.webhook_state in ("delivered", "failed")

        await _until(ended, f"the webhook of {job_id} to end")
        job = (await edge.GetJob(edge_pb2.GetJobRequest(job_id=job_id), metadata=auth)).job
        assert job.state == edge_pb2.JOB_STATE_SUCCEEDED, job
        cost += job.result.cost.total_cost_micros
    return cost


async def _query(client: httpx.AsyncClient, expr: str, at: float) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/query", params={"query": expr, "time": at})
    body = response.json()
    assert body.get("status") == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def _edge_exported(suite: Suite, metric: str = "ballast_usage_cost_total") -> int:
    """The sum of `metric` on the edge's own /metrics, read directly."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{suite.running['edge'].metrics_port}/metrics")).text
    return round(sum(float(v) for v in re.findall(rf"^{metric}\{{.*\}} (\S+)$", text, re.M)))


async def _until(check: Any, what: str, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def test_every_panel_and_recording_rule_answers_during_a_surge(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    if shutil.which("prometheus") is None:
        message = "prometheus is not installed (scripts/ensure_prometheus.sh installs Debian's package)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    config = ScenarioConfig(
        duration_s=15,
        ramp_s=4,
        start_users=4,
        peak_users=16,
        think_s=(0.3, 0.8),
        outage_start_s=5,
        outage_s=4,
        primary_latency_ms=20,
        secondary_latency_ms=40,
        tokens_per_second=5000,
        # Paid users reach their tier's limit (denials, near and over limit); free users' queued
        # turns are not held by theirs, so every job ends within the run.
        paid_requests=4,
        free_requests=1000,
    ).with_ports(free_port(), free_port())
    environ = {
        **write_suite_config(tmp_path, config, ROOT),
        "BALLAST_EDGE_ADMIN_KEY": ADMIN,
        "BALLAST_REGION": REGION,
        # The webhook receiver is on loopback, which webhooks reach only when allowed.
        "BALLAST_EDGE_WEBHOOK_ALLOWED": "127.0.0.1/32",
        "BALLAST_EDGE_WEBHOOK_BACKOFF": "50ms",
    }
    suite = await suite_factory(SERVICE_NAMES, environ)
    targets = {f"ballast-{name}": [f"127.0.0.1:{r.metrics_port}"] for name, r in suite.running.items()}
    prometheus = PrivatePrometheus(targets, sorted(RULES.glob("*.yaml")))
    receiver = HttpReceiver()
    await receiver.start()
    try:
        await asyncio.to_thread(prometheus.start)
        state = await run_surge(
            suite.channel("edge"), suite.channel("router"), ADMIN, config, plan_users(config)
        )
        reported = sum(event.cost_micros for event in state.events)
        assert reported > 0
        assert {event.outcome for event in state.events} >= {"ok", "cache_hit", "limited"}
        reported += await _webhook_jobs(suite.channel("edge"), receiver)
        exported = await _edge_exported(suite)
        assert exported == reported, "the edge's counter and its clients disagree"
        # The surge's cache hits saved what their answers cost when the models made them.
        saved = await _edge_exported(suite, "ballast_edge_cache_saved_cost_total")
        assert saved > 0

        async with httpx.AsyncClient(base_url=prometheus.url, timeout=30) as client:

            async def scraped_everything() -> bool:
                result = await _query(client, "sum(ballast_usage_cost_total)", time.time())
                ended = await _query(
                    client,
                    'sum(ballast_edge_webhook_attempts_total{outcome=~"delivered|failed|refused"})',
                    time.time(),
                )
                return (
                    bool(result)
                    and round(float(result[0]["value"][1])) == exported
                    and bool(ended)
                    and round(float(ended[0]["value"][1])) == WEBHOOK_JOBS
                )

            await _until(scraped_everything, "Prometheus to scrape the edge's final cost and webhooks")

            recorded = {
                rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule
            }

            async def rules_recorded() -> bool:
                # Recording rules read each other: wait until every one has written its series.
                result = await _query(client, 'count by (__name__) ({__name__=~"ballast:.+"})', time.time())
                return {series["metric"]["__name__"] for series in result} >= recorded

            await _until(rules_recorded, "every recording rule to write its series")
            at = time.time()

            # Every rule, alerts included, evaluates without error on the real series (a PromQL
            # mistake such as many-to-many matching only shows at evaluation).
            loaded: list[dict[str, Any]] = []

            async def rules_ran() -> bool:
                body = (await client.get("/api/v1/rules")).json()
                loaded[:] = [rule for group in body["data"]["groups"] for rule in group["rules"]]
                return all(rule["health"] != "unknown" for rule in loaded)

            await _until(rules_ran, "every rule group to run")
            assert len(loaded) == sum(len(group["rules"]) for group in rule_groups())
            unhealthy = [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
            assert not unhealthy, unhealthy

            empty: list[str] = []
            for group in rule_groups():
                for rule in group["rules"]:
                    if "record" in rule and not await _query(client, rule["expr"], at):
                        empty.append(f"rule {rule['record']}")
            for name, panel, target in panel_queries():
                expr = fill_variables(target["expr"], rate_interval=RATE_INTERVAL, range_=RANGE)
                if not await _query(client, expr, at):
                    empty.append(f"{name} / {panel['title']}: {expr}")
            assert not empty, "no data for:\n" + "\n".join(empty)

            for name, dashboard in dashboards().items():
                for variable in dashboard["templating"]["list"]:
                    if variable["type"] != "query":
                        continue
                    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
                    assert match, variable
                    response = await client.get(
                        f"/api/v1/label/{match.group(2)}/values",
                        params={"match[]": fill_variables(match.group(1))},
                    )
                    values = response.json()["data"]
                    assert values, (name, variable["name"])
                    if variable["name"] == "region":
                        assert values == [REGION]

            # Every service was scraped (a single scrape may time out on a busy machine).
            up = await _query(client, 'max by (job) (max_over_time(up{job=~"ballast-.*"}[5m]))', at)
            assert {series["metric"]["job"]: series["value"][1] for series in up} == {
                f"ballast-{name}": "1" for name in SERVICE_NAMES
            }

            # The cost dashboard's total for the run is what the clients were told, to the micro-dollar.
            spend = next(
                p for p in dashboards()["ballast-cost.json"]["panels"] if p["title"] == "Spend in range ($)"
            )
            total = await _query(client, fill_variables(spend["targets"][0]["expr"], range_=RANGE), at)
            assert round(float(total[0]["value"][1]) * 1e6) == reported
            savings = next(
                p
                for p in dashboards()["ballast-cost.json"]["panels"]
                if p["title"] == "Cache savings in range ($)"
            )
            total = await _query(client, fill_variables(savings["targets"][0]["expr"], range_=RANGE), at)
            assert round(float(total[0]["value"][1]) * 1e6) == saved
    finally:
        await receiver.close()
        await asyncio.to_thread(prometheus.stop)

"""`ballast serve worker` as its own process, as a cluster runs it: started with a test's
environment on free ports, ready once its health service answers SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2, edge_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.net import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = (("authorization", "Bearer bk_demo_enterprise"),)
CALLER = common_pb2.Caller(tenant_id="demo", user_id="carol", tier="enterprise")
TERMINAL = {edge_pb2.JOB_STATE_SUCCEEDED, edge_pb2.JOB_STATE_FAILED, edge_pb2.JOB_STATE_CANCELLED}
# Generous: a busy 2-core machine is slow, never wrong.
DEADLINE = 180.0


class Worker:
    """One `ballast serve worker` process."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, metrics_port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.metrics_port = metrics_port
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def owns(self, consumer: str) -> bool:
        # Consumers are named <role>-<host>-<pid>-<random> (services/edge/jobs.py).
        return consumer.startswith("worker-") and f"-{self.pid}-" in consumer


async def start_worker(environ: Mapping[str, str], folder: Path, name: str) -> Worker:
    port, metrics_port = free_port(), free_port()
    # No OTLP endpoint, so nothing is exported; OTEL_SDK_DISABLED would switch the metrics off too.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALLAST_", "OTEL_"))}
    env.update(environ)
    env.update({"BALLAST_WORKER_PORT": str(port), "BALLAST_WORKER_METRICS_PORT": str(metrics_port)})
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "serve", "worker", cwd=ROOT, env=env, stderr=out
        )
    worker = Worker(process, port, metrics_port, log)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + DEADLINE
        while True:
            assert process.returncode is None, f"{name} exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return worker
            assert time.monotonic() < deadline, f"{name} never served: {log.read_text()[-2000:]}"
            await asyncio.sleep(0.1)


async def submit_burst(edge: edge_pb2_grpc.EdgeServiceAsyncStub, count: int, label: str) -> dict[str, str]:
    """`count` chats submitted to the queue, each in a session of its own: job id -> session id."""
    jobs: dict[str, str] = {}
    for index in range(count):
        session = (
            await edge.CreateSession(edge_pb2.CreateSessionRequest(), metadata=KEY, timeout=60)
        ).session
        chat = edge_pb2.ChatRequest(
            session_id=session.session_id,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"{label} job {index}")],
        )
        reply = await edge.SubmitChat(edge_pb2.SubmitChatRequest(chat=chat), metadata=KEY, timeout=60)
        jobs[reply.job.job_id] = session.session_id
    return jobs

"""`ballast up` as a user runs it: one child process serving the whole suite, reached only
through its ports (gRPC, the edge's HTTP face, and the simulated providers' admin endpoint).

Tests that must prove something "against `ballast up`" use this instead of the in-process
suite, so nothing they check depends on sharing an event loop or objects with the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from ballast.edge.v1 import edge_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.config import SERVICE_NAMES
from services.kit.net import free_port
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
# Starting five services and the embedded embedder takes seconds idle, far longer on a busy
# CI machine; the deadline only bounds a start that never comes.
START_WITHIN = 180.0
STOP_WITHIN = 60.0


class UpProcess:
    """A running `ballast up` child; `start()` returns once the edge answers on both faces."""

    def __init__(self, environ: Mapping[str, str], folder: Path) -> None:
        self.ports = {name: free_port() for name in SERVICE_NAMES}
        self.http_port = free_port()
        self.sim_ports: dict[str, int] = {}
        self.folder = folder
        self.log = folder / "ballast-up.log"
        self._environ = dict(environ)
        self._process: asyncio.subprocess.Process | None = None
        self._channel: grpc.aio.Channel | None = None

    def _pin_sim_ports(self) -> None:
        """Gives each simulated provider a known port, so faults can be set from outside."""
        catalog_file = Path(self._environ["BALLAST_ROUTER_CATALOG_FILE"])
        catalog = yaml.safe_load(catalog_file.read_text())
        for name, provider in catalog["providers"].items():
            if provider.get("kind") == "sim":
                self.sim_ports[name] = provider["sim"]["port"] = free_port()
        catalog_file.write_text(yaml.safe_dump(catalog))

    async def start(self) -> UpProcess:
        self._pin_sim_ports()
        env = {**os.environ, **self._environ, "BALLAST_EDGE_HTTP_PORT": str(self.http_port)}
        for name, port in self.ports.items():
            env[f"BALLAST_{name.upper()}_PORT"] = str(port)
            env[f"BALLAST_{name.upper()}_METRICS_PORT"] = str(free_port())
            env[f"BALLAST_{name.upper()}_HEALTH_PORT"] = str(free_port())
        with self.log.open("wb") as out:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", "up", cwd=ROOT, env=env, stdout=out, stderr=out
            )
        try:
            await eventually(
                self._edge_serving, what="ballast up's edge SERVING", within=START_WITHIN, interval=0.25
            )
        except AssertionError:
            await self.stop()
            raise AssertionError(
                f"ballast up did not start; its log:\n{self.log.read_text()[-4000:]}"
            ) from None
        return self

    async def _edge_serving(self) -> bool:
        if self._process is not None and self._process.returncode is not None:
            raise AssertionError(
                f"ballast up exited with {self._process.returncode}:\n{self.log.read_text()[-4000:]}"
            )
        with contextlib.suppress(grpc.aio.AioRpcError, httpx.HTTPError):
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            async with httpx.AsyncClient() as client:
                # No key: a 401 in OpenAI's envelope proves the HTTP face is serving.
                return (await client.get(f"{self.http_url}/models", timeout=5)).status_code == 401
        return False

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['edge']}")
        return self._channel

    @property
    def edge(self) -> edge_pb2_grpc.EdgeServiceAsyncStub:
        return edge_pb2_grpc.EdgeServiceStub(self.channel)

    @property
    def edge_admin(self) -> edge_pb2_grpc.EdgeAdminServiceAsyncStub:
        return edge_pb2_grpc.EdgeAdminServiceStub(self.channel)

    @property
    def http_url(self) -> str:
        """The base URL an OpenAI SDK takes (`base_url`), ending in /v1."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    async def set_fault(self, provider: str, fault: Mapping[str, Any] | None) -> None:
        """Sets a fault on a simulated provider through its admin endpoint (None heals it)."""
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{self.sim_ports[provider]}/admin/fault",
                json=dict(fault) if fault else {"mode": "ok"},
                timeout=30,
            )
        response.raise_for_status()

    async def stop(self) -> None:
        """SIGTERM, as an operator's Ctrl-C or an orchestrator would; SIGKILL only if it hangs."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_WITHIN)
        except TimeoutError:
            process.kill()
            await process.wait()

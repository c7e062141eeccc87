"""`python -m services.router` with zero configuration: the shipped catalog, embedded SIMULATED
providers on loopback, both wire formats, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
from ballast.common.v1 import common_pb2
from ballast.router.v1 import router_pb2, router_pb2_grpc

from services.kit.net import free_port

ROOT = Path(__file__).resolve().parents[2]


async def test_router_process_answers_from_embedded_sims_and_stops_cleanly() -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BALLAST_") and key not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    env.update(
        {
            "BALLAST_ROUTER_PORT": str(port),
            "BALLAST_ROUTER_METRICS_PORT": "0",
            "BALLAST_ROUTER_SIM_LATENCY_SCALE": "0",
            "BALLAST_ROUTER_REPORT_HEADROOM": "false",
            "OTEL_SDK_DISABLED": "true",
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.router", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = router_pb2_grpc.RouterServiceStub(channel)
            user = common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hello")
            for model, provider in (("sim-large", "sim-primary"), ("sim-large-eu", "sim-secondary")):
                reply = await stub.Complete(
                    router_pb2.CompleteRequest(model=model, messages=[user]), timeout=10
                )
                assert reply.provider == provider and reply.simulated
            events = [
                e.WhichOneof("event")
                async for e in stub.StreamComplete(
                    router_pb2.StreamCompleteRequest(
                        request=router_pb2.CompleteRequest(
                            messages=[user], caller=common_pb2.Caller(tier="enterprise")
                        )
                    ),
                    timeout=10,
                )
            ]
            assert events[0] == "start" and events[-1] == "done"
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 20)
    assert code == 0

"""The cache reports NOT_SERVING (grpc.health.v1) until it can answer semantic lookups."""

from __future__ import annotations

import shutil
from pathlib import Path

from ballast.cache.v1 import cache_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache.embedder import default_model_path
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.waiting import eventually
from tests.unit.cache.helpers import lookup, store

SERVICE = "ballast.cache.v1.CacheService"


async def _status(suite: Suite, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(suite.channel("cache")).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    status: int = reply.status
    return status


async def test_not_serving_until_the_model_loads_then_serving(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    # A model file that cannot load yet (a rollout still copying it): the port is open but
    # health says NOT_SERVING on both names.
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not an onnx model yet")
    suite = await suite_factory(
        ["cache"],
        {
            "BALLAST_CACHE_FILE": "/nonexistent.yaml",
            "BALLAST_CACHE_STORE": "memory://",
            "BALLAST_CACHE_MODEL_PATH": str(model),
        },
    )
    for service in ("", SERVICE):
        assert await _status(suite, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    # The real model arrives: the embedder's retry loads it and health turns SERVING.
    shutil.copyfile(default_model_path(), model)
    for service in ("", SERVICE):

        async def serving(service: str = service) -> bool:
            status = await _status(suite, service)
            return bool(status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving, what=f"cache {service!r} SERVING after the model loaded", within=120)
    stub = cache_pb2_grpc.CacheServiceStub(suite.channel("cache"))
    await stub.Store(store("Where is my order?", "In transit."))
    semantic = await stub.Lookup(lookup("where's my order?"))
    assert semantic.hit and semantic.similarity > 0


async def test_stopping_before_ready_stays_not_serving(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"never a model")
    suite = await suite_factory(
        ["cache"],
        {
            "BALLAST_CACHE_FILE": "/nonexistent.yaml",
            "BALLAST_CACHE_STORE": "memory://",
            "BALLAST_CACHE_MODEL_PATH": str(model),
        },
    )
    running = suite.running["cache"]
    loading = running._becoming_ready
    assert loading is not None and not loading.done()
    await running.stop(grace=0)
    # The retry loop does not outlive the service.
    assert loading.cancelled()

"""`python -m services.kit.healthcheck HOST:PORT [SERVICE]`: exit 0 when SERVING.

The container health check, so images need no extra probe binary.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return False
    ok: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not ok:
        print(
            f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr
        )
    return ok


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(0 if check(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "") else 1)

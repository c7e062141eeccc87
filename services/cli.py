"""The `ballast` command: run one service, or the whole suite in one process.

ballast serve limiter        one service (same as `python -m services.limiter`)
ballast up                   all five services, each on its own port
ballast up --only router,limiter
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from services import registry
from services.edge.config import EdgeSettings
from services.kit.config import SERVICE_NAMES, ConfigError
from services.kit.logging import setup_logging
from services.kit.server import run_until_signal
from services.kit.telemetry import setup_telemetry


def _run(names: Sequence[str]) -> int:
    try:
        settings = registry.load_all_settings(names)
    except ConfigError as exc:
        print(f"ballast: {exc}", file=sys.stderr)
        return 2
    first = next(iter(settings.values())).server
    setup_logging(first.log_level, first.log_format)
    if len(settings) > 1 or os.environ.get("BALLAST_BANNER") == "1":
        _banner(settings)

    async def serve() -> None:
        # Apps are built inside the running loop: gRPC channels and pools bind to the loop they start on.
        apps = [registry.build_app(name, s, setup_telemetry(name)) for name, s in settings.items()]
        await run_until_signal(apps)

    asyncio.run(serve())
    return 0


def _banner(settings: dict[str, object]) -> None:
    lines = ["Ballast is up:"]
    for name, s in settings.items():
        server = getattr(s, "server")  # noqa: B009 - every settings object has one
        lines.append(f"  {name:<9} {server.host}:{server.port}")
    edge = settings.get("edge")
    if edge is not None:
        port = getattr(edge, "server").port  # noqa: B009
        if isinstance(edge, EdgeSettings) and edge.http_enabled:
            http = f"{edge.server.host}:{edge.http_port}"
            lines.append(f"  {'edge http':<9} {http}  (OpenAI-compatible API: base_url http://{http}/v1)")
        lines.append(f"Try: grpcurl -plaintext 127.0.0.1:{port} list")
    print("\n".join(lines), file=sys.stderr, flush=True)


def serve_one(name: str) -> int:
    return _run([name])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ballast", description="Run Ballast services.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=SERVICE_NAMES)
    up = sub.add_parser("up", help="run every service in one process, each on its own port")
    up.add_argument("--only", default=",".join(SERVICE_NAMES), help="comma-separated services to run")
    sub.add_parser(
        "demo", help="the front-page surge in a minute, then leave the suite running", add_help=False
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "demo":
        from services.surge.demo import main as demo_main

        return demo_main(list(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_one(args.service)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        registry.ordered(names)
    except ValueError as exc:
        parser.error(str(exc))
    return _run(names)


if __name__ == "__main__":
    raise SystemExit(main())

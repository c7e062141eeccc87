"""The `ballast` command: run one service, or the whole suite in one process.

ballast serve limiter        one service (same as `python -m services.limiter`)
ballast serve worker         the burst queue's workers alone (the edge then runs BALLAST_EDGE_WORKERS=0)
ballast migrate sessions     apply the sessions schema migrations and exit (a Kubernetes Job)
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
from services.kit.config import SERVICE_NAMES, ConfigError, Env
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
        lines.append(f"Try: grpcurl -plaintext 127.0.0.1:{port} list")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _migrate(wait: str | None) -> int:
    """`ballast migrate sessions`: what a Kubernetes Job runs before the sessions replicas roll."""
    from services.sessions import migrate

    env = Env()
    settings = registry.load_settings("sessions", env)
    # The flag is checked like a variable, so a bad one is named with what it accepts.
    flags = Env({"--wait": wait or ""})
    timeout = flags.duration("--wait", 0.0)
    env.problems.extend(flags.problems)
    try:
        env.check()
        setup_logging(settings.server.log_level, settings.server.log_format)
        if wait is None:
            applied = asyncio.run(migrate.apply(settings))
            print(
                f"ballast: sessions schema migrations applied: {applied or 'none, up to date'}",
                file=sys.stderr,
            )
            return 0
        lacking = asyncio.run(migrate.wait(settings, timeout))
    except (ConfigError, migrate.MigrateError) as exc:
        print(f"ballast: {exc}", file=sys.stderr)
        return 2
    if lacking:
        print(f"ballast: sessions schema migrations still missing after {wait}: {lacking}", file=sys.stderr)
        return 1
    return 0


def serve_one(name: str) -> int:
    return _run([name])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ballast", description="Run Ballast services.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=[*SERVICE_NAMES, *registry.ROLES])
    up = sub.add_parser("up", help="run every service in one process, each on its own port")
    up.add_argument("--only", default=",".join(SERVICE_NAMES), help="comma-separated services to run")
    migrate = sub.add_parser("migrate", help="apply a store's schema migrations and exit")
    migrate.add_argument("service", choices=["sessions"])
    migrate.add_argument(
        "--wait",
        metavar="DURATION",
        help="apply nothing: wait (up to DURATION, e.g. 10m) until the migrations this build needs are applied",
    )
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
    if args.command == "migrate":
        return _migrate(args.wait)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        registry.ordered(names)
    except ValueError as exc:
        parser.error(str(exc))
    return _run(names)


if __name__ == "__main__":
    raise SystemExit(main())

"""The `ballast` command: run one service, or the whole suite in one process.

ballast serve limiter        one service (same as `python -m services.limiter`)
ballast serve worker         the burst queue's workers alone (the edge then runs BALLAST_EDGE_WORKERS=0)
ballast migrate sessions     apply the sessions schema migrations and exit (a Kubernetes Job)
ballast up                   all five services, each on its own port
ballast up --only router,limiter
ballast certs DIR            a local CA and a certificate per service, for mutual TLS
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from services import registry
from services.kit.config import SERVICE_NAMES, ConfigError, Env
from services.kit.entry import run
from services.kit.logging import setup_logging

# Commands that live outside services/ (the demo is a client of the suite, not a service)
# register here from their own package's metadata, so nothing in services/ imports them.
PLUGIN_GROUP = "ballast.commands"


def _run(names: Sequence[str]) -> int:
    show_banner = len(names) > 1 or os.environ.get("BALLAST_BANNER") == "1"
    chosen = registry.entries(names)
    return run(chosen, banner=(lambda s: _banner(chosen, s)) if show_banner else None)


def _banner(chosen: Sequence[Any], settings: Sequence[Any]) -> None:
    lines = ["Ballast is up:"]
    edge_port = None
    for entry, s in zip(chosen, settings, strict=True):
        lines.append(f"  {entry.name:<9} {s.server.host}:{s.server.port}")
        if entry.name == "edge":
            edge_port = s.server.port
    if edge_port is not None:
        lines.append(f"Try: grpcurl -plaintext 127.0.0.1:{edge_port} list")
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


def certs(argv: Sequence[str]) -> int:
    """`ballast certs DIR`: a local CA and one certificate per service (see services/kit/certs.py)."""
    from services.kit.certs import make_certs

    parser = argparse.ArgumentParser(
        prog="ballast certs",
        description="Make a local CA and a certificate for each service, for mutual TLS between them.",
    )
    parser.add_argument("dir", type=Path, help="where to write ca.crt, ca.key and <service>/tls.{crt,key}")
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        dest="names",
        help="another DNS name or IP for every certificate, {service} standing for the service's "
        "name (repeatable; e.g. '{service}.ballast.svc.cluster.local')",
    )
    parser.add_argument(
        "--identity",
        action="append",
        default=[],
        help="a certificate for another client too, e.g. 'operator' for grpcurl (repeatable)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of each certificate (default 365)")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be at least 1")
    try:
        made = make_certs(args.dir, [*SERVICE_NAMES, *args.identity], extra_names=args.names, days=args.days)
    except (OSError, ValueError) as exc:
        print(f"ballast certs: {exc}", file=sys.stderr)
        return 1
    print(
        f"CA: {args.dir / 'ca.crt'} (its key {args.dir / 'ca.key'} signs new certificates: keep it private)"
    )
    for identity in made.values():
        print(f"  {identity.name:<9} {identity.cert_file}  {identity.key_file}")
    print(
        "Per service: BALLAST_TLS_CERT_FILE=<dir>/<service>/tls.crt BALLAST_TLS_KEY_FILE=<dir>/<service>/tls.key "
        "BALLAST_TLS_CA_FILE=<dir>/<service>/ca.crt"
    )
    return 0


def serve_one(name: str) -> int:
    return _run([name])


def _plugin(command: str) -> Any | None:
    for found in entry_points(group=PLUGIN_GROUP):
        if found.name == command:
            return found.load()
    return None


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
    sub.add_parser("certs", help="make a local CA and a certificate per service (mutual TLS)", add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "certs":
        return certs(list(argv[1:]))
    if argv and argv[0] == "demo":
        demo_main = _plugin("demo")
        if demo_main is None:
            print("ballast: the demo is not installed (pip install 'ballast[demo]')", file=sys.stderr)
            return 2
        status: int = demo_main(list(argv[1:]))
        return status
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

"""`python -m services.router.sim --port N`: run one SIMULATED provider on its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from services.router.catalog import Outage, SimSpec
from services.router.sim.server import SimServer


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.router.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--name", default="sim", help="provider name shown in answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=200.0, help="median time to first token")
    parser.add_argument("--p99-ms", type=float, default=800.0)
    parser.add_argument("--distribution", choices=["fixed", "uniform", "lognormal"], default="lognormal")
    parser.add_argument("--tokens-per-second", type=float, default=100.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--rate-limit-rate", type=float, default=0.0)
    parser.add_argument(
        "--answer-pieces",
        type=int,
        default=0,
        help="pieces (streamed chunks, output tokens) of every answer: the label, the words and "
        "the final '.' (0: 14 to 37, seeded)",
    )
    parser.add_argument("--rpm", type=int, default=0)
    parser.add_argument("--tpm", type=int, default=0)
    parser.add_argument(
        "--outage",
        action="append",
        default=[],
        metavar="START:DURATION:MODE",
        help="scripted outage in seconds since start, mode down|hang|error|break|stall|no_credit",
    )
    args = parser.parse_args()
    if args.answer_pieces < 0 or args.answer_pieces == 1:
        parser.error("--answer-pieces: 0 (seeded length) or at least 2 (the label and the final '.')")
    outages = []
    for text in args.outage:
        start, duration, mode = text.split(":")
        outages.append(Outage(float(start), float(duration), mode))
    spec = SimSpec(
        seed=args.seed,
        latency_distribution=args.distribution,
        latency_median_ms=args.latency_ms,
        latency_p99_ms=max(args.p99_ms, args.latency_ms),
        tokens_per_second=args.tokens_per_second,
        error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate,
        rpm=args.rpm,
        tpm=args.tpm,
        outages=tuple(outages),
        answer_pieces=args.answer_pieces,
    )

    async def run() -> None:
        server = SimServer(args.name, spec)
        port = await server.start(args.host, args.port)
        print(
            f"SIMULATED provider {args.name!r} on http://{args.host}:{port} (OpenAI: /v1/chat/completions, "
            f"Anthropic: /v1/messages, /v1/embeddings, admin: POST /admin/fault)",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

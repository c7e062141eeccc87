"""Provider answers replayed byte for byte through the real adapters (and through the router).

The transcripts in data/replay/ are written from the OpenAI and Anthropic API references: JSON
answers and SSE streams as the APIs frame them, with their rate-limit headers; tool calls
(parallel, arguments split across deltas), thinking blocks, prompt-cache usage, errors. Each is
delivered whole, in small chunks and gzip-compressed; each stream also without the blank line
after its last event, which the SDKs accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from ballast.router.v1 import router_pb2

from services.router.catalog import Provider, load_catalog, parse_catalog
from services.router.model import ChatRequest, Finish, Message, Role, Usage
from services.router.pricing import cost_of
from services.router.providers.base import ClientOptions, Outcome, ProviderError, build_adapter
from tests.conftest import SuiteFactory
from tests.unit.router.conftest import FAST_ENV, complete_request, write
from tests.unit.router.replay import Delivery, ReplayServer, transcript
from tests.unit.router.test_adapters import Sink, collect

DELIVERIES = {
    "whole": Delivery(),
    "1-byte chunks": Delivery(chunk=1),
    "7-byte chunks": Delivery(chunk=7),
    "gzip": Delivery(gzip=True),
    "gzip in 5-byte chunks": Delivery(chunk=5, gzip=True),
}
CATALOG = load_catalog(Path(__file__).parents[3] / "config" / "router_catalog.yaml")
GPT_4O = CATALOG.models["gpt-4o"]
CLAUDE_SONNET = CATALOG.models["claude-sonnet"]
REQUEST = ChatRequest((Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "hello")))


@dataclass(frozen=True)
class Expected:
    text: str
    finish: Finish
    usage: Usage
    tool_calls: tuple[tuple[str, str, dict[str, str]], ...] = ()
    usage_reported: bool = True


ANTHROPIC_CACHED_USAGE = Usage(
    input_tokens=120 + 3000 + 1000, output_tokens=400, cached_input_tokens=3000, cache_write_input_tokens=1000
)
ANSWERS = {
    "openai_chat_cached.http": Expected(
        "The invoice total is $1,204.50.", Finish.STOP, Usage(2006, 300, cached_input_tokens=1920)
    ),
    "openai_stream_text.sse": Expected(
        "Hello! How can I help?", Finish.STOP, Usage(1200, 7, cached_input_tokens=1024)
    ),
    "openai_stream_tools.sse": Expected(
        "",
        Finish.TOOL_CALLS,
        Usage(85, 46),
        (("call_Oslo1", "get_weather", {"city": "Oslo"}), ("call_Rome2", "get_weather", {"city": "Rome"})),
    ),
    "openai_stream_no_usage.sse": Expected(
        "Paris is the capital of France.", Finish.STOP, Usage(), usage_reported=False
    ),
    "anthropic_message_cached.http": Expected(
        "Clause 4.2 caps liability at the fees paid in the prior 12 months.",
        Finish.STOP,
        ANTHROPIC_CACHED_USAGE,
    ),
    "anthropic_stream_cached.sse": Expected(
        "Clause 4.2 caps liability at the fees paid in the prior 12 months.",
        Finish.STOP,
        ANTHROPIC_CACHED_USAGE,
    ),
    "anthropic_stream_tools.sse": Expected(
        "Checking both.",
        Finish.TOOL_CALLS,
        Usage(412, 89),
        (
            ("toolu_01Oslo", "get_weather", {"city": "Oslo"}),
            ("toolu_02Rome", "get_weather", {"city": "Rome"}),
        ),
    ),
}


def provider(wire: str, url: str, **kw: object) -> Provider:
    base = f"{url}/v1" if wire == "openai" else url
    return Provider(name=wire, kind=wire, base_url=base, wire=wire, **kw)  # type: ignore[arg-type]


def without_final_blank_line(raw: bytes) -> bytes:
    return raw.rstrip(b"\n")


CASES = [
    (name, trimmed) for name in ANSWERS for trimmed in ([False, True] if name.endswith(".sse") else [False])
]


@pytest.mark.parametrize("delivery", list(DELIVERIES))
@pytest.mark.parametrize(
    ("name", "trimmed"), CASES, ids=[f"{n}{'-no-final-blank-line' if t else ''}" for n, t in CASES]
)
async def test_replayed_answers(name: str, delivery: str, trimmed: bool) -> None:
    raw = transcript(name)
    expected = ANSWERS[name]
    wire = name.split("_", 1)[0]
    model = GPT_4O if wire == "openai" else CLAUDE_SONNET
    sink = Sink()
    async with ReplayServer(
        [without_final_blank_line(raw) if trimmed else raw], DELIVERIES[delivery]
    ) as server:
        adapter = build_adapter(provider(wire, server.url), ClientOptions(), sink)
        try:
            if name.endswith(".sse"):
                deltas, result = await collect(adapter.stream(model, REQUEST))
            else:
                deltas, result = [], await adapter.complete(model, REQUEST)
        finally:
            await adapter.aclose()
        sent = json.loads(server.requests[0].body)
    assert result.message.content == expected.text
    assert result.finish is expected.finish
    assert result.usage == expected.usage
    assert result.usage_reported is expected.usage_reported
    calls = tuple((c.id, c.name, json.loads(c.arguments_json)) for c in result.message.tool_calls)
    assert calls == expected.tool_calls
    if deltas:
        # What was streamed is what was assembled.
        assert "".join(d.text for d in deltas) == expected.text
        for index, (_, _, arguments) in enumerate(expected.tool_calls):
            fragments = "".join(
                t.arguments_fragment for d in deltas for t in d.tool_calls if t.index == index
            )
            assert json.loads(fragments) == arguments
    assert sent["stream"] is True if name.endswith(".sse") else "stream" not in sent
    # The headers were read on the way: every transcript carries the provider's rate-limit state.
    if "no_usage" not in name:
        status, headroom = sink.seen[-1]
        assert status == 200 and headroom is not None and headroom.limit_requests > 0


def test_cached_anthropic_call_costs_what_the_price_sheet_says() -> None:
    # claude-sonnet-4: $3 input, $3.75 cache write (5 min), $0.30 cache read, $15 output per MTok.
    assert (
        CLAUDE_SONNET.input_price_micros_per_mtok,
        CLAUDE_SONNET.cache_write_price,
        CLAUDE_SONNET.cached_input_price_micros_per_mtok,
        CLAUDE_SONNET.output_price_micros_per_mtok,
    ) == (3_000_000, 3_750_000, 300_000, 15_000_000)
    cost = cost_of(CLAUDE_SONNET, ANTHROPIC_CACHED_USAGE)
    # 120 x $3 + 1000 x $3.75 + 3000 x $0.30 = $0.005010; 400 x $15 = $0.006000 (per million)
    assert (cost.input_micros, cost.output_micros, cost.total_micros) == (5010, 6000, 11010)
    openai = cost_of(GPT_4O, ANSWERS["openai_chat_cached.http"].usage)
    # 86 x $2.50 + 1920 x $1.25 = $0.002615; 300 x $10 = $0.003000
    assert (openai.input_micros, openai.output_micros) == (2615, 3000)


def test_an_anthropic_model_without_cache_prices_gets_the_price_sheet_multipliers() -> None:
    catalog = parse_catalog(
        """
providers:
  a: {kind: anthropic, base_url: "http://127.0.0.1:1"}
  o: {kind: openai, base_url: "http://127.0.0.1:1/v1"}
models:
  c: {provider: a, input_price_micros_per_mtok: 800000, output_price_micros_per_mtok: 4000000}
  g: {provider: o, input_price_micros_per_mtok: 150000, output_price_micros_per_mtok: 600000}
aliases:
  budget: {candidates: [c]}
  reasoning: {candidates: [c]}
tier_defaults: {default: budget}
"""
    )
    claude, gpt = catalog.models["c"], catalog.models["g"]
    assert (claude.cached_input_price_micros_per_mtok, claude.cache_write_price) == (80_000, 1_000_000)
    assert (gpt.cached_input_price_micros_per_mtok, gpt.cache_write_price) == (150_000, 150_000)


async def test_an_error_event_mid_stream_is_a_summarised_server_error() -> None:
    async with ReplayServer([transcript("anthropic_stream_overloaded.sse")], Delivery(chunk=3)) as server:
        adapter = build_adapter(provider("anthropic", server.url), ClientOptions(), Sink())
        try:
            with pytest.raises(ProviderError) as info:
                await collect(adapter.stream(CLAUDE_SONNET, REQUEST))
        finally:
            await adapter.aclose()
    assert (info.value.outcome, info.value.http_status, info.value.category) == (
        Outcome.SERVER_ERROR,
        529,
        "overloaded",
    )
    assert info.value.message == "error in stream: overloaded"


# --- through the router: the shipped catalog's models and prices, the replayed providers ----------


def shipped_catalog_pointing_at(openai_url: str, anthropic_url: str, tmp_path: Path) -> str:
    text = (Path(__file__).parents[3] / "config" / "router_catalog.yaml").read_text()
    text = text.replace("https://api.openai.com/v1", f"{openai_url}/v1")
    text = text.replace("https://api.anthropic.com", anthropic_url)
    return write(tmp_path, text)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_cached_anthropic_cost_through_the_router(
    suite_factory: SuiteFactory, tmp_path: Path, stream: bool
) -> None:
    name = "anthropic_stream_cached.sse" if stream else "anthropic_message_cached.http"
    async with (
        ReplayServer([transcript("openai_chat_cached.http")]) as openai,
        ReplayServer([transcript(name)], Delivery(chunk=11)) as anthropic,
    ):
        suite = await suite_factory(
            ["router"],
            {
                **FAST_ENV,
                "BALLAST_ROUTER_CATALOG_FILE": shipped_catalog_pointing_at(
                    openai.url, anthropic.url, tmp_path
                ),
                "OPENAI_API_KEY": "sk-test-openai",
                "ANTHROPIC_API_KEY": "sk-ant-test",
            },
        )
        request = complete_request(model="claude-sonnet")
        if stream:
            events = [
                e
                async for e in suite.router.StreamComplete(router_pb2.StreamCompleteRequest(request=request))
            ]
            reply = events[-1].done
        else:
            reply = await suite.router.Complete(request, timeout=10)
    assert (reply.provider, reply.model) == ("anthropic", "claude-sonnet")
    usage = reply.usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_input_tokens) == (
        4120,
        3000,
        1000,
    )
    assert (usage.output_tokens, usage.estimated) == (400, False)
    assert (reply.cost.input_cost_micros, reply.cost.output_cost_micros, reply.cost.total_cost_micros) == (
        5010,
        6000,
        11010,
    )


async def test_a_stream_without_usage_yields_a_flagged_tokenizer_estimate(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    async with (
        ReplayServer([transcript("openai_stream_no_usage.sse")]) as openai,
        ReplayServer([transcript("anthropic_message_cached.http")]) as anthropic,
    ):
        suite = await suite_factory(
            ["router"],
            {
                **FAST_ENV,
                "BALLAST_ROUTER_CATALOG_FILE": shipped_catalog_pointing_at(
                    openai.url, anthropic.url, tmp_path
                ),
                "OPENAI_API_KEY": "sk-test-openai",
            },
        )
        request = complete_request(model="gpt-4o-mini", text="What is the capital of France?")
        events = [
            e async for e in suite.router.StreamComplete(router_pb2.StreamCompleteRequest(request=request))
        ]
    done = events[-1].done
    assert done.message.content == "Paris is the capital of France."
    # cl100k_base: the answer is 7 tokens; the prompt is one message (3 tokens of framing and 7
    # of text) and 3 that prime the reply.
    assert done.usage.estimated
    assert done.usage.output_tokens == 7
    assert done.usage.input_tokens == 3 + 3 + 7
    assert done.cost.total_cost_micros > 0


async def test_embeddings_without_usage_get_a_flagged_estimate(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    async with (
        ReplayServer([transcript("openai_embeddings_no_usage.http")]) as openai,
        ReplayServer([transcript("anthropic_message_cached.http")]) as anthropic,
    ):
        suite = await suite_factory(
            ["router"],
            {
                **FAST_ENV,
                "BALLAST_ROUTER_CATALOG_FILE": shipped_catalog_pointing_at(
                    openai.url, anthropic.url, tmp_path
                ),
                "OPENAI_API_KEY": "sk-test-openai",
            },
        )
        reply = await suite.router.Embed(
            router_pb2.EmbedRequest(model="text-embedding-3-small", inputs=["a cat sat on the mat"]),
            timeout=10,
        )
    assert len(reply.embeddings) == 1
    # cl100k_base: "a cat sat on the mat" is 6 tokens; $0.02 per million rounds to 0 micro-dollars.
    assert (reply.usage.input_tokens, reply.usage.estimated) == (6, True)

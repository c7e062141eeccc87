"""Per-model capabilities from the catalog, checked before a call and seen at the wire: a model
whose entry takes no temperature never receives one; `reject` refuses the request naming the field
(and never calls the provider); tools never go to a model without tool use."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from ballast.common.v1 import common_pb2
from ballast.router.v1 import router_pb2

from services.router.catalog import CatalogError, parse_catalog
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.status import violated_fields
from tests.unit.router.conftest import FAST_ENV, complete_request, write
from tests.unit.router.replay import ReplayServer, transcript

R = router_pb2
SAMPLING = common_pb2.GenerationParams(temperature=0.3, top_p=0.9, seed=7, stop=["END"])
TOOL = common_pb2.ToolDefinition(name="get_weather", parameters_json_schema='{"type":"object"}')


def catalog(openai_url: str, anthropic_url: str) -> str:
    return f"""
providers:
  openai: {{kind: openai, base_url: "{openai_url}/v1"}}
  anthropic: {{kind: anthropic, base_url: "{anthropic_url}"}}
models:
  reasoner:
    provider: openai
    provider_model: o4-mini
    capabilities: {{params: [seed], unsupported_params: drop, thinking: true}}
  thinker:
    provider: anthropic
    provider_model: claude-sonnet-4-20250514
    capabilities: {{params: [top_p, stop], thinking: true}}
  strict:
    provider: openai
    provider_model: gpt-strict
    capabilities: {{params: [top_p], unsupported_params: reject, tools: false}}
  lenient: {{provider: anthropic, provider_model: claude-3-5-haiku-20241022}}
aliases:
  strict-first: {{candidates: [strict, lenient]}}
  strict-only: {{candidates: [strict]}}
  budget: {{candidates: [lenient]}}
  reasoning: {{candidates: [thinker]}}
tier_defaults: {{default: budget}}
"""


async def start(
    suite_factory: SuiteFactory, tmp_path: Path, openai: ReplayServer, anthropic: ReplayServer
) -> Suite:
    env = {**FAST_ENV, "BALLAST_ROUTER_CATALOG_FILE": write(tmp_path, catalog(openai.url, anthropic.url))}
    return await suite_factory(["router"], env)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_model_that_takes_no_temperature_never_receives_one(
    suite_factory: SuiteFactory, tmp_path: Path, stream: bool
) -> None:
    openai_answer = "openai_stream_text.sse" if stream else "openai_chat_cached.http"
    anthropic_answer = "anthropic_stream_cached.sse" if stream else "anthropic_message_cached.http"
    async with (
        ReplayServer([transcript(openai_answer)]) as openai,
        ReplayServer([transcript(anthropic_answer)]) as anthropic,
    ):
        suite = await start(suite_factory, tmp_path, openai, anthropic)
        for model in ("reasoner", "thinker"):
            request = complete_request(model=model, params=SAMPLING)
            if stream:
                events = [
                    e async for e in suite.router.StreamComplete(R.StreamCompleteRequest(request=request))
                ]
                assert events[-1].HasField("done")
            else:
                await suite.router.Complete(request, timeout=10)
        (to_openai,) = [json.loads(r.body) for r in openai.requests]
        (to_anthropic,) = [json.loads(r.body) for r in anthropic.requests]
    # o4-mini takes only the seed; the rest was dropped before the wire.
    assert "temperature" not in to_openai and "top_p" not in to_openai and "stop" not in to_openai
    assert to_openai["seed"] == 7
    # the thinking Claude takes top_p and stop sequences, never temperature (and Anthropic no seed).
    assert "temperature" not in to_anthropic and "seed" not in to_anthropic
    assert (to_anthropic["top_p"], to_anthropic["stop_sequences"]) == (0.9, ["END"])


async def test_reject_names_the_field_and_calls_no_provider(
    suite_factory: SuiteFactory, tmp_path: Path
) -> None:
    async with (
        ReplayServer([transcript("openai_chat_cached.http")]) as openai,
        ReplayServer([transcript("anthropic_message_cached.http")]) as anthropic,
    ):
        suite = await start(suite_factory, tmp_path, openai, anthropic)
        params = common_pb2.GenerationParams(temperature=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.router.Complete(complete_request(model="strict", params=params), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as tools:
            await suite.router.Complete(complete_request(model="strict-only", tools=[TOOL]), timeout=10)
        # With another candidate that takes it, the request simply goes there.
        reply = await suite.router.Complete(complete_request(model="strict-first", params=params), timeout=10)
        # top_p is one the strict model takes.
        allowed = await suite.router.Complete(
            complete_request(model="strict", params=common_pb2.GenerationParams(top_p=0.5)), timeout=10
        )
        sent = [json.loads(r.body) for r in openai.requests]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(info.value) == ["params.temperature"]
    assert "model 'strict' does not take temperature" in (info.value.details() or "")
    assert tools.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violated_fields(tools.value) == [
        "tools"
    ]
    assert [(a.provider, a.outcome) for a in reply.attempts] == [("anthropic", R.ATTEMPT_OUTCOME_OK)]
    assert allowed.provider == "openai"
    assert sent == [sent[0]] and sent[0]["top_p"] == 0.5  # only the allowed request reached OpenAI


async def test_list_models_reports_capabilities_and_cache_prices(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(["router"], {**FAST_ENV, "OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"})
    reply = await suite.router.ListModels(R.ListModelsRequest(), timeout=10)
    models = {m.id: m for m in reply.models}
    claude = models["claude-sonnet"]
    assert (claude.cache_read_price_micros_per_mtok, claude.cache_write_price_micros_per_mtok) == (
        300_000,
        3_750_000,
    )
    assert list(claude.capabilities.params) == ["stop", "temperature", "top_p"]
    assert claude.capabilities.thinking and claude.capabilities.tools
    reasoner = models["o4-mini"]
    assert (
        list(reasoner.capabilities.params) == ["seed"] and reasoner.capabilities.unsupported_params == "drop"
    )


def test_the_catalog_refuses_unknown_capabilities() -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(
            """
providers:
  p: {kind: openai_compatible, base_url: "http://127.0.0.1:1/v1"}
models:
  m:
    provider: p
    capabilities: {params: [temperature, top_k], unsupported_params: ignore, sight: true}
aliases:
  budget: {candidates: [m]}
  reasoning: {candidates: [m]}
tier_defaults: {default: budget}
""",
            "cat.yaml",
        )
    problems = "\n".join(info.value.problems)
    assert "cat.yaml:7: models.m.capabilities: unknown key 'sight'" in problems
    assert "models.m.capabilities.params[1]: 'top_k' is not one of temperature, top_p, stop, seed" in problems
    assert "models.m.capabilities.unsupported_params: 'ignore' is not one of drop, reject" in problems

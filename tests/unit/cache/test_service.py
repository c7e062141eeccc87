"""The cache service through a real in-process gRPC server (memory and Redis stores, local MiniLM)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from ballast.cache.v1 import cache_pb2
from ballast.common.v1 import common_pb2
from google.protobuf import duration_pb2

from services.cache.app import CacheApp
from services.testing import Suite
from tests.conftest import SuiteFactory
from tests.support.status import violated_field
from tests.unit.cache.helpers import lookup, scope, store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


MakeSuite = Callable[..., Awaitable[tuple[Suite, FakeClock]]]


@pytest.fixture(params=["memory", "redis"])
def make_suite(request: pytest.FixtureRequest, suite_factory: SuiteFactory) -> MakeSuite:
    """Starts the cache (memory store, then Redis: every test runs against both) with a fake clock."""
    store_url = "memory://" if request.param == "memory" else str(request.getfixturevalue("redis_url"))

    async def make(**env: str) -> tuple[Suite, FakeClock]:
        suite = await suite_factory(
            ["cache"], {"BALLAST_CACHE_FILE": "/nonexistent.yaml", "BALLAST_CACHE_STORE": store_url, **env}
        )
        clock = FakeClock()
        app = suite.running["cache"].app
        assert isinstance(app, CacheApp)
        app.clock = clock
        return suite, clock

    return make


async def test_exact_hit_then_semantic_hit_with_similarity(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    miss = await cache.Lookup(lookup("How do I reset my password?"))
    assert not miss.hit
    stored = await cache.Store(store("How do I reset my password?", "Use the 'Forgot password' link."))
    assert stored.stored and stored.entry_id
    exact = await cache.Lookup(lookup("how do I reset my password"))
    assert exact.hit and exact.tier == cache_pb2.HIT_TIER_EXACT and exact.similarity == 1.0
    assert exact.answer.message.content == "Use the 'Forgot password' link."
    assert exact.answer.usage.total_tokens == 50 and exact.answer.created_at.seconds > 0
    near = await cache.Lookup(lookup("How do I reset my password please?", threshold=0.9))
    assert near.hit and near.tier == cache_pb2.HIT_TIER_SEMANTIC, near.miss_reason
    assert 0.9 <= near.similarity < 1.0
    assert near.entry_id == stored.entry_id
    exact_only = await cache.Lookup(lookup("How do I reset my password please?", semantic=False))
    assert not exact_only.hit


async def test_guards_reject_near_misses_and_count_them(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    await cache.Store(store("Is the store open on Sunday?", "Yes, 10:00-16:00."))
    await cache.Store(store("Can I book a table for 4 people?", "Yes."))
    for question in (
        "Is the store closed on Sunday?",
        "Is the store open on Monday?",
        "Is the store not open on Sunday?",
    ):
        reply = await cache.Lookup(lookup(question, threshold=0.5))
        assert not reply.hit, question
        assert "guard" in reply.miss_reason and reply.similarity > 0.5
    reply = await cache.Lookup(lookup("Can I book a table for 5 people?", threshold=0.5))
    assert not reply.hit and "numbers guard" in reply.miss_reason
    stats = await cache.GetStats(cache_pb2.GetStatsRequest(scope=scope()))
    [ns] = stats.namespaces
    assert ns.namespace == "default" and ns.lookups == 4 and ns.guard_rejections >= 4
    assert ns.entries == 2 and ns.bytes > 0 and ns.semantic_hits == 0


async def test_follow_up_turns_only_match_the_same_conversation(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite(BALLAST_CACHE_SEMANTIC_FOLLOW_UPS="false")
    cache = suite.cache
    shoes = [("Do you sell running shoes?", "Yes, from Acme and Bolt.")]
    hats = [("Do you sell hats?", "Yes, caps and beanies.")]
    await cache.Store(store("How much is the cheapest one?", "$40.", history=shoes))
    same = await cache.Lookup(lookup("How much is the cheapest one?", history=shoes))
    assert same.hit and same.tier == cache_pb2.HIT_TIER_EXACT
    other = await cache.Lookup(lookup("How much is the cheapest one?", history=hats))
    assert not other.hit
    standalone = await cache.Lookup(lookup("How much is the cheapest one?"))
    assert not standalone.hit
    paraphrase = await cache.Lookup(lookup("What does the cheapest one cost?", history=shoes, threshold=0.1))
    assert not paraphrase.hit and "follow-up" in paraphrase.miss_reason


async def test_follow_ups_are_matched_within_the_same_conversation_state(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    shoes = [("Do you sell running shoes?", "Yes, from Acme and Bolt.")]
    hats = [("Do you sell hats?", "Yes, caps and beanies.")]
    await cache.Store(store("How much is the cheapest one?", "$40.", history=shoes))
    # The same conversation resent with other case and punctuation is the same state.
    resent = [("do you sell running shoes", "Yes, from Acme and Bolt.")]
    cosmetic = await cache.Lookup(lookup("How much is the cheapest one?", history=resent))
    assert cosmetic.hit and cosmetic.tier == cache_pb2.HIT_TIER_EXACT
    # The follow-up in other words, after the same conversation: a semantic hit.
    reworded = await cache.Lookup(lookup("What does the cheapest one cost?", history=shoes, threshold=0.8))
    assert reworded.hit and reworded.tier == cache_pb2.HIT_TIER_SEMANTIC, reworded.miss_reason
    assert reworded.answer.message.content == "$40."
    # After another conversation it never matches, however similar the follow-up (even identical).
    for question in ("What does the cheapest one cost?", "How much is the cheapest one?"):
        other = await cache.Lookup(lookup(question, history=hats, threshold=0.01))
        assert not other.hit, question
    # Another answer in the conversation changes the state too.
    changed = [("Do you sell running shoes?", "Only from Bolt.")]
    assert not (
        await cache.Lookup(lookup("How much is the cheapest one?", history=changed, threshold=0.01))
    ).hit
    # The guards still apply within a conversation: another number is another question.
    await cache.Store(store("What about size 9?", "In stock.", history=shoes))
    size = await cache.Lookup(lookup("What about size 10?", history=shoes, threshold=0.01))
    assert not size.hit


async def test_exact_only_entries_are_served_exactly_and_never_semantically(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    shoes = [("Do you sell running shoes?", "Yes, from Acme and Bolt.")]
    for history in ((), shoes):
        await cache.Store(store("How much is the cheapest one?", "$40.", history=history, exact_only=True))
        exact = await cache.Lookup(lookup("how much is the cheapest one", history=history))
        assert exact.hit and exact.tier == cache_pb2.HIT_TIER_EXACT
        # No vector was kept for it (the embedding was spared), so no paraphrase can reach it.
        reworded = await cache.Lookup(
            lookup("What does the cheapest one cost?", history=history, threshold=0.01)
        )
        assert not reworded.hit and reworded.miss_reason == "no similar entry", reworded.miss_reason


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("tenant", "t2"),
        ("user", "u9"),
        ("namespace", "other"),
        ("model", "gpt-other"),
        ("system", "Be terse."),
    ],
)
async def test_scope_is_a_hard_partition(make_suite: MakeSuite, change: str, value: str) -> None:
    suite, _ = await make_suite()
    await suite.cache.Store(store("What are your opening hours?", "9 to 5."))
    kwargs: dict[str, Any] = {change: value}
    reply = await suite.cache.Lookup(lookup("What are your opening hours?", threshold=0.01, **kwargs))
    assert not reply.hit


async def test_tenant_isolation_whatever_the_similarity(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    questions = ["What are your opening hours?", "How do I reset my password?", "Where is my order?"]
    for q in questions:
        await suite.cache.Store(store(q, f"secret of t1: {q}", tenant="t1"))
    for q in questions:
        for semantic in (True, False):
            reply = await suite.cache.Lookup(lookup(q, tenant="t2", semantic=semantic, threshold=0.0001))
            assert not reply.hit
        assert (await suite.cache.Lookup(lookup(q, tenant="t1"))).hit
    deleted = await suite.cache.Delete(cache_pb2.DeleteRequest(scope=scope("t2"), all_in_namespace=True))
    assert deleted.deleted == 0
    assert (await suite.cache.GetStats(cache_pb2.GetStatsRequest(scope=scope("t2")))).namespaces[
        0
    ].entries == 0


async def test_only_complete_deterministic_answers_are_stored(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    truncated = await cache.Store(
        store("Tell me a story", "Once upon", finish=common_pb2.FINISH_REASON_LENGTH)
    )
    assert not truncated.stored and "length" in truncated.not_stored_reason
    failed = await cache.Store(store("Tell me a story", "Once", finish=common_pb2.FINISH_REASON_ERROR))
    assert not failed.stored
    with_tools = store("Weather in Paris?", "")
    with_tools.answer.message.tool_calls.add(id="c1", name="weather", arguments_json='{"city":"Paris"}')
    assert not (await cache.Store(with_tools)).stored
    hot = store("Write a poem", "Roses...", params=common_pb2.GenerationParams(temperature=0.8))
    reply = await cache.Store(hot)
    assert not reply.stored and "temperature" in reply.not_stored_reason
    hot.allow_nondeterministic = True
    assert (await cache.Store(hot)).stored
    hot_lookup = lookup("Write a poem", params=common_pb2.GenerationParams(temperature=0.8))
    assert not (await cache.Lookup(hot_lookup)).hit
    hot_lookup.allow_nondeterministic = True
    assert (await cache.Lookup(hot_lookup)).hit
    assert not (await cache.Lookup(lookup("Tell me a story"))).hit


async def test_ttl_default_per_request_and_expiry(make_suite: MakeSuite) -> None:
    suite, clock = await make_suite(BALLAST_CACHE_DEFAULT_TTL="1h", BALLAST_CACHE_MAX_TTL="2h")
    cache = suite.cache
    await cache.Store(store("Q one?", "A"))
    await cache.Store(store("Q two?", "B", ttl=duration_pb2.Duration(seconds=60)))
    await cache.Store(store("Q three?", "C", ttl=duration_pb2.Duration(seconds=86400)))
    clock.now += 61
    assert (await cache.Lookup(lookup("Q one?"))).hit
    assert not (await cache.Lookup(lookup("Q two?"))).hit
    clock.now += 3600
    assert not (await cache.Lookup(lookup("Q one?"))).hit
    assert (await cache.Lookup(lookup("Q three?"))).hit  # capped at 2h, not yet expired
    clock.now += 3600
    assert not (await cache.Lookup(lookup("Q three?"))).hit


async def test_memory_bound_evicts_least_recently_used(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite(BALLAST_CACHE_MAX_BYTES="12000")
    cache = suite.cache
    for i in range(12):
        await cache.Store(store(f"Question number {i}?", "x" * 500))
    stats = (await cache.GetStats(cache_pb2.GetStatsRequest(scope=scope()))).namespaces[0]
    assert stats.bytes <= 12000 and stats.evictions > 0 and stats.entries < 12
    assert not (await cache.Lookup(lookup("Question number 0?"))).hit
    assert (await cache.Lookup(lookup("Question number 11?"))).hit


async def test_delete_by_id_attribute_and_namespace(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    a = await cache.Store(store("What does Pro cost?", "$10", attributes={"doc": "pricing"}))
    await cache.Store(store("What does Team cost?", "$20", attributes={"doc": "pricing"}, namespace="sales"))
    await cache.Store(store("Where is the office?", "Berlin", attributes={"doc": "about"}))
    await cache.Store(store("Who founded Acme?", "Ada"))
    await cache.PutToolResult(
        cache_pb2.PutToolResultRequest(scope=scope(), tool_name="t", arguments_json="{}", result="r")
    )
    other = await cache.Delete(cache_pb2.DeleteRequest(scope=scope("t2"), entry_id=a.entry_id))
    assert other.deleted == 0
    by_attr = await cache.Delete(
        cache_pb2.DeleteRequest(scope=scope(), attribute=cache_pb2.Attribute(key="doc", value="pricing"))
    )
    assert by_attr.deleted == 2
    assert not (await cache.Lookup(lookup("What does Pro cost?"))).hit
    assert not (await cache.Lookup(lookup("What does Team cost?", namespace="sales"))).hit
    got = await cache.Lookup(lookup("Where is the office?"))
    by_id = await cache.Delete(cache_pb2.DeleteRequest(scope=scope(), entry_id=got.entry_id))
    assert by_id.deleted == 1
    assert not (await cache.Lookup(lookup("Where is the office?"))).hit
    by_ns = await cache.Delete(cache_pb2.DeleteRequest(scope=scope(), all_in_namespace=True))
    assert by_ns.deleted == 2  # the answer and the tool result
    assert not (await cache.Lookup(lookup("Who founded Acme?"))).hit


async def test_tool_results_by_canonical_arguments_with_ttl(make_suite: MakeSuite, tmp_path: object) -> None:
    suite, clock = await make_suite()
    cache = suite.cache
    put = cache_pb2.PutToolResultRequest(
        scope=scope(), tool_name="weather", arguments_json='{"city": "Paris", "unit": "C"}', result="21C"
    )
    assert (await cache.PutToolResult(put)).stored
    get = cache_pb2.GetToolResultRequest(
        scope=scope(), tool_name="weather", arguments_json='{"unit":"C","city":"Paris"}'
    )
    hit = await cache.GetToolResult(get)
    assert hit.hit and hit.result == "21C" and not hit.is_error
    assert 0 < hit.remaining_ttl.seconds <= 300
    assert not (await cache.GetToolResult(cache_pb2.GetToolResultRequest(
        scope=scope(), tool_name="weather", arguments_json='{"unit":"C","city":"Rome"}'))).hit  # fmt: skip
    assert not (await cache.GetToolResult(cache_pb2.GetToolResultRequest(
        scope=scope("t2"), tool_name="weather", arguments_json='{"unit":"C","city":"Paris"}'))).hit  # fmt: skip
    clock.now += 301
    assert not (await cache.GetToolResult(get)).hit
    err = cache_pb2.PutToolResultRequest(
        scope=scope(), tool_name="w", arguments_json="{}", result="boom", is_error=True
    )
    assert (await cache.PutToolResult(err)).stored
    got = await cache.GetToolResult(
        cache_pb2.GetToolResultRequest(scope=scope(), tool_name="w", arguments_json="")
    )
    assert got.hit and got.is_error and got.remaining_ttl.seconds <= 30


async def test_retrieval_cache_and_index_version_bump(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite()
    cache = suite.cache
    docs = [
        cache_pb2.RetrievedDocument(
            id="d1", score=0.9, content="Returns within 30 days", metadata={"s": "faq"}
        )
    ]
    put = await cache.PutRetrieval(
        cache_pb2.PutRetrievalRequest(
            scope=scope(), index_name="kb", query="return policy", top_k=3, documents=docs
        )
    )
    assert put.stored and put.index_version == "v0"
    get = cache_pb2.GetRetrievalRequest(scope=scope(), index_name="kb", query="Return policy", top_k=3)
    hit = await cache.GetRetrieval(get)
    assert hit.hit and hit.index_version == "v0" and hit.documents[0].metadata["s"] == "faq"
    bumped = await cache.BumpIndexVersion(cache_pb2.BumpIndexVersionRequest(scope=scope(), index_name="kb"))
    assert bumped.index_version == "v1"
    miss = await cache.GetRetrieval(get)
    assert not miss.hit and miss.index_version == "v1"


@pytest.mark.parametrize(
    ("request_", "method", "field"),
    [
        (cache_pb2.LookupRequest(model="m"), "Lookup", "scope.tenant_id"),
        (lookup("hi", model=""), "Lookup", "model"),
        (cache_pb2.LookupRequest(scope=scope(), model="m"), "Lookup", "messages"),
        (lookup("hi", threshold=1.5), "Lookup", "threshold"),
        (
            cache_pb2.StoreRequest(scope=scope(), model="m", messages=lookup("hi").messages),
            "Store",
            "answer.message",
        ),
        (
            cache_pb2.GetToolResultRequest(scope=scope(), tool_name="t", arguments_json="{x"),
            "GetToolResult",
            "arguments_json",
        ),
        (cache_pb2.PutToolResultRequest(scope=scope(), arguments_json="{}"), "PutToolResult", "tool_name"),
        (cache_pb2.GetRetrievalRequest(scope=scope(), query="q"), "GetRetrieval", "index_name"),
        (cache_pb2.DeleteRequest(scope=scope()), "Delete", "selector"),
        (cache_pb2.GetStatsRequest(), "GetStats", "scope.tenant_id"),
        (cache_pb2.GetStatsRequest(scope=scope("t", "a\x1fb")), "GetStats", "scope.namespace"),
        (cache_pb2.StoreRequest(scope=scope("t" * 300), model="m"), "Store", "scope.tenant_id"),
    ],
)
async def test_invalid_requests_name_the_field(
    make_suite: MakeSuite, request_: object, method: str, field: str
) -> None:
    suite, _ = await make_suite(BALLAST_CACHE_PRELOAD_EMBEDDER="false")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(suite.cache, method)(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_field(info.value) == field


async def test_bad_role_is_invalid_argument(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite(BALLAST_CACHE_PRELOAD_EMBEDDER="false")
    request = lookup("hi")
    request.messages[0].role = common_pb2.ROLE_UNSPECIFIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.cache.Lookup(request)
    assert violated_field(info.value) == "messages[0].role"


async def test_long_turns_are_exact_only(make_suite: MakeSuite) -> None:
    suite, _ = await make_suite(BALLAST_CACHE_SEMANTIC_MAX_CHARS="300")
    document = "Please review this contract. " + "The parties agree to the terms below. " * 10
    await suite.cache.Store(store(document + "The fee is due monthly.", "Looks fine."))
    assert (await suite.cache.Lookup(lookup(document + "The fee is due monthly."))).hit
    other = await suite.cache.Lookup(lookup(document + "The fee is waived forever.", threshold=0.01))
    assert not other.hit and "too long" in other.miss_reason

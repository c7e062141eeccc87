"""Near-miss guards and scope keys, without the model (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cache.guards import check, features
from services.cache.keys import (
    ChatRequest,
    Message,
    NotCacheableError,
    Params,
    ScopeId,
    ToolSchema,
    is_deterministic,
    normalise,
    request_keys,
    tool_key,
)

DATA = Path(__file__).with_name("data") / "cache_eval.jsonl"
GUARDED_KINDS = ("negation", "polarity", "entity", "number", "date", "unit")


def _pairs() -> list[dict[str, object]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def test_the_labelled_set_has_a_few_hundred_pairs_of_every_kind() -> None:
    pairs = _pairs()
    kinds = {str(p["kind"]) for p in pairs}
    assert len(pairs) >= 300
    assert {"paraphrase", "multiturn", "scope", *GUARDED_KINDS} <= kinds


@pytest.mark.parametrize("kind", GUARDED_KINDS)
def test_guards_reject_every_labelled_trap_of_their_kind(kind: str) -> None:
    # The held-out pairs measure the guards; they are not a regression target.
    traps = [p for p in _pairs() if p["kind"] == kind and p.get("split") != "holdout"]
    served = [(p["a"], p["b"]) for p in traps if check(str(p["b"]), str(p["a"])).ok]
    assert served == []


def test_guards_let_paraphrases_through() -> None:
    paraphrases = [p for p in _pairs() if p["kind"] == "paraphrase" and p.get("split") != "holdout"]
    rejected = [(p["a"], p["b"]) for p in paraphrases if not check(str(p["b"]), str(p["a"])).ok]
    assert len(rejected) <= len(paraphrases) // 20, rejected


@pytest.mark.parametrize(
    ("a", "b", "guard"),
    [
        ("Is the store open on Sunday?", "Is the store closed on Sunday?", "polarity"),
        ("Is the store open on Sunday?", "Is the store open on Monday?", "dates"),
        ("Is the store open on Sunday?", "Isn't the store open on Sunday?", "negation"),
        ("Table for 4 people", "Table for four people", ""),
        ("Table for 4 people", "Table for 5 people", "numbers"),
        ("Flights from Paris to London", "Flights from London to Paris", "entities"),
        ("What is the capital of France?", "What is the capital of Germany?", "entities"),
        ("Convert 10 miles to km", "Convert 10 km to miles", "units"),
        ("How do I turn on alerts?", "How do I turn off alerts?", "polarity"),
        ("Where's my order?", "Where is my order?", ""),
        ("Is there free Wi-Fi?", "Is there free WiFi?", ""),
        ("Price is 1,000.50 USD", "Price is 1000.5 USD", ""),
        ("How do I mute the call?", "How do I unmute the call?", "polarity"),
        ("Do you like it?", "Do you dislike it?", "polarity"),
        ("How do I zoom in?", "How do I zoom out?", "polarity"),
        ("How do I opt in to emails?", "How do I opt out of emails?", "polarity"),
        ("Can I check in at 2 pm?", "Can I check in at 2 am?", "dates"),
        ("Am I late?", "Am I early?", "polarity"),
        ("Is the fee waived. Paris office", "Is the fee waived. London office", "entities"),
    ],
)
def test_guard_examples(a: str, b: str, guard: str) -> None:
    verdict = check(b, a)
    assert verdict.ok == (guard == "") and verdict.guard == guard


def test_features_are_extracted() -> None:
    f = features("I can't log in to AWS S3 at https://example.com on Friday, it costs $5")
    assert f.negations == 1 and "fri" not in f.temporal and "friday" in f.temporal
    assert {"aws", "s3", "https://example.com"} <= set(f.entities)
    assert f.numbers == ("5",) and f.units == ("usd",) and "in" in f.polar


def _chat(*messages: tuple[str, str], **kw: object) -> ChatRequest:
    base: dict[str, object] = {
        "scope": ScopeId("t1"),
        "model": "m",
        "messages": tuple(Message(r, c) for r, c in messages),
    }
    base.update(kw)
    return ChatRequest(**base)  # type: ignore[arg-type]


def test_partition_covers_scope_system_tools_and_history_but_not_the_prompt() -> None:
    base = request_keys(_chat(("system", "S"), ("user", "Hello there")))
    assert base.standalone and base.text == "Hello there"
    assert "Hello" not in base.partition
    same_partition = request_keys(_chat(("system", "S"), ("user", "Something else")))
    assert same_partition.partition == base.partition and same_partition.exact != base.exact
    variants = [
        _chat(("system", "S"), ("user", "Hello there"), scope=ScopeId("t2")),
        _chat(("system", "S"), ("user", "Hello there"), scope=ScopeId("t1", "u1")),
        _chat(("system", "S"), ("user", "Hello there"), scope=ScopeId("t1", "", "ns")),
        _chat(("system", "S"), ("user", "Hello there"), model="m2"),
        _chat(("system", "S2"), ("user", "Hello there")),
        _chat(("system", "S"), ("user", "Hello there"), tools=(ToolSchema("f", "d", "{}"),)),
        _chat(("system", "S"), ("user", "Hello there"), params=Params(stop=("END",))),
        _chat(("system", "S"), ("user", "Hi"), ("assistant", "Hey"), ("user", "Hello there")),
    ]
    partitions = {request_keys(v).partition for v in variants}
    assert len(partitions) == len(variants) and base.partition not in partitions
    follow_up = request_keys(variants[-1])
    assert not follow_up.standalone


def test_uncacheable_shapes_and_normalisation() -> None:
    with pytest.raises(NotCacheableError):
        request_keys(_chat(("user", "Hi"), ("assistant", "Hello")))
    with pytest.raises(NotCacheableError):
        request_keys(_chat(("user", "   ")))
    assert normalise("  How do  I reset my PASSWORD?? ") == "how do i reset my password"
    assert is_deterministic(Params()) and is_deterministic(Params(temperature=0.0))
    assert not is_deterministic(Params(temperature=0.7))
    assert tool_key(ScopeId("t"), "w", '{"a": 1, "b": [1, 2]}') == tool_key(
        ScopeId("t"), "w", '{"b":[1,2],"a":1}'
    )
    assert tool_key(ScopeId("t"), "w", "{}") != tool_key(ScopeId("t2"), "w", "{}")


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("Hi, quick one: how do I reset my password?", "How do I reset my password?"),
        ("Good morning! Is the pharmacy open?", "Is the pharmacy open?"),
        ("Hey there, question: can I pay by card?", "Can I pay by card?"),
        ("Which one is faster?", "Which of them is faster?"),
        ("How much is the cheapest one?", "What is the price of the cheapest one?"),
        ("What is the check-in time?", "What time is check-in?"),
    ],
)
def test_greetings_and_pronoun_one_do_not_trip_the_guards(query: str, cached: str) -> None:
    assert check(query, cached).ok, check(query, cached)


@pytest.mark.parametrize(
    ("query", "cached", "guard"),
    [
        # A greeting is dropped only before punctuation; what follows is still compared.
        ("Hi, quick one: is the pharmacy open on Sunday?", "Is the pharmacy open on Monday?", "dates"),
        ("Hello: how do I add two users?", "How do I add one user?", "numbers"),
        ("Is one server enough?", "Are two servers enough?", "numbers"),
        ("Transfer money from checking to savings", "Transfer money from savings to checking", "roles"),
        ("is go faster than rust?", "is rust faster than go?", "roles"),
        ("does the hare win against the tortoise", "does the tortoise win against the hare", "roles"),
    ],
)
def test_verification_rejects_swapped_roles_and_keeps_rejecting_after_a_greeting(
    query: str, cached: str, guard: str
) -> None:
    assert check(query, cached).guard == guard


def test_a_turn_that_is_only_a_greeting_is_kept_whole() -> None:
    assert check("Good morning!", "Good evening!").guard == "dates"

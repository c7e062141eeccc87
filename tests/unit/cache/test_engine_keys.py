"""The engine remembers recent requests' keys (a Store after the Lookup of the same request) and
recent turns' normalised forms (a session's next chat sends its earlier turns again): what it
remembers is exactly what hashing the request gives, within keys_cache_bytes and
turns_cache_bytes."""

from __future__ import annotations

import dataclasses
from typing import Any

from services.cache.cache import CacheEngine
from services.cache.config import CacheSettings
from services.cache.keys import ChatRequest, Message, Params, ScopeId, request_keys
from services.cache.store import StoreOptions, open_store
from services.kit.config import ServerSettings
from tests.unit.cache.test_isolation_property import SameVectorEmbedder


def _engine(keys_cache_bytes: int, turns_cache_bytes: int = 1024 * 1024) -> CacheEngine:
    settings = dataclasses.replace(
        CacheSettings(server=ServerSettings(service="cache")),
        keys_cache_bytes=keys_cache_bytes,
        turns_cache_bytes=turns_cache_bytes,
    )
    return CacheEngine(settings, open_store("memory://", StoreOptions(dim=8)), SameVectorEmbedder())


def _conversation(answer: str, question: str = "And in June?", **changes: Any) -> ChatRequest:
    request = ChatRequest(
        scope=ScopeId("t1", "", "default"),
        model="m1",
        messages=(
            Message("system", "Be brief."),
            Message("user", "What did we sell in May?"),
            Message("assistant", answer),
            Message("user", question),
        ),
        params=Params(stop=("\n\n",)),
    )
    return dataclasses.replace(request, **changes)


def test_remembered_keys_are_the_requests_own_keys() -> None:
    engine = _engine(1024 * 1024)
    variants = [
        _conversation("40 pairs."),
        _conversation("41 pairs."),  # another earlier answer: another conversation state
        _conversation("40 pairs.", "and in june"),  # the same question, normalised alike
        _conversation("40 pairs.", scope=ScopeId("t2", "", "default")),
        _conversation("40 pairs.", model="m2"),
        _conversation("40 pairs.", params=Params(stop=("END",))),
    ]
    for _ in range(2):  # the second round is answered from memory
        for request in variants:
            assert engine.keys(request) == request_keys(request, space=engine.embedder.name)
    partitions = {engine.keys(r).partition for r in variants}
    assert len(partitions) == 5  # all but the re-cased question differ in their state


def test_remembered_requests_stay_within_their_bytes() -> None:
    budget = 4096
    engine = _engine(budget)
    for i in range(200):
        engine.keys(_conversation(f"{i} pairs."))
        assert engine._keys.held <= budget
    assert 0 < len(engine._keys) < 200
    # Nothing is remembered when remembering is off, and keys are still right.
    off = _engine(0)
    request = _conversation("40 pairs.")
    assert off.keys(request) == request_keys(request, space=off.embedder.name) and not off._keys
    assert not _engine(0, turns_cache_bytes=0)._turns


def _session(turns: int) -> ChatRequest:
    """A session's chat after `turns` exchanges: its earlier turns, then a new question."""
    messages = [Message("system", "Be brief.")]
    for i in range(turns):
        messages += [Message("user", f"Question {i}?"), Message("assistant", f"Answer {i}.")]
    messages.append(Message("user", f"Question {turns}?"))
    return ChatRequest(scope=ScopeId("t1", "u1", "default"), model="m1", messages=tuple(messages))


def test_a_sessions_next_chat_normalises_only_its_new_turns(monkeypatch: Any) -> None:
    normalised: list[str] = []
    original = Message.canonical

    def counted(message: Message) -> list[Any]:
        normalised.append(message.content)
        return original(message)

    monkeypatch.setattr(Message, "canonical", counted)
    engine = _engine(0)  # no request is remembered whole: each chat is a new request anyway
    for turns in range(1, 30):
        request = _session(turns)
        assert engine.keys(request) == request_keys(request, space=engine.embedder.name, canonical=original)
    # Each earlier turn was normalised once, when it first appeared (the question and answer of
    # one chat are earlier turns of the next): 2 per chat, not the whole conversation each time.
    # (The checks above hash with the unremembered `original`, which is not counted.)
    assert len(normalised) == 2 * 29
    assert len(set(normalised)) == len(normalised)


def test_remembered_turns_stay_within_their_bytes_and_keys_stay_right() -> None:
    budget = 4096
    engine = _engine(0, turns_cache_bytes=budget)
    for turns in range(1, 60):
        request = _session(turns)
        assert engine.keys(request) == request_keys(request, space=engine.embedder.name)
        assert engine._turns.held <= budget
    assert 0 < len(engine._turns) < 2 * 59

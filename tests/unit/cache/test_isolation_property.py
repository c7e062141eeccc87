"""Property: whatever is stored, a lookup never returns an entry of another scope, even when
every vector is identical (similarity 1.0 with everything)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.cache.cache import Answer, CacheEngine
from services.cache.config import CacheSettings
from services.cache.embedder import Vectors
from services.cache.guards import check
from services.cache.keys import ChatRequest, Message, ScopeId
from services.cache.store import StoreOptions, open_store
from services.kit.config import ServerSettings


class SameVectorEmbedder:
    """Every text embeds to the same unit vector: only the scope can keep entries apart."""

    name = "same-vector"

    async def embed(self, texts: Sequence[str]) -> Vectors:
        rows = np.zeros((len(texts), 8), dtype=np.float32)
        rows[:, 0] = 1.0
        return rows

    async def start(self) -> None:
        return None

    def ready(self) -> None:
        return None

    async def close(self) -> None:
        return None


TEXTS = ["how do i reset my password", "where is my order", "tell me a joke", "what is the privacy policy"]
scopes = st.tuples(
    st.sampled_from(["t1", "t2"]), st.sampled_from(["", "u1"]), st.sampled_from(["default", "x"])
)
models = st.sampled_from(["m1", "m2"])
systems = st.sampled_from(["S1", "S2"])
operation = st.tuples(scopes, models, systems, st.sampled_from(TEXTS))


def _request(scope: tuple[str, str, str], model: str, system: str, text: str) -> ChatRequest:
    return ChatRequest(
        scope=ScopeId(*scope), model=model, messages=(Message("system", system), Message("user", text))
    )


def test_the_texts_pass_the_guards_pairwise() -> None:
    # Otherwise "not found in the same scope" below could be a guard's doing.
    assert all(check(a, b).ok for a in TEXTS for b in TEXTS)


@settings(max_examples=60, deadline=None)
@given(
    stored=st.lists(operation, min_size=1, max_size=12), lookups=st.lists(operation, min_size=1, max_size=12)
)
def test_hits_always_come_from_the_same_scope(
    stored: list[tuple[tuple[str, str, str], str, str, str]],
    lookups: list[tuple[tuple[str, str, str], str, str, str]],
) -> None:
    async def run() -> None:
        engine = CacheEngine(
            CacheSettings(server=ServerSettings(service="cache")),
            open_store("memory://", StoreOptions(dim=8)),
            SameVectorEmbedder(),
        )
        for scope, model, system, text in stored:
            owner = repr((scope, model, system)).encode()
            result = await engine.store_answer(
                _request(scope, model, system, text),
                Answer(owner, "stop", False, "answer"),
                ttl=None,
                attributes={},
                allow_nondeterministic=False,
            )
            assert result.stored
        for scope, model, system, text in lookups:
            found = await engine.lookup(
                _request(scope, model, system, text),
                semantic=True,
                allow_nondeterministic=False,
                threshold=0.01,
            )
            if found.hit:
                assert found.entry is not None
                assert found.entry.payload == repr((scope, model, system)).encode()
            else:
                # Anything stored in the same scope (model and system prompt) must be found.
                assert (scope, model, system) not in {(o[0], o[1], o[2]) for o in stored}

    asyncio.run(run())

"""The semantic cache end to end, through the edge: paraphrases are served with their
similarity, near-miss traps and other tenants are not, follow-ups need the same conversation."""

from __future__ import annotations

import pytest
from ballast.cache.v1 import cache_pb2
from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2

from services.testing import Suite
from tests.e2e.conftest import new_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")


def chat(text: str, session_id: str = "") -> edge_pb2.ChatRequest:
    return edge_pb2.ChatRequest(
        session_id=session_id, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]
    )


async def test_paraphrase_served_semantically_and_traps_are_not(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    first = await suite.edge.Chat(chat("How do I cancel my subscription?"), metadata=tenant.auth())
    assert not first.cache_hit
    paraphrase = await suite.edge.Chat(chat("How can I cancel my subscription?"), metadata=tenant.auth())
    assert paraphrase.cache_hit and 0.95 <= paraphrase.cache_similarity < 1.0
    assert paraphrase.message.content == first.message.content
    # Cosine 0.98, but the negation guard refuses it.
    trap = await suite.edge.Chat(chat("How do I not cancel my subscription?"), metadata=tenant.auth())
    assert not trap.cache_hit
    other = await new_tenant(suite)
    assert not (
        await suite.edge.Chat(chat("How can I cancel my subscription?"), metadata=other.auth())
    ).cache_hit
    stats = await suite.cache.GetStats(
        cache_pb2.GetStatsRequest(scope=cache_pb2.Scope(tenant_id=tenant.tenant_id))
    )
    totals = {
        name: sum(getattr(ns, name) for ns in stats.namespaces)
        for name in ("semantic_hits", "guard_rejections")
    }
    assert totals["semantic_hits"] >= 1 and totals["guard_rejections"] >= 1


async def test_follow_up_is_only_served_in_the_same_conversation(suite: Suite) -> None:
    tenant = await new_tenant(suite)
    auth = tenant.auth()
    shoes = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(title="shoes"), metadata=auth)
    ).session
    hats = (
        await suite.edge.CreateSession(edge_pb2.CreateSessionRequest(title="hats"), metadata=auth)
    ).session
    await suite.edge.Chat(chat("Do you sell running shoes?", session_id=shoes.session_id), metadata=auth)
    await suite.edge.Chat(chat("Do you sell winter hats?", session_id=hats.session_id), metadata=auth)
    follow = await suite.edge.Chat(
        chat("How much is the cheapest one?", session_id=shoes.session_id), metadata=auth
    )
    assert not follow.cache_hit
    other = await suite.edge.Chat(
        chat("How much is the cheapest one?", session_id=hats.session_id), metadata=auth
    )
    assert not other.cache_hit

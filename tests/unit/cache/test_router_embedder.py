"""The cache with embeddings from the router's Embed RPC (the router's simulated provider)."""

from __future__ import annotations

from ballast.cache.v1 import cache_pb2

from services.cache.app import CacheApp
from services.cache.embedder import RouterEmbedder
from tests.conftest import SuiteFactory
from tests.unit.cache.helpers import lookup, store


async def test_semantic_tier_through_router_embeddings(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(
        ["router", "cache"], {"BALLAST_CACHE_EMBEDDER": "router", "BALLAST_CACHE_FILE": "/none.yaml"}
    )
    app = suite.running["cache"].app
    assert isinstance(app, CacheApp) and isinstance(app.embedder, RouterEmbedder)
    assert (await suite.cache.Store(store("How do I reset my password?", "Use the link."))).stored
    near = await suite.cache.Lookup(lookup("How do I reset my password now?", threshold=0.5))
    assert near.hit and near.tier == cache_pb2.HIT_TIER_SEMANTIC and 0.5 <= near.similarity < 1.0
    trap = await suite.cache.Lookup(lookup("How do I reset my password on Sunday?", threshold=0.3))
    assert not trap.hit and "dates guard" in trap.miss_reason

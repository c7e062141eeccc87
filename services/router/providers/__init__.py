"""Provider adapters: the router's chat model translated to each provider's HTTP API (httpx)."""

from services.router.providers.base import Adapter, Outcome, ProviderError, build_adapter

__all__ = ["Adapter", "Outcome", "ProviderError", "build_adapter"]

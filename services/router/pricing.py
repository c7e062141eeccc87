"""Cost of a call in micro-dollars from the catalog's prices (micro-dollars per million tokens)."""

from __future__ import annotations

from dataclasses import dataclass

from services.router.catalog import Model
from services.router.model import Usage

_MILLION = 1_000_000


@dataclass(frozen=True)
class Cost:
    input_micros: int
    output_micros: int

    @property
    def total_micros(self) -> int:
        return self.input_micros + self.output_micros


def _scaled(tokens: int, price_per_mtok: int) -> int:
    # Rounded half up, in integers: no float drift on large bills.
    return (tokens * price_per_mtok + _MILLION // 2) // _MILLION


def cost_of(model: Model, usage: Usage) -> Cost:
    """Cost by the provider's price sheet: cache reads and cache writes at their own prices
    (Anthropic: 0.1x and 1.25x input), the rest of the input at the input price; one rounding."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_input_tokens, usage.input_tokens - cached)
    uncached = usage.input_tokens - cached - written
    input_micros = (
        uncached * model.input_price_micros_per_mtok
        + cached * model.cached_input_price_micros_per_mtok
        + written * model.cache_write_price
        + _MILLION // 2
    ) // _MILLION
    return Cost(input_micros, _scaled(usage.output_tokens, model.output_price_micros_per_mtok))


def estimate(model: Model, input_tokens: int, output_tokens: int) -> int:
    """Upper-bound estimate before the call, for RoutingHints.max_cost_micros."""
    return _scaled(input_tokens, model.input_price_micros_per_mtok) + _scaled(
        output_tokens, model.output_price_micros_per_mtok
    )

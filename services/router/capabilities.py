"""A request against one model's capabilities (catalog `capabilities:`), before any call.

A model that takes no `temperature` (reasoning models, Anthropic models with extended thinking)
answers a request that sets one with a 400, or ignores it. The catalog says per model which
sampling parameters it takes and what to do with the others: drop them (the request still runs,
without them) or reject the request with INVALID_ARGUMENT naming the field. A request with tools
never goes to a model without tool use.
"""

from __future__ import annotations

from dataclasses import replace

from services.kit.errors import InvalidArgument
from services.router.catalog import Model
from services.router.model import ChatRequest, Params


def used_params(params: Params) -> list[str]:
    """The sampling parameters a request sets, by GenerationParams field name."""
    used = []
    if params.temperature is not None:
        used.append("temperature")
    if params.top_p is not None:
        used.append("top_p")
    if params.stop:
        used.append("stop")
    if params.seed is not None:
        used.append("seed")
    return used


def refusal(model: Model, request: ChatRequest) -> InvalidArgument | None:
    """Why `model` cannot take `request` (None when it can, possibly after dropping parameters)."""
    capabilities = model.capabilities
    if request.tools and not capabilities.tools:
        return InvalidArgument("tools", f"model {model.id!r} does not take tools")
    if capabilities.unsupported_params == "reject":
        for name in used_params(request.params):
            if name not in capabilities.params:
                return InvalidArgument(
                    f"params.{name}",
                    f"model {model.id!r} does not take {name} (its catalog entry rejects it); leave it unset",
                )
    return None


def fit(model: Model, request: ChatRequest) -> ChatRequest:
    """The request as `model` takes it: sampling parameters it does not take are left out."""
    accepted = model.capabilities.params
    params = request.params
    dropped = [name for name in used_params(params) if name not in accepted]
    if not dropped:
        return request
    params = replace(
        params,
        temperature=None if "temperature" in dropped else params.temperature,
        top_p=None if "top_p" in dropped else params.top_p,
        stop=() if "stop" in dropped else params.stop,
        seed=None if "seed" in dropped else params.seed,
    )
    return replace(request, params=params)

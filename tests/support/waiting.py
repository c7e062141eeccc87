"""Waiting for something without betting on how fast the machine is.

A test that needs a condition polls for it with a generous deadline: on a slow or busy
machine it only takes longer, it does not fail. The deadline exists so that a condition
that never comes fails the test with a message instead of hanging it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

# Long enough that no healthy run on a loaded CI machine comes near it.
DEFAULT_WITHIN = 30.0


@overload
async def eventually(
    check: Callable[[], Awaitable[T]], *, what: str, within: float = ..., interval: float = ...
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T], *, what: str, within: float = ..., interval: float = ...
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    what: str,
    within: float = DEFAULT_WITHIN,
    interval: float = 0.02,
) -> Any:
    """Polls `check` until it returns something truthy, and returns that; fails naming `what`."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not seen within {within:g}s (last: {result!r})")
        await asyncio.sleep(interval)


async def until_passes(
    block: Callable[[], Awaitable[None]], *, within: float = DEFAULT_WITHIN, interval: float = 0.05
) -> None:
    """Runs `block` (which asserts) until it passes; after the deadline its last failure stands.

    For state that settles asynchronously (spans ending, metrics recorded after a reply): the
    assertions are written once and keep their messages.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            await block()
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(interval)

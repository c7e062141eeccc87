"""The test suite's waiting helpers: they return as soon as the condition holds and fail,
with a message, when it never does."""

from __future__ import annotations

import pytest

from tests.support.waiting import eventually, until_passes


async def test_eventually_returns_the_first_truthy_result() -> None:
    calls = iter([0, None, "", 7, 8])
    assert await eventually(lambda: next(calls), what="a number", interval=0) == 7


async def test_eventually_awaits_an_async_check() -> None:
    seen: list[int] = []

    async def grows() -> int:
        seen.append(1)
        return len(seen) if len(seen) >= 3 else 0

    assert await eventually(grows, what="three calls", interval=0) == 3


async def test_eventually_names_what_never_came() -> None:
    with pytest.raises(AssertionError, match="the impossible: not seen within"):
        await eventually(lambda: False, what="the impossible", within=0.01, interval=0)


async def test_until_passes_keeps_the_last_failure_of_a_block_that_never_passes() -> None:
    attempts: list[int] = []

    async def block() -> None:
        attempts.append(1)
        assert len(attempts) < 0, f"attempt {len(attempts)}"

    with pytest.raises(AssertionError, match="attempt"):
        await until_passes(block, within=0.01, interval=0)
    assert attempts


async def test_until_passes_returns_once_the_block_passes() -> None:
    attempts: list[int] = []

    async def block() -> None:
        attempts.append(1)
        assert len(attempts) >= 3

    await until_passes(block, interval=0)
    assert len(attempts) == 3

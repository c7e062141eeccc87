"""Stream text grouped per flush interval (services/router/coalesce.py), against a source this
test feeds by hand: what went out is checked after the loop has run everything it can, so no
assertion depends on how fast the machine is (only the last test waits for a timer to fire)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.router.coalesce import coalesce_text
from services.router.model import Delta, ToolCallDelta
from tests.support.waiting import eventually

HOUR = 3600.0  # an interval that never ends within a test: only the stream's events flush text


class Source:
    """An event stream whose events arrive when the test says so."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    def send(self, *events: object) -> None:
        for event in events:
            self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[object]:
        try:
            while True:
                event = await self._queue.get()
                if isinstance(event, Exception):
                    raise event
                if event is None:
                    return
                yield event
        finally:
            self.closed = True


class Relay:
    """Runs coalesce_text over a source in a task, collecting what it yields."""

    def __init__(self, source: Source, interval: float) -> None:
        self.out: list[object] = []
        self.error: BaseException | None = None
        self._stream = coalesce_text(source.events(), interval)
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for event in self._stream:
                self.out.append(event)
        except Exception as exc:
            self.error = exc

    async def settle(self) -> None:
        """Lets every ready callback run (no timer is due within a test's HOUR interval)."""
        for _ in range(20):
            await asyncio.sleep(0)

    def texts(self) -> list[str]:
        return [e.text for e in self.out if isinstance(e, Delta)]


async def test_the_first_delta_goes_at_once_and_later_text_waits_for_the_interval() -> None:
    source = Source()
    relay = Relay(source, HOUR)
    source.send(Delta("Hel"))
    await relay.settle()
    assert relay.texts() == ["Hel"]
    source.send(Delta("lo"), Delta(", "), Delta("world"))
    await relay.settle()
    assert relay.texts() == ["Hel"], "text within the interval is held"
    source.send("done", None)
    await relay.task
    # The end flushes what was held, in order and whole, before the final event.
    assert relay.out == [Delta("Hel"), Delta("lo, world"), "done"]
    assert relay.error is None


async def test_tool_call_deltas_and_other_events_are_not_held_and_keep_their_place() -> None:
    source = Source()
    relay = Relay(source, HOUR)
    tool = Delta(tool_calls=(ToolCallDelta(index=0, id="call_1", name="lookup"),))
    source.send("start", Delta("a"))
    await relay.settle()
    source.send(Delta("b"), Delta("c"), tool)
    await relay.settle()
    assert relay.out == ["start", Delta("a"), Delta("bc"), tool]
    source.send(Delta("d"))
    await relay.settle()
    assert relay.out[-1] == tool, "text after a tool call still waits for the interval"
    source.send(None)
    await relay.task
    assert relay.out == ["start", Delta("a"), Delta("bc"), tool, Delta("d")]


async def test_an_error_comes_after_the_text_that_arrived_before_it() -> None:
    source = Source()
    relay = Relay(source, HOUR)
    source.send(Delta("partial "))
    await relay.settle()
    source.send(Delta("ans"), Delta("wer"), ConnectionError("provider went away"))
    await relay.task
    assert relay.texts() == ["partial ", "answer"]
    assert isinstance(relay.error, ConnectionError)


async def test_text_that_arrived_together_leaves_together_at_once() -> None:
    source = Source()
    relay = Relay(source, HOUR)
    source.send(Delta("one "), Delta("read"))
    await relay.settle()
    assert relay.texts() == ["one read"]


async def test_no_interval_relays_every_event_as_it_came() -> None:
    source = Source()
    relay = Relay(source, 0.0)
    source.send(Delta("a"), Delta("b"), "done", None)
    await relay.task
    assert relay.out == [Delta("a"), Delta("b"), "done"]


async def test_a_caller_that_goes_away_stops_reading_the_provider() -> None:
    source = Source()
    relay = Relay(source, HOUR)
    source.send(Delta("a"), Delta("b"))
    await relay.settle()
    relay.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await relay.task
    await relay._stream.aclose()  # as the gRPC server closes a cancelled handler's stream
    assert source.closed, "the provider stream is closed with the call"


async def test_closing_the_grouped_stream_between_events_stops_reading_the_provider() -> None:
    source = Source()
    stream = coalesce_text(source.events(), HOUR)
    source.send(Delta("a"))
    assert await anext(stream) == Delta("a")
    source.send(Delta("b"))  # read by the grouping's own task while the caller holds "a"
    await stream.aclose()  # as a gRPC server closes a handler whose caller went away
    assert source.closed


async def test_held_text_goes_out_when_the_interval_is_up_without_waiting_for_more() -> None:
    source = Source()
    relay = Relay(source, 0.05)
    source.send(Delta("first"))
    await relay.settle()
    source.send(Delta("sec"), Delta("ond"))
    await eventually(lambda: relay.texts() == ["first", "second"], what="the held text flushed")
    assert not relay.task.done()
    source.send(None)
    await relay.task

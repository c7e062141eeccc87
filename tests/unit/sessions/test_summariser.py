"""The router summariser's prompt: every turn kind shown, long turns clipped."""

from __future__ import annotations

from ballast.common.v1 import common_pb2

from services.sessions.summariser import transcript


def test_transcript_shows_every_turn_kind_and_clips_long_ones() -> None:
    messages = [
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="weather in Paris?"),
        common_pb2.ChatMessage(
            role=common_pb2.ROLE_ASSISTANT,
            tool_calls=[common_pb2.ToolCall(id="c1", name="weather", arguments_json='{"city":"Paris"}')],
        ),
        common_pb2.ChatMessage(
            role=common_pb2.ROLE_TOOL, tool_call_id="c1", content="x" * 500, is_error=True
        ),
    ]
    text = transcript("earlier: greeted", messages, max_chars=100)
    assert text.startswith("Summary so far:\nearlier: greeted")
    assert "[user] weather in Paris?" in text
    assert '[assistant calls tool weather (c1)] {"city":"Paris"}' in text
    assert "[tool result error for c1] " + "x" * 100 + " [...]" in text
    assert "x" * 101 not in text
    assert "(none)" in transcript("", messages)

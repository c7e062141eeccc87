"""The production summariser: a budget model behind the router (RouterService/Complete)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from ballast.common.v1 import common_pb2
from ballast.router.v1 import router_pb2, router_pb2_grpc

from services.kit.errors import Unavailable
from services.sessions.model import Scope

_INSTRUCTIONS = (
    "You maintain the running summary of a conversation between a user and an AI assistant. "
    "Rewrite the summary so that it also covers the new turns. Keep facts, names, numbers, "
    "decisions, open questions, tool results that matter and the user's preferences; drop "
    "pleasantries. Write plain prose in the conversation's language, at most {limit} tokens. "
    "Answer with the summary only."
)

_ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def transcript(previous: str, messages: Sequence[common_pb2.ChatMessage], max_chars: int = 4000) -> str:
    """The prompt: the previous summary and the turns to fold, each clipped to max_chars."""
    lines = [f"Summary so far:\n{previous or '(none)'}", "", "New turns:"]
    for message in messages:
        role = _ROLE_NAMES.get(message.role, "unknown")
        if message.role == common_pb2.ROLE_TOOL:
            status = " error" if message.is_error else ""
            lines.append(
                f"[tool result{status} for {message.tool_call_id}] {_clip(message.content, max_chars)}"
            )
            continue
        if message.content:
            lines.append(f"[{role}] {_clip(message.content, max_chars)}")
        for call in message.tool_calls:
            lines.append(
                f"[{role} calls tool {call.name} ({call.id})] {_clip(call.arguments_json, max_chars)}"
            )
    return "\n".join(lines)


class RouterSummariser:
    """Asks the router for a completion with the configured model (alias `budget` by default)."""

    def __init__(
        self, channel: grpc.aio.Channel, model: str, timeout: float, max_turn_chars: int = 4000
    ) -> None:
        self._stub = router_pb2_grpc.RouterServiceStub(channel)
        self._model = model
        self._timeout = timeout
        self._max_turn_chars = max_turn_chars

    async def summarise(
        self, scope: Scope, previous: str, messages: Sequence[common_pb2.ChatMessage], max_tokens: int
    ) -> str:
        request = router_pb2.CompleteRequest(
            model=self._model,
            messages=[
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_SYSTEM, content=_INSTRUCTIONS.format(limit=max_tokens)
                ),
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_USER, content=transcript(previous, messages, self._max_turn_chars)
                ),
            ],
            params=common_pb2.GenerationParams(max_output_tokens=max_tokens),
            caller=common_pb2.Caller(tenant_id=scope.tenant_id, user_id=scope.user_id),
        )
        try:
            reply = await self._stub.Complete(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"summariser: router answered {exc.code().name}: {exc.details()}") from exc
        text = reply.message.content.strip()
        if not text:
            raise Unavailable("summariser: the router returned an empty summary")
        return text

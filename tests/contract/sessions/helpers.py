"""Builders shared by the sessions tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc

from services.testing import Suite

if TYPE_CHECKING:
    from ballast.sessions.v1.sessions_pb2_grpc import SessionsServiceAsyncStub


def caller(tenant: str = "t1", user: str = "u1") -> common_pb2.Caller:
    return common_pb2.Caller(tenant_id=tenant, user_id=user)


def user_turn(text: str) -> sessions_pb2.Turn:
    return sessions_pb2.Turn(message=common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text))


def assistant_turn(
    text: str, *, input_tokens: int = 0, output_tokens: int = 0, cost: int = 0, model: str = ""
) -> sessions_pb2.Turn:
    return sessions_pb2.Turn(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=text),
        usage=common_pb2.Usage(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        ),
        cost_micros=cost,
        model=model,
    )


def tool_call_turn(*calls: tuple[str, str, str]) -> sessions_pb2.Turn:
    return sessions_pb2.Turn(
        message=common_pb2.ChatMessage(
            role=common_pb2.ROLE_ASSISTANT,
            tool_calls=[common_pb2.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in calls],
        )
    )


def tool_result_turn(call_id: str, text: str) -> sessions_pb2.Turn:
    return sessions_pb2.Turn(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content=text, tool_call_id=call_id)
    )


def stub(suite: Suite) -> SessionsServiceAsyncStub:
    """The async-typed stub (Suite.sessions is typed with the sync stub)."""
    return sessions_pb2_grpc.SessionsServiceStub(suite.channel("sessions"))

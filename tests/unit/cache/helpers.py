"""Request builders shared by the cache tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ballast.cache.v1 import cache_pb2
from ballast.common.v1 import common_pb2

SYSTEM = "You are the help desk of Acme Stores."


def scope(tenant: str = "t1", namespace: str = "", user: str = "") -> cache_pb2.Scope:
    return cache_pb2.Scope(tenant_id=tenant, user_id=user, namespace=namespace)


def conversation(question: str, history: Sequence[tuple[str, str]] = (), system: str = SYSTEM) -> list[Any]:
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system)] if system else []
    for user, assistant in history:
        messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=user))
        messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=assistant))
    messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question))
    return messages


def answer(text: str, finish: int = common_pb2.FINISH_REASON_STOP) -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        message=common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=text),
        finish_reason=finish,  # type: ignore[arg-type]
        usage=common_pb2.Usage(input_tokens=20, output_tokens=30, total_tokens=50),
        model="gpt-test",
    )


def lookup(
    question: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    semantic: bool = True,
    tenant: str = "t1",
    namespace: str = "",
    user: str = "",
    model: str = "gpt-test",
    system: str = SYSTEM,
    **kw: Any,
) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(
        scope=scope(tenant, namespace, user),
        model=model,
        messages=conversation(question, history, system),
        semantic=semantic,
        **kw,
    )


def store(
    question: str,
    reply: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    tenant: str = "t1",
    namespace: str = "",
    user: str = "",
    model: str = "gpt-test",
    system: str = SYSTEM,
    finish: int = common_pb2.FINISH_REASON_STOP,
    **kw: Any,
) -> cache_pb2.StoreRequest:
    return cache_pb2.StoreRequest(
        scope=scope(tenant, namespace, user),
        model=model,
        messages=conversation(question, history, system),
        answer=answer(reply, finish),
        **kw,
    )

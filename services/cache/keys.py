"""Scope keys and exact keys of chat requests, tool calls and retrievals.

The partition of an answer is a hash of everything that changes what the right answer is,
except the new user turn itself: tenant, user, namespace, model, system prompt, tool
schema, stop sequences and the prior conversation (every turn before the last user
message, its texts normalised as the exact tier normalises a turn: this is the conversation
state a follow-up's answer depends on, so "and in June?" after two different questions never
shares an answer). Entries never match across partitions, whatever their similarity. The prompt
text is never part of a partition key; it is hashed into the exact key only.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROLE_SYSTEM = "system"
ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"
ROLE_TOOL = "tool"


@dataclass(frozen=True)
class ScopeId:
    tenant_id: str
    user_id: str = ""
    namespace: str = "default"


@dataclass(frozen=True)
class ToolCallData:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCallData, ...] = ()
    tool_call_id: str = ""
    is_error: bool = False

    def canonical(self) -> list[Any]:
        return [
            self.role,
            # Tool output keeps its exact text: its case can be data (ids, codes).
            normalise(self.content) if self.role in (ROLE_USER, ROLE_ASSISTANT) else self.content,
            self.name,
            [[c.id, c.name, canonical_json_or_text(c.arguments_json)] for c in self.tool_calls],
            self.tool_call_id,
            self.is_error,
        ]


@dataclass(frozen=True)
class ToolSchema:
    name: str
    description: str
    parameters_json_schema: str


@dataclass(frozen=True)
class Params:
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    scope: ScopeId
    model: str
    messages: tuple[Message, ...]
    tools: tuple[ToolSchema, ...] = ()
    params: Params = field(default_factory=Params)


@dataclass(frozen=True)
class RequestKeys:
    """What the cache derives from one chat request."""

    # Hard partition (hex sha256): entries only ever match within it.
    partition: str
    # Exact-tier key within the partition (hex sha256 of partition + normalised turn).
    exact: str
    # The new user turn (what is embedded and what the guards read).
    text: str
    # No prior turns: the only requests the semantic tier serves.
    standalone: bool


def _digest(value: Any) -> str:
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()


def canonical_json(text: str) -> str:
    """Sorted keys, no insignificant whitespace; raises ValueError when `text` is not JSON."""
    try:
        value = json.loads(text) if text.strip() else {}
    except RecursionError:
        # Nested deeper than the parser goes: not JSON this service can key on.
        raise ValueError("JSON nested too deeply") from None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def canonical_json_or_text(text: str) -> str:
    try:
        return canonical_json(text)
    except ValueError:
        return text


_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s?!.。？！]+$")


def normalise(text: str) -> str:
    """The exact tier's view of a turn: NFKC, case-folded, whitespace collapsed, trailing
    punctuation dropped ("How do I reset my password?" == "how do i reset my password")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _SPACE.sub(" ", text).strip()
    return _TRAILING.sub("", text)


class NotCacheableError(Exception):
    """The request's shape makes it uncacheable; the message says why (a miss reason)."""


def request_keys(
    request: ChatRequest, *, space: str = "", canonical: Callable[[Message], list[Any]] = Message.canonical
) -> RequestKeys:
    """Partition and exact key of a chat request; `space` names the embedding space so that
    vectors of different embedders never meet; `canonical` gives an earlier turn's normalised
    form (Message.canonical, or one that remembers it). Raises NotCacheableError."""
    messages = request.messages
    if not messages or messages[-1].role != ROLE_USER:
        raise NotCacheableError("the last message is not a user turn")
    last = messages[-1]
    if not last.content.strip():
        raise NotCacheableError("the user turn is empty")
    leading = 0
    while leading < len(messages) - 1 and messages[leading].role == ROLE_SYSTEM:
        leading += 1
    system = [m.content for m in messages[:leading]]
    prior = [canonical(m) for m in messages[leading:-1]]
    tools = sorted(
        [t.name, t.description, canonical_json_or_text(t.parameters_json_schema)] for t in request.tools
    )
    partition = _digest(
        {
            # 2: earlier turns are normalised (case, spacing, trailing punctuation).
            "v": 2,
            "tenant": request.scope.tenant_id,
            "user": request.scope.user_id,
            "namespace": request.scope.namespace,
            "model": request.model,
            "system": _digest(system),
            "tools": _digest(tools),
            "prior": _digest(prior),
            "stop": sorted(request.params.stop),
            "speaker": last.name,
            "space": space,
        }
    )
    exact = _digest([partition, normalise(last.content)])
    return RequestKeys(partition=partition, exact=exact, text=last.content, standalone=not prior)


def tool_key(scope: ScopeId, tool_name: str, arguments_json: str) -> str:
    """Exact key of a tool result. Raises ValueError when the arguments are not JSON."""
    return _digest(
        ["tool", scope.tenant_id, scope.user_id, scope.namespace, tool_name, canonical_json(arguments_json)]
    )


def retrieval_key(scope: ScopeId, index_name: str, index_version: str, query: str, top_k: int) -> str:
    return _digest(
        [
            "retrieval",
            scope.tenant_id,
            scope.user_id,
            scope.namespace,
            index_name,
            index_version,
            normalise(query),
            top_k,
        ]
    )


def index_version_key(scope: ScopeId, index_name: str) -> str:
    # Versions belong to the tenant's index, not to one user of it.
    return _digest(["index-version", scope.tenant_id, scope.namespace, index_name])


def is_deterministic(params: Params) -> bool:
    """Only an explicit temperature > 0 marks a request as sampling; unset means the
    caller accepts the deployment's default answer (the edge sets it when it matters)."""
    return params.temperature is None or params.temperature <= 0.0

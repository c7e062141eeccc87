"""Checks on what callers send, each failure naming the field (INVALID_ARGUMENT)."""

from __future__ import annotations

import json
import math
import re

from ballast.common.v1 import common_pb2
from ballast.edge.v1 import edge_pb2

from services.edge.config import EdgeSettings
from services.kit.errors import InvalidArgument

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ROLES = {common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL}


def check_id(field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return
    if not _ID.match(value):
        raise InvalidArgument(field, "must be 1-128 characters of letters, digits, '_', '-', '.', ':'")


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = {ord("{"): 1, ord("["): 1, ord("}"): -1, ord("]"): -1}


def json_depth_exceeds(value: str, max_depth: int) -> bool:
    """Whether `value`'s arrays and objects nest deeper than `max_depth` (brackets inside
    strings do not count); cheap enough to run before the parser, which would recurse."""
    depth = 0
    for char in _JSON_STRING.sub("", value):
        step = _BRACKETS.get(ord(char))
        if step is not None:
            depth += step
            if depth > max_depth:
                return True
    return False


def check_json_object(field: str, value: str, *, max_depth: int, required: bool = False) -> None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return
    if json_depth_exceeds(value, max_depth):
        raise InvalidArgument(
            field, f"nests arrays and objects deeper than {max_depth} levels (BALLAST_EDGE_MAX_JSON_DEPTH)"
        )
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(field, "must be a JSON object")


def validate_chat(request: edge_pb2.ChatRequest, settings: EdgeSettings, field: str = "") -> None:
    prefix = f"{field}." if field else ""
    check_id(f"{prefix}session_id", request.session_id, required=False)
    if not request.messages:
        raise InvalidArgument(f"{prefix}messages", "at least one message is required")
    if len(request.messages) > settings.max_messages:
        raise InvalidArgument(f"{prefix}messages", f"at most {settings.max_messages} messages per request")
    total = len(request.system_prompt)
    for index, message in enumerate(request.messages):
        where = f"{prefix}messages[{index}]"
        if message.role not in _ROLES:
            raise InvalidArgument(
                f"{where}.role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
        if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
            raise InvalidArgument(f"{where}.tool_call_id", "is required for ROLE_TOOL messages")
        if message.tool_calls and message.role != common_pb2.ROLE_ASSISTANT:
            raise InvalidArgument(f"{where}.tool_calls", "only ROLE_ASSISTANT messages carry tool calls")
        if not message.content and not message.tool_calls:
            raise InvalidArgument(f"{where}.content", "must not be empty")
        for call_index, call in enumerate(message.tool_calls):
            if not _TOOL_NAME.match(call.name):
                raise InvalidArgument(
                    f"{where}.tool_calls[{call_index}].name", "must match [A-Za-z0-9_-]{1,64}"
                )
            check_json_object(
                f"{where}.tool_calls[{call_index}].arguments_json",
                call.arguments_json,
                max_depth=settings.max_json_depth,
            )
        total += len(message.content)
    if total > settings.max_content_chars:
        raise InvalidArgument(
            f"{prefix}messages",
            f"content totals {total} characters; the limit is {settings.max_content_chars}",
        )
    if request.messages[-1].role not in (common_pb2.ROLE_USER, common_pb2.ROLE_TOOL):
        raise InvalidArgument(f"{prefix}messages", "the last message must be ROLE_USER or ROLE_TOOL")
    if len(request.tools) > settings.max_tools:
        raise InvalidArgument(f"{prefix}tools", f"at most {settings.max_tools} tools per request")
    names: set[str] = set()
    for index, tool in enumerate(request.tools):
        if not _TOOL_NAME.match(tool.name):
            raise InvalidArgument(f"{prefix}tools[{index}].name", "must match [A-Za-z0-9_-]{1,64}")
        if tool.name in names:
            raise InvalidArgument(f"{prefix}tools[{index}].name", f"duplicate tool {tool.name!r}")
        names.add(tool.name)
        check_json_object(
            f"{prefix}tools[{index}].parameters_json_schema",
            tool.parameters_json_schema,
            max_depth=settings.max_json_depth,
        )
    choice = request.tool_choice
    if choice.mode == common_pb2.TOOL_CHOICE_MODE_NAMED and choice.name not in names:
        raise InvalidArgument(f"{prefix}tool_choice.name", "must name one of the request's tools")
    params = request.params
    if params.HasField("temperature") and (
        math.isnan(params.temperature) or not 0.0 <= params.temperature <= 2.0
    ):
        raise InvalidArgument(f"{prefix}params.temperature", "must be between 0 and 2")
    if params.HasField("top_p") and (math.isnan(params.top_p) or not 0.0 < params.top_p <= 1.0):
        raise InvalidArgument(f"{prefix}params.top_p", "must be in (0, 1]")
    if not 0 <= params.max_output_tokens <= settings.max_output_tokens:
        raise InvalidArgument(
            f"{prefix}params.max_output_tokens", f"must be between 0 and {settings.max_output_tokens}"
        )
    if len(params.stop) > 4:
        raise InvalidArgument(f"{prefix}params.stop", "at most 4 stop sequences")
    if not 0 <= request.context_token_budget <= settings.max_context_tokens:
        raise InvalidArgument(
            f"{prefix}context_token_budget", f"must be between 0 and {settings.max_context_tokens}"
        )
    if len(request.idempotency_key) > 128:
        raise InvalidArgument(f"{prefix}idempotency_key", "at most 128 characters")
    if request.cache_namespace:
        check_id(f"{prefix}cache_namespace", request.cache_namespace)
    if request.cache_mode not in edge_pb2.CacheMode.values():
        raise InvalidArgument(f"{prefix}cache_mode", "unknown cache mode")

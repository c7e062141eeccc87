"""What a provider's error means for routing, and what of it a caller may see.

Each provider says "out of credit", "bad key" or "slow down" in its own way; `http_error` turns a
failed response into one ProviderError whose outcome tells the gateway what to do (fail over,
cool down, take the provider out of rotation, or give the caller's mistake back). The caller sees
only a summary in Ballast's own words (HTTP status and a category, and the request field when
the provider named one in a plain form): a provider that echoes the request's Authorization
header in its error body must not hand the key to a client. The raw body goes to the log, with
secrets redacted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import httpx

from services.router.catalog import Model, Provider
from services.router.providers.base import (
    HeadersSink,
    Headroom,
    Outcome,
    ProviderError,
    parse_headroom,
    parse_retry_after,
)

log = logging.getLogger("ballast.router.providers")

# Ballast's categories: the only words about a provider error that reach a caller.
INVALID_REQUEST = "invalid_request"
REQUEST_TOO_LARGE = "request_too_large"
AUTHENTICATION = "authentication"
PERMISSION = "permission"
NOT_FOUND = "not_found"
OUT_OF_CREDIT = "out_of_credit"
RATE_LIMITED = "rate_limited"
OVERLOADED = "overloaded"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
CONFLICT = "conflict"

# OpenAI error codes that mean the account cannot pay (429 insufficient_quota is the common one).
_OPENAI_NO_CREDIT = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})
# Anthropic answers a spent balance or a reached spend limit with a 400 invalid_request_error.
_ANTHROPIC_NO_CREDIT = re.compile(r"credit balance|spend(ing)? limit|usage limits?", re.IGNORECASE)
# A provider's `param` is passed on only when it looks like a request field name.
_FIELD = re.compile(r"^[a-z_][a-z0-9_.\[\]]{0,63}$")
# Longest raw body kept in a log line.
_LOGGED_BODY = 2000

_SECRET_PATTERNS = (
    (re.compile(r"(?i)\bbearer\s+[^\s\"',;}]+"), "Bearer [REDACTED]"),
    (
        re.compile(
            r"(?i)\b(authorization|x-api-key|api-key|api_key|apikey)(\"?\s*[:=]\s*\"?)"
            r"(?:(?:basic|bearer|token)\s+)?[^\s\"',;}]+"
        ),
        r"\1\2[REDACTED]",
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), "sk-[REDACTED]"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secrets and without anything shaped like an API key or bearer token."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "[REDACTED]")
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _error_object(body: bytes) -> dict[str, Any]:
    """The `error` object both formats nest their details in ({} when there is none)."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return error
    return {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _category(provider: Provider, status: int, error: dict[str, Any]) -> tuple[Outcome, str, bool]:
    """(outcome, category, caller_fault) for an HTTP error status and the body's error object."""
    kind = _text(error.get("type"))
    code = _text(error.get("code"))
    if provider.wire == "openai":
        if kind in _OPENAI_NO_CREDIT or code in _OPENAI_NO_CREDIT:
            return Outcome.QUOTA_EXHAUSTED, OUT_OF_CREDIT, False
        if status == 401:
            return Outcome.AUTH_ERROR, AUTHENTICATION, False
    else:
        if status == 402 or kind == "billing_error":
            return Outcome.QUOTA_EXHAUSTED, OUT_OF_CREDIT, False
        if status == 400 and _ANTHROPIC_NO_CREDIT.search(_text(error.get("message"))):
            return Outcome.QUOTA_EXHAUSTED, OUT_OF_CREDIT, False
        if status == 401 or kind == "authentication_error":
            return Outcome.AUTH_ERROR, AUTHENTICATION, False
        if status == 403 or kind == "permission_error":
            return Outcome.AUTH_ERROR, PERMISSION, False
    if status == 429:
        return Outcome.RATE_LIMITED, RATE_LIMITED, False
    if status == 529 or kind == "overloaded_error":
        return Outcome.SERVER_ERROR, OVERLOADED, False
    if status >= 500:
        return Outcome.SERVER_ERROR, SERVER_ERROR, False
    if status == 408:
        return Outcome.SERVER_ERROR, TIMEOUT, False
    if status == 409:
        return Outcome.SERVER_ERROR, CONFLICT, False
    # A key the provider refuses for one model (OpenAI 403) or a model name it does not know (404)
    # is the catalog's problem, not the caller's: another candidate may well succeed.
    if status == 401:
        return Outcome.CLIENT_ERROR, AUTHENTICATION, False
    if status == 403:
        return Outcome.CLIENT_ERROR, PERMISSION, False
    if status == 404:
        return Outcome.CLIENT_ERROR, NOT_FOUND, False
    if status == 413:
        return Outcome.CLIENT_ERROR, REQUEST_TOO_LARGE, True
    return Outcome.CLIENT_ERROR, INVALID_REQUEST, True


def _field(provider: Provider, error: dict[str, Any]) -> str:
    """The request field the provider blamed: OpenAI's `param`; Anthropic has none, but starts
    its validation messages with the field's path ("temperature: Input should be ...")."""
    param = _text(error.get("param"))
    if not param and provider.wire == "anthropic":
        param = _text(error.get("message")).partition(": ")[0]
    if not _FIELD.match(param) or (provider.api_key and provider.api_key in param):
        return ""
    return param


def http_error(
    provider: Provider, status: int, body: bytes, headroom: Headroom | None, *, stream_event: bool = False
) -> ProviderError:
    """The ProviderError for a failed response (or an error event inside a stream).

    Its message is a summary safe to show a caller; the raw body is logged, redacted."""
    error = _error_object(body)
    outcome, category, caller_fault = _category(provider, status, error)
    field = _field(provider, error)
    where = "error in stream" if stream_event else f"HTTP {status}"
    summary = f"{where}: {category}" + (f" (field {field})" if field else "")
    # Rate limits and overloads come in storms and say nothing new: their bodies at debug level.
    level = logging.DEBUG if category in (RATE_LIMITED, OVERLOADED) else logging.INFO
    log.log(
        level,
        "provider error",
        extra={
            "provider": provider.name,
            "http_status": status,
            "category": category,
            "body": redact(body[:_LOGGED_BODY].decode("utf-8", "replace"), [provider.api_key]),
        },
    )
    retry_after = None
    if outcome is Outcome.RATE_LIMITED or outcome is Outcome.SERVER_ERROR:
        retry_after = headroom.retry_after if headroom is not None else None
    return ProviderError(
        outcome,
        summary,
        http_status=status,
        retry_after=retry_after,
        caller_fault=caller_fault,
        category=category,
        field=field,
    )


def check_response(
    provider: Provider,
    model: Model,
    response: httpx.Response,
    body: bytes | None,
    sink: HeadersSink,
    max_reset_wait: float,
) -> None:
    """Tells the sink the response's rate-limit state; raises the ProviderError of an error status.

    A 429 without retry-after waits until the provider's reset time for the exhausted limit,
    never longer than `max_reset_wait` (a wrong clock or header must not bench a provider)."""
    status = response.status_code
    headroom = parse_headroom(response.headers, status)
    if (
        headroom is not None
        and headroom.retry_after is not None
        and parse_retry_after(response.headers) is None
    ):
        # The wait came from a reset header, not from a retry-after the provider asked for.
        headroom = replace(headroom, retry_after=min(headroom.retry_after, max_reset_wait))
    sink(model, status, headroom)
    if status >= 400:
        raise http_error(provider, status, body or b"", headroom)


def stream_error(provider: Provider, data: dict[str, Any]) -> ProviderError:
    """An error event in the middle of a stream (OpenAI `{"error": ...}`, Anthropic `event: error`)."""
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    kind = _text((error or {}).get("type"))
    status = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}.get(kind, 500)
    return http_error(provider, status, json.dumps(data).encode(), None, stream_event=True)

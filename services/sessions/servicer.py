"""gRPC transport of SessionsService: validate → domain → response."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import grpc
from ballast.common.v1 import common_pb2
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc

from services.kit.errors import InvalidArgument
from services.kit.protos import seconds
from services.sessions.config import SessionsSettings
from services.sessions.model import NewTurn, Scope, SessionRecord
from services.sessions.sessions import Sessions
from services.sessions.turns import fill_proto, new_turn, timestamp, to_proto

Context = grpc.aio.ServicerContext[Any, Any]

_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_MAX_ID_TEXT = 256
_MAX_TITLE = 1024
_MAX_KEY = 256
_ROLES = (common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL)


def _scope(caller: common_pb2.Caller) -> Scope:
    for name in ("tenant_id", "user_id"):
        value = getattr(caller, name)
        if not value:
            raise InvalidArgument(f"caller.{name}", "required")
        if len(value) > _MAX_ID_TEXT:
            raise InvalidArgument(f"caller.{name}", f"at most {_MAX_ID_TEXT} characters")
    return Scope(caller.tenant_id, caller.user_id)


def _session_id(value: str, *, required: bool = True) -> str:
    if not value and not required:
        return value
    if not _ID.match(value):
        raise InvalidArgument(
            "session_id", "1 to 128 characters of letters, digits and . _ : @ -" if value else "required"
        )
    return value


def _patience(context: Context) -> float | None:
    """How long a call may wait on the server and still answer before its deadline."""
    remaining = context.time_remaining()
    return None if remaining is None else remaining * 0.8


def session_proto(record: SessionRecord) -> sessions_pb2.Session:
    c = record.counters
    return sessions_pb2.Session(
        session_id=record.session_id,
        tenant_id=record.tenant_id,
        user_id=record.user_id,
        version=record.version,
        title=record.title,
        metadata=record.metadata,
        counters=sessions_pb2.SessionCounters(
            turns=c.turns,
            tool_calls=c.tool_calls,
            input_tokens=c.input_tokens,
            output_tokens=c.output_tokens,
            cost_micros=c.cost_micros,
        ),
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        expires_at=timestamp(record.expires_at),
        summarized_turns=record.summarized_seq,
    )


class SessionsServicer(sessions_pb2_grpc.SessionsServiceServicer):
    def __init__(self, sessions: Sessions, settings: SessionsSettings) -> None:
        self._sessions = sessions
        self._settings = settings

    async def CreateSession(
        self, request: sessions_pb2.CreateSessionRequest, context: Context
    ) -> sessions_pb2.CreateSessionResponse:
        scope = _scope(request.caller)
        session_id = _session_id(request.session_id, required=False)
        if len(request.title) > _MAX_TITLE:
            raise InvalidArgument("title", f"at most {_MAX_TITLE} characters")
        if len(request.metadata) > self._settings.max_metadata_entries:
            raise InvalidArgument("metadata", f"at most {self._settings.max_metadata_entries} entries")
        for key, value in request.metadata.items():
            if not key or len(key) > _MAX_ID_TEXT or len(value) > _MAX_TITLE:
                raise InvalidArgument(
                    f"metadata[{key[:64]}]",
                    f"keys of 1 to {_MAX_ID_TEXT} characters, values of at most {_MAX_TITLE}",
                )
        ttl: float | None = None
        if request.HasField("ttl"):
            ttl = seconds(request.ttl)
            if ttl <= 0 or ttl > self._settings.max_ttl:
                raise InvalidArgument("ttl", f"more than 0s and at most {self._settings.max_ttl:g}s")
        record = await self._sessions.create(scope, session_id, request.title, request.metadata, ttl)
        return sessions_pb2.CreateSessionResponse(session=session_proto(record))

    async def GetSession(
        self, request: sessions_pb2.GetSessionRequest, context: Context
    ) -> sessions_pb2.GetSessionResponse:
        scope = _scope(request.caller)
        record = await self._sessions.get(scope, _session_id(request.session_id))
        return sessions_pb2.GetSessionResponse(session=session_proto(record))

    async def ListSessions(
        self, request: sessions_pb2.ListSessionsRequest, context: Context
    ) -> sessions_pb2.ListSessionsResponse:
        scope = _scope(request.caller)
        if request.page_size < 0:
            raise InvalidArgument("page_size", "0 (the default) or more")
        records, token = await self._sessions.list_sessions(scope, request.page_size, request.page_token)
        return sessions_pb2.ListSessionsResponse(
            sessions=[session_proto(r) for r in records], next_page_token=token
        )

    async def DeleteSession(
        self, request: sessions_pb2.DeleteSessionRequest, context: Context
    ) -> sessions_pb2.DeleteSessionResponse:
        scope = _scope(request.caller)
        await self._sessions.delete(scope, _session_id(request.session_id))
        return sessions_pb2.DeleteSessionResponse()

    async def DeleteUserData(
        self, request: sessions_pb2.DeleteUserDataRequest, context: Context
    ) -> sessions_pb2.DeleteUserDataResponse:
        scope = _scope(request.caller)
        return sessions_pb2.DeleteUserDataResponse(deleted_sessions=await self._sessions.delete_user(scope))

    def _validate_turns(self, turns: Any) -> None:
        if not turns:
            raise InvalidArgument("turns", "at least one turn")
        if len(turns) > self._settings.max_turns_per_append:
            raise InvalidArgument("turns", f"at most {self._settings.max_turns_per_append} per append")
        for i, turn in enumerate(turns):
            message = turn.message
            where = f"turns[{i}]"
            if message.role not in _ROLES:
                raise InvalidArgument(f"{where}.message.role", "one of system, user, assistant, tool")
            if turn.ByteSize() > self._settings.max_message_bytes:
                raise InvalidArgument(where, f"at most {self._settings.max_message_bytes} bytes")
            if message.tool_calls and message.role != common_pb2.ROLE_ASSISTANT:
                raise InvalidArgument(f"{where}.message.tool_calls", "only assistant turns call tools")
            for j, call in enumerate(message.tool_calls):
                if not call.id:
                    raise InvalidArgument(f"{where}.message.tool_calls[{j}].id", "required")
                if not call.name:
                    raise InvalidArgument(f"{where}.message.tool_calls[{j}].name", "required")
            if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
                raise InvalidArgument(f"{where}.message.tool_call_id", "required for tool turns")
            if message.role != common_pb2.ROLE_TOOL and message.tool_call_id:
                raise InvalidArgument(f"{where}.message.tool_call_id", "only tool turns answer a call")
            if not message.content and not message.tool_calls:
                raise InvalidArgument(f"{where}.message.content", "required (or tool_calls)")
            for name in ("token_count", "cost_micros"):
                if getattr(turn, name) < 0:
                    raise InvalidArgument(f"{where}.{name}", "0 or more")
            for name in ("input_tokens", "output_tokens", "cached_input_tokens", "total_tokens"):
                if getattr(turn.usage, name) < 0:
                    raise InvalidArgument(f"{where}.usage.{name}", "0 or more")

    async def AppendTurns(
        self, request: sessions_pb2.AppendTurnsRequest, context: Context
    ) -> sessions_pb2.AppendTurnsResponse:
        scope = _scope(request.caller)
        session_id = _session_id(request.session_id)
        if request.expected_version < -1:
            raise InvalidArgument("expected_version", "-1 (append at the head) or a version of 0 or more")
        if len(request.idempotency_key) > _MAX_KEY:
            raise InvalidArgument("idempotency_key", f"at most {_MAX_KEY} characters")
        self._validate_turns(request.turns)
        if len(request.request_fingerprint) > _MAX_KEY * 4:
            raise InvalidArgument("request_fingerprint", f"at most {_MAX_KEY * 4} characters")
        tokenizer = self._sessions.tokenizer

        async def prepare() -> list[NewTurn]:
            if request.ByteSize() > self._settings.tokenize_in_thread_bytes:
                # Counting a large message takes milliseconds; keep the event loop serving meanwhile.
                return await asyncio.to_thread(lambda: [new_turn(turn, tokenizer) for turn in request.turns])
            return [new_turn(turn, tokenizer) for turn in request.turns]

        outcome = await self._sessions.append(
            scope,
            session_id,
            request.expected_version,
            request.idempotency_key,
            prepare,
            request.request_fingerprint,
            _patience(context),
            next_turn=request.wait_for_next_turn and request.expected_version >= 0,
        )
        return sessions_pb2.AppendTurnsResponse(
            session=session_proto(outcome.session),
            turns=[to_proto(t) for t in outcome.turns],
            replayed=outcome.replayed,
            next_turn_version=outcome.next_turn or 0,
        )

    async def ListTurns(
        self, request: sessions_pb2.ListTurnsRequest, context: Context
    ) -> sessions_pb2.ListTurnsResponse:
        scope = _scope(request.caller)
        session_id = _session_id(request.session_id)
        if request.page_size < 0:
            raise InvalidArgument("page_size", "0 (the default) or more")
        turns, token = await self._sessions.list_turns(
            scope, session_id, request.page_size, request.page_token
        )
        response = sessions_pb2.ListTurnsResponse(next_page_token=token)
        add = response.turns.add
        for stored in turns:
            fill_proto(add(), stored)
        return response

    async def GetContext(
        self, request: sessions_pb2.GetContextRequest, context: Context
    ) -> sessions_pb2.GetContextResponse:
        scope = _scope(request.caller)
        session_id = _session_id(request.session_id)
        if request.token_budget <= 0 or request.token_budget > self._settings.max_token_budget:
            raise InvalidArgument("token_budget", f"from 1 to {self._settings.max_token_budget}")
        if len(request.model) > _MAX_ID_TEXT:
            raise InvalidArgument("model", f"at most {_MAX_ID_TEXT} characters")
        wait = self._settings.context_compact_wait
        remaining = context.time_remaining()
        if remaining is not None:
            # Leave the caller time to use the answer: never spend more than half its deadline.
            wait = min(wait, remaining / 2)
        window = await self._sessions.context(scope, session_id, request.token_budget, request.model, wait)
        response = sessions_pb2.GetContextResponse(
            summary=window.summary,
            summary_tokens=window.summary_tokens,
            total_tokens=window.total_tokens,
            version=window.record.version,
            omitted_turns=window.omitted_turns,
            tokenizer=window.tokenizer,
            omitted_unsummarized=window.omitted_turns > 0,
            summary_omitted=window.summary_omitted,
        )
        add = response.turns.add
        for stored, tokens in window.turns:
            fill_proto(add(), stored).token_count = tokens
        return response

    async def CompactSession(
        self, request: sessions_pb2.CompactSessionRequest, context: Context
    ) -> sessions_pb2.CompactSessionResponse:
        scope = _scope(request.caller)
        done = await self._sessions.compact(scope, _session_id(request.session_id))
        outcome = (
            sessions_pb2.COMPACTION_OUTCOME_FOLDED
            if done.folded > 0
            else sessions_pb2.COMPACTION_OUTCOME_NOTHING_TO_FOLD
        )
        return sessions_pb2.CompactSessionResponse(
            session=session_proto(done.record), outcome=outcome, folded_turns=done.folded
        )

"""Composition root of the sessions service: builds its parts and registers the servicer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import grpc
from ballast.sessions.v1 import sessions_pb2, sessions_pb2_grpc

from services.kit.clients import open_channel
from services.kit.entry import Entry
from services.kit.server import BackendProbe, ServiceApp
from services.kit.telemetry import Telemetry, store_address, store_system, trace_store
from services.sessions.compaction import CompactionPolicy, Compactor, Sleep, Summariser
from services.sessions.config import SessionsSettings
from services.sessions.contention import ContentionPolicy, ContentionQueue
from services.sessions.servicer import SessionsServicer
from services.sessions.sessions import Limits, Sessions
from services.sessions.store import SessionStore
from services.sessions.store.memory import MemoryStore
from services.sessions.summariser import RouterSummariser
from services.sessions.tokens import Tokenizers


def open_store(settings: SessionsSettings) -> SessionStore:
    if urlsplit(settings.store_url).scheme == "memory":
        return MemoryStore()
    from services.sessions.store.postgres import PostgresStore

    return PostgresStore(settings)


class SessionsApp(ServiceApp):
    name = "sessions"

    def __init__(
        self,
        settings: SessionsSettings,
        telemetry: Telemetry,
        *,
        summariser: Summariser | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(settings.server, telemetry)
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        if summariser is None and settings.compaction_enabled:
            self._channel = open_channel(settings.server.addresses["router"], settings.server, telemetry)
            summariser = RouterSummariser(
                self._channel,
                settings.compact_model,
                settings.compact_timeout,
                settings.compact_max_turn_chars,
            )
        self.store = open_store(settings)
        trace_store(
            self.store, telemetry, store_system(settings.store_url), store_address(settings.store_url)
        )
        tokenizers = Tokenizers(settings.default_encoding)
        policy = CompactionPolicy(
            threshold_tokens=settings.compact_threshold_tokens,
            keep_tokens=settings.compact_keep_tokens,
            max_turns=settings.compact_max_turns,
            summary_max_tokens=settings.summary_max_tokens,
            retry_initial=settings.compact_retry_initial,
            retry_max=settings.compact_retry_max,
            max_sessions=settings.compact_max_sessions,
            concurrency=settings.compact_concurrency,
        )
        compactor = Compactor(
            self.store, summariser, tokenizers.default, policy, clock, telemetry.meter, sleep=sleep
        )
        limits = Limits(
            default_ttl=settings.default_ttl,
            max_ttl=settings.max_ttl,
            default_page_size=settings.default_page_size,
            max_page_size=settings.max_page_size,
            context_batch=settings.context_batch,
            max_sessions_per_user=settings.max_sessions_per_user,
        )
        contention = ContentionQueue(
            ContentionPolicy(
                max_queue=settings.conflict_queue_max,
                max_wait=settings.conflict_queue_wait,
                turn_timeout=settings.conflict_turn_timeout,
            )
        )
        self.sessions = Sessions(
            self.store, tokenizers, compactor, limits, clock, telemetry.meter, contention=contention
        )

    def service_names(self) -> Sequence[str]:
        return [sessions_pb2.DESCRIPTOR.services_by_name["SessionsService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        sessions_pb2_grpc.add_SessionsServiceServicer_to_server(
            SessionsServicer(self.sessions, self.settings), server
        )

    async def start(self) -> None:
        await self.store.start()
        self.sessions.start_sweeper(
            self.settings.sweep_interval, self.settings.sweep_batch, self.settings.idempotency_ttl
        )

    def backend_probes(self) -> Mapping[str, BackendProbe]:
        # Every call reads or writes PostgreSQL (the primary); memory:// needs nothing.
        return {} if self.settings.store_url.startswith("memory:") else {"postgresql": self.store.ping}

    async def close(self) -> None:
        await self.sessions.close()
        await self.store.close()
        if self._channel is not None:
            await self._channel.close()


def build(settings: SessionsSettings, telemetry: Telemetry) -> SessionsApp:
    return SessionsApp(settings, telemetry)


# How `python -m services.sessions` and the all-in-one runner start this service.
ENTRY = Entry("sessions", SessionsSettings.from_env, build)

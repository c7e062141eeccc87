"""Where conversations live: the contract (base.py), a memory and a PostgreSQL implementation."""

from __future__ import annotations

from services.sessions.store.base import SessionStore

__all__ = ["SessionStore"]

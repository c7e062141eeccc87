"""The edge's state: the contract (base.py), memory:// for one process, redis:// for replicas."""

from __future__ import annotations

from services.edge.store.base import (
    CANCELLED,
    FAILED,
    PRIORITY_ORDER,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    CapReachedError,
    Claim,
    EdgeStore,
    JobCaps,
    JobRecord,
    idempotency_scope,
)

__all__ = [
    "CANCELLED",
    "FAILED",
    "PRIORITY_ORDER",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TERMINAL",
    "CapReachedError",
    "Claim",
    "EdgeStore",
    "JobCaps",
    "JobRecord",
    "idempotency_scope",
]

"""Redis edge store: API keys, job records and a priority queue on Redis Streams.

One stream per priority with one consumer group; workers read the highest priority
first. A delivered entry stays pending until the job ends, so a worker that dies
mid-job leaves it pending, and `reclaim` (XAUTOCLAIM) puts it back on the queue.
A job's terminal state is written once (compare-and-set in Lua), so a duplicate
delivery cannot overwrite a result. All keys share the `{edge}` hash tag, so the
scripts stay Redis Cluster-safe.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

from services.edge.auth import ApiKey
from services.edge.store import PRIORITY_ORDER, QUEUED, RUNNING, Claim, JobRecord
from services.kit.errors import Unavailable
from services.kit.redisconn import pooled_client, split_key_prefix

T = TypeVar("T")

GROUP = "workers"
_BYTES_FIELDS = ("request", "caller", "result", "error")

# KEYS[1] job hash; ARGV[1] new record JSON, ARGV[2] new state. Writes only if not yet terminal.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', ARGV[2])
return 1
"""

# KEYS[1] job hash; ARGV[1] record JSON. Marks a queued job running (a cancel may have won the race).
_START = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', 'running')
return 1
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] entry id. Acknowledges a delivery, then trims the stream's
# head up to its oldest entry still pending, or past the last one delivered when none is: entries
# leave the stream only from its head. An XDEL in the middle (a job finishing before an older one,
# as concurrent workers do) leaves a tombstone after which Redis cannot count the group's lag and
# reports it as nil, which an autoscaler on the lag (KEDA) reads as 0 while jobs wait.
_ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', pending[2])
  return 1
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
for _, group in ipairs(groups) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[1] then
    local ms, seq = string.match(fields['last-delivered-id'], '^(%d+)-(%d+)$')
    redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
  end
end
return 1
"""

# KEYS[1] parked zset, KEYS[2] stream; ARGV[1] now, ARGV[2] job key prefix. Moves due jobs to the stream.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'job_id', id)
end
return #due
"""


def stream_key(priority: str, key_prefix: str = "") -> str:
    """The Redis Stream of one priority: what workers read and an autoscaler watches (KEDA)."""
    return f"{key_prefix}{{edge}}:stream:{priority}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unavailable_when_redis_fails(cls: type[T]) -> type[T]:
    """Wraps every public coroutine so a Redis outage surfaces as UNAVAILABLE, never as INTERNAL."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(method):
            continue

        def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(method)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await method(*args, **kwargs)
                except (RedisError, OSError) as exc:
                    raise Unavailable(f"the edge store (Redis) is unavailable: {type(exc).__name__}") from exc

            return wrapper

        setattr(cls, name, wrap(method))
    return cls


def _encode(job: JobRecord) -> str:
    data: dict[str, Any] = asdict(job)
    for name in _BYTES_FIELDS:
        data[name] = base64.b64encode(data[name]).decode()
    return json.dumps(data)


def _decode(raw: bytes | str) -> JobRecord:
    data = json.loads(raw)
    for name in _BYTES_FIELDS:
        data[name] = base64.b64decode(data[name])
    return JobRecord(**data)


@_unavailable_when_redis_fails
class RedisEdgeStore:
    def __init__(
        self, url: str, *, socket_timeout: float = 2.0, job_ttl: float = 86400.0, pool_size: int = 256
    ) -> None:
        clean, prefix = split_key_prefix(url)
        # Each waiting worker holds a connection: past pool_size in use, calls wait for one.
        self._redis = pooled_client(clean, pool_size=pool_size, timeout=socket_timeout)
        self._prefix = prefix
        self._p = f"{prefix}{{edge}}:"
        self._job_ttl = int(job_ttl)
        self._finish = self._redis.register_script(_FINISH)
        self._promote = self._redis.register_script(_PROMOTE)
        self._start = self._redis.register_script(_START)
        self._ack_script = self._redis.register_script(_ACK)

    def _stream(self, priority: str) -> str:
        return stream_key(priority, self._prefix)

    def _parked(self, priority: str) -> str:
        return f"{self._p}parked:{priority}"

    def _job(self, job_id: str) -> str:
        return f"{self._p}job:{job_id}"

    async def start(self) -> None:
        for priority in PRIORITY_ORDER:
            try:
                await self._redis.xgroup_create(self._stream(priority), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def close(self) -> None:
        await self._redis.aclose()

    # --- keys -------------------------------------------------------------------------------------------

    async def put_key(self, key: ApiKey) -> None:
        data = json.dumps(asdict(key))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{self._p}key:{key.key_id}", data)
            pipe.set(f"{self._p}keyhash:{key.sha256}", key.key_id)
            pipe.zadd(f"{self._p}keys", {key.key_id: 0})
            await pipe.execute()

    async def key_by_id(self, key_id: str) -> ApiKey | None:
        raw = await self._redis.get(f"{self._p}key:{key_id}")
        return None if raw is None else ApiKey(**json.loads(raw))

    async def key_by_hash(self, sha256: str) -> ApiKey | None:
        key_id: Any = await self._redis.get(f"{self._p}keyhash:{sha256}")
        return None if key_id is None else await self.key_by_id(key_id.decode())

    async def list_keys(self, tenant_id: str, offset: int, limit: int) -> list[ApiKey]:
        ids: Any = await self._redis.zrange(f"{self._p}keys", 0, -1)
        keys = [k for k in [await self.key_by_id(i.decode()) for i in ids] if k is not None]
        keys = [k for k in keys if not tenant_id or k.tenant_id == tenant_id]
        return keys[offset : offset + limit]

    # --- jobs -------------------------------------------------------------------------------------------

    async def submit(self, job: JobRecord, idempotency_key: str) -> JobRecord:
        if idempotency_key:
            idem = f"{self._p}idem:{job.tenant_id}:{idempotency_key}"
            if not await self._redis.set(idem, job.job_id, nx=True, ex=self._job_ttl):
                existing_id: Any = await self._redis.get(idem)
                existing = await self.get_job(existing_id.decode()) if existing_id else None
                if existing is not None:
                    return existing
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._job(job.job_id), mapping={"record": _encode(job), "state": job.state})
            pipe.expire(self._job(job.job_id), self._job_ttl)
            pipe.xadd(self._stream(job.priority), {"job_id": job.job_id})
            await pipe.execute()
        return job

    async def get_job(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.hget(self._job(job_id), "record")
        return None if raw is None else _decode(raw)

    async def _save(self, job: JobRecord) -> None:
        await self._redis.hset(self._job(job.job_id), mapping={"record": _encode(job), "state": job.state})

    async def _read(self, consumer: str, block_ms: int | None) -> tuple[str, str, str] | None:
        streams: dict[Any, Any] = {self._stream(p): ">" for p in PRIORITY_ORDER}
        if block_ms is None:
            # Non-blocking, one priority at a time, highest first.
            for priority in PRIORITY_ORDER:
                reply: Any = await self._redis.xreadgroup(
                    GROUP, consumer, {self._stream(priority): ">"}, count=1
                )
                if reply:
                    entry_id, fields = reply[0][1][0]
                    return priority, entry_id.decode(), fields[b"job_id"].decode()
            return None
        blocking: Any = await self._redis.xreadgroup(GROUP, consumer, streams, count=1, block=block_ms)
        reply = blocking
        if not reply:
            return None
        stream, entries = reply[0]
        priority = stream.decode().rsplit(":", 1)[1]
        entry_id, fields = entries[0]
        return priority, entry_id.decode(), fields[b"job_id"].decode()

    async def _ack(self, priority: str, entry_id: str) -> None:
        await self._ack_script(keys=[self._stream(priority)], args=[GROUP, entry_id])

    async def claim(self, consumer: str, block: float) -> Claim | None:
        deadline = time.monotonic() + block
        while True:
            await self.promote_due()
            found = await self._read(consumer, None)
            if found is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Wake at least every 100 ms so parked jobs that fall due are promoted.
                found = await self._read(consumer, max(1, int(min(remaining, 0.1) * 1000)))
                if found is None:
                    continue
            priority, entry_id, job_id = found
            job = await self.get_job(job_id)
            if job is None or job.state != QUEUED:
                await self._ack(priority, entry_id)
                continue
            job.state = RUNNING
            job.started_at = time.time()
            job.attempts += 1
            if not await self._start(keys=[self._job(job_id)], args=[_encode(job)]):
                await self._ack(priority, entry_id)
                continue
            return Claim(job, f"{priority}|{entry_id}")

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        priority, entry_id = claim.token.split("|", 1)
        await self._redis.xclaim(self._stream(priority), GROUP, consumer, 0, [entry_id], justid=True)

    async def reclaim(self, consumer: str, min_idle: float) -> int:
        count = 0
        for priority in PRIORITY_ORDER:
            reply: Any = await self._redis.xautoclaim(
                self._stream(priority), GROUP, consumer, int(min_idle * 1000), "0-0", count=100
            )
            for entry_id, fields in reply[1]:
                job_id = fields[b"job_id"].decode() if fields else ""
                await self._ack(priority, entry_id.decode())
                job = await self.get_job(job_id) if job_id else None
                # QUEUED too: a worker that died between reading the entry and marking the job
                # running (or mid-park) leaves a pending entry for a job that is in no queue.
                if job is None or job.state not in (RUNNING, QUEUED):
                    continue
                if (
                    job.state == QUEUED
                    and await self._redis.zscore(self._parked(priority), job.job_id) is not None
                ):
                    continue
                job.state = QUEUED
                await self._save(job)
                await self._redis.xadd(self._stream(priority), {"job_id": job.job_id})
                count += 1
        return count

    async def promote_due(self) -> int:
        now = time.time()
        moved = 0
        for priority in PRIORITY_ORDER:
            moved += int(
                await self._promote(keys=[self._parked(priority), self._stream(priority)], args=[now])
            )
        return moved

    async def park(self, claim: Claim, not_before: float) -> None:
        priority, entry_id = claim.token.split("|", 1)
        job = claim.job
        job.state = QUEUED
        job.not_before = not_before
        await self._save(job)
        await self._redis.zadd(self._parked(priority), {job.job_id: not_before})
        await self._ack(priority, entry_id)

    async def finish(self, claim: Claim, job: JobRecord) -> bool:
        priority, entry_id = claim.token.split("|", 1)
        written = await self._finish(keys=[self._job(job.job_id)], args=[_encode(job), job.state])
        await self._ack(priority, entry_id)
        return bool(written)

    async def update(self, job: JobRecord) -> None:
        current = await self.get_job(job.job_id)
        if current is not None:
            current.webhook_state = job.webhook_state
            await self._redis.hset(self._job(job.job_id), "record", _encode(current))

    async def cancel(self, job_id: str) -> JobRecord | None:
        job = await self.get_job(job_id)
        if job is None:
            return None
        if job.state == QUEUED:
            job.state = "cancelled"
            job.finished_at = time.time()
            # A worker may claim it at the same moment; the CAS decides, and a claimed job sees the state.
            await self._finish(keys=[self._job(job_id)], args=[_encode(job), job.state])
            for priority in PRIORITY_ORDER:
                await self._redis.zrem(self._parked(priority), job_id)
            return await self.get_job(job_id)
        return job

    async def oldest_enqueued_at(self) -> float | None:
        # A stream entry id starts with its append time in milliseconds; parked jobs carry their due time.
        oldest: float | None = None
        for priority in PRIORITY_ORDER:
            first: Any = await self._redis.xrange(self._stream(priority), count=1)
            if first:
                entry_ms = int(first[0][0].decode().split("-", 1)[0])
                oldest = entry_ms / 1000 if oldest is None else min(oldest, entry_ms / 1000)
            parked: Any = await self._redis.zrange(self._parked(priority), 0, 0, withscores=True)
            if parked:
                oldest = float(parked[0][1]) if oldest is None else min(oldest, float(parked[0][1]))
        return oldest

    async def depth(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for priority in PRIORITY_ORDER:
            # Not yet delivered (the group's lag, what KEDA scales on) plus parked until their time.
            groups: Any = await self._redis.xinfo_groups(self._stream(priority))
            lag = next((g.get("lag") for g in groups if _text(g["name"]) == GROUP), None)
            if lag is None:
                # Redis before 7, or tombstones an older Ballast left (it deleted entries on ack):
                # entries in the stream that no worker holds (may count acknowledged ones not yet trimmed).
                length = await self._redis.xlen(self._stream(priority))
                pending: Any = await self._redis.xpending(self._stream(priority), GROUP)
                lag = int(length) - int(pending["pending"])
            parked = await self._redis.zcard(self._parked(priority))
            counts[priority] = int(lag) + int(parked)
        return counts

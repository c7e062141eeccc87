"""The shared store: entries, vectors and counters in Redis; a vector index per replica.

Design (see services/cache/README.md, "Redis store"):
- Every write (put, delete, eviction, expiry sweep) is one Lua script, so the bookkeeping
  (exact-key map, namespace and attribute sets, LRU order, byte counts) never diverges.
- Entries with a vector are announced on a Redis Stream (`changes`: put with the vector, or
  del). Each replica replays all live vectors at start (after noting the stream position),
  then tails the stream; its own writes go into its index at once. The index is only a
  candidate generator: every candidate is re-read from Redis and re-checked (partition,
  tenant, expiry) before it is served, so a stale index can cause a miss, never a wrong hit.
- Expiry: entries carry their expiry; readers ignore expired ones; a sweep (on writes and
  every `sweep_interval`) deletes them with their bookkeeping; a Redis TTL a day past the
  entry's expiry is the backstop if no replica runs.
Keys use one Redis node (scripts touch keys they compute), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.cache.store.base import COUNTERS, Entry, LocalIndexes, NamespaceCounters, StoreOptions, Vector
from services.kit.backoff import Backoff
from services.kit.errors import Unavailable
from services.kit.redisconn import pooled_client, split_key_prefix

log = logging.getLogger("ballast.cache.redis")

SEP = "\x1f"
BACKSTOP_SECONDS = 86400
SWEEP_BATCH = 500
# After the change stream fails, the follower retries after 0.1 s, doubling up to 5 s.
_FOLLOW_RETRY_FIRST = 0.1
_FOLLOW_RETRY_CAP = 5.0

_DELETE_FN = """
local P = ARGV[1]
local maxlen = ARGV[2]
local function del(id, evicted, tenant)
  local ekey = P .. 'e:' .. id
  local m = redis.call('HGET', ekey, 'm')
  if not m then
    redis.call('ZREM', P .. 'lru', id)
    redis.call('ZREM', P .. 'exp', id)
    return 0
  end
  local meta = cjson.decode(m)
  if tenant and meta.t ~= tenant then return 0 end
  local kk = P .. 'k:' .. meta.key
  if redis.call('GET', kk) == id then redis.call('DEL', kk) end
  local nsk = meta.t .. '\\31' .. meta.ns
  redis.call('ZREM', P .. 'ns:' .. nsk, id)
  for k, v in pairs(meta.a) do redis.call('SREM', P .. 'a:' .. meta.t .. '\\31' .. k .. '\\31' .. v, id) end
  redis.call('ZREM', P .. 'lru', id)
  redis.call('ZREM', P .. 'tlru:' .. meta.t, id)
  if tonumber(redis.call('ZINCRBY', P .. 'tbytes', -meta.sz, meta.t)) <= 0 then
    redis.call('ZREM', P .. 'tbytes', meta.t)
  end
  redis.call('ZREM', P .. 'exp', id)
  redis.call('DECRBY', P .. 'bytes', meta.sz)
  redis.call('DECRBY', P .. 'nsb:' .. nsk, meta.sz)
  if evicted then redis.call('HINCRBY', P .. 'st:' .. nsk, 'evictions', 1) end
  redis.call('DEL', ekey)
  if meta.hv then
    redis.call('XADD', P .. 'changes', 'MAXLEN', '~', maxlen, '*', 'op', 'del', 'id', id)
  end
  return 1
end
local function sweep(now, limit)
  local n = 0
  for _, x in ipairs(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, limit)) do
    n = n + del(x, false, nil)
  end
  return n
end
"""

_PUT = (
    _DELETE_FN
    + """
local id, meta_json, payload, vector = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now, max_bytes, backstop_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local meta = cjson.decode(meta_json)
local kk = P .. 'k:' .. meta.key
local old = redis.call('GET', kk)
if old then del(old, false, nil) end
local ekey = P .. 'e:' .. id
if vector ~= '' then
  redis.call('HSET', ekey, 'm', meta_json, 'p', payload, 'v', vector)
else
  redis.call('HSET', ekey, 'm', meta_json, 'p', payload)
end
redis.call('PEXPIRE', ekey, backstop_ms)
redis.call('SET', kk, id, 'PX', backstop_ms)
local nsk = meta.t .. '\\31' .. meta.ns
redis.call('ZADD', P .. 'ns:' .. nsk, meta.x, id)
redis.call('SADD', P .. 'tns:' .. meta.t, meta.ns)
for k, v in pairs(meta.a) do redis.call('SADD', P .. 'a:' .. meta.t .. '\\31' .. k .. '\\31' .. v, id) end
-- LRU order is a sequence, not a clock: ties (same millisecond, other replicas) stay ordered.
local seq = redis.call('INCR', P .. 'lruseq')
redis.call('ZADD', P .. 'lru', seq, id)
redis.call('ZADD', P .. 'tlru:' .. meta.t, seq, id)
redis.call('ZINCRBY', P .. 'tbytes', meta.sz, meta.t)
redis.call('ZADD', P .. 'exp', meta.x, id)
redis.call('INCRBY', P .. 'bytes', meta.sz)
redis.call('INCRBY', P .. 'nsb:' .. nsk, meta.sz)
if vector ~= '' then
  redis.call('XADD', P .. 'changes', 'MAXLEN', '~', maxlen, '*', 'op', 'put', 'id', id, 'part', meta.part, 'v', vector)
end
sweep(now, 100)
local evicted = {}
-- A tenant over its quota evicts its own least recently used entries.
local quota = tonumber(ARGV[10])
while quota > 0 and tonumber(redis.call('ZSCORE', P .. 'tbytes', meta.t) or '0') > quota do
  local victim = redis.call('ZRANGE', P .. 'tlru:' .. meta.t, 0, 0)[1]
  if not victim then break end
  if del(victim, true, nil) == 1 then table.insert(evicted, victim)
  else redis.call('ZREM', P .. 'tlru:' .. meta.t, victim) end
end
-- Over the whole bound, the tenant holding the most bytes gives way (entries stored before
-- per-tenant bookkeeping existed fall back to the global order).
while tonumber(redis.call('GET', P .. 'bytes') or '0') > max_bytes do
  local heaviest = redis.call('ZREVRANGE', P .. 'tbytes', 0, 0)[1]
  local victim = heaviest and redis.call('ZRANGE', P .. 'tlru:' .. heaviest, 0, 0)[1]
  if not victim then victim = redis.call('ZRANGE', P .. 'lru', 0, 0)[1] end
  if not victim then break end
  if del(victim, true, nil) == 1 then table.insert(evicted, victim)
  elseif heaviest then redis.call('ZREM', P .. 'tlru:' .. heaviest, victim) end
end
return evicted
"""
)

_DELETE = (
    _DELETE_FN
    + """
local tenant, namespace = ARGV[3], ARGV[4]
local n = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local ok = true
  if namespace ~= '' then
    local m = redis.call('HGET', P .. 'e:' .. id, 'm')
    ok = m and cjson.decode(m).ns == namespace
  end
  if ok then n = n + del(id, false, tenant) end
end
return n
"""
)

_SWEEP = (
    _DELETE_FN
    + """
return sweep(tonumber(ARGV[3]), tonumber(ARGV[4]))
"""
)

_GET = """
local P = ARGV[1]
local id = redis.call('GET', P .. 'k:' .. ARGV[2])
if not id then return nil end
local r = redis.call('HMGET', P .. 'e:' .. id, 'm', 'p')
if not r[1] then return nil end
local seq = redis.call('INCR', P .. 'lruseq')
redis.call('ZADD', P .. 'lru', 'XX', seq, id)
redis.call('ZADD', P .. 'tlru:' .. cjson.decode(r[1]).t, 'XX', seq, id)
return {id, r[1], r[2]}
"""


_TOUCH = """
local P = ARGV[1]
local m = redis.call('HGET', P .. 'e:' .. ARGV[2], 'm')
if not m then return end
local seq = redis.call('INCR', P .. 'lruseq')
redis.call('ZADD', P .. 'lru', 'XX', seq, ARGV[2])
redis.call('ZADD', P .. 'tlru:' .. cjson.decode(m).t, 'XX', seq, ARGV[2])
"""


def _meta(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "kind": entry.kind,
        "t": entry.tenant_id,
        "ns": entry.namespace,
        "key": entry.key,
        "part": entry.partition,
        "text": entry.text,
        "a": dict(entry.attributes),
        "c": entry.created_at,
        "x": entry.expires_at,
        "sz": entry.size,
        "hv": entry.vector is not None,
    }


def _entry(meta_raw: bytes, payload: bytes, vector: bytes | None = None) -> Entry:
    meta = json.loads(meta_raw)
    attributes = {k: v for k, v in meta["a"].items() if k}
    return Entry(
        id=meta["id"],
        kind=meta["kind"],
        tenant_id=meta["t"],
        namespace=meta["ns"],
        key=meta["key"],
        payload=payload,
        created_at=meta["c"],
        expires_at=meta["x"],
        partition=meta["part"],
        text=meta["text"],
        vector=None if not vector else np.frombuffer(vector, dtype=np.float32),
        attributes=attributes,
    )


class RedisStore:
    def __init__(self, url: str, options: StoreOptions, *, sweep_interval: float = 30.0) -> None:
        self.options = options
        redis_url, prefix = split_key_prefix(url)
        self.prefix = prefix + "cache:"
        # redis-py's stubs type replies as unions of every shape; this module knows the shapes.
        self._redis: Any = pooled_client(redis_url, pool_size=options.pool_size, timeout=options.timeout)
        # Blocking reads of the change stream get their own connection (no read timeout shorter
        # than the block).
        self._follower: Any = aioredis.from_url(redis_url, socket_connect_timeout=options.timeout)
        self._closing = False
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)
        self._sweep = self._redis.register_script(_SWEEP)
        self._get = self._redis.register_script(_GET)
        self._touch = self._redis.register_script(_TOUCH)
        self.indexes = LocalIndexes(options.dim, options.ann)
        self._last_id = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_interval = sweep_interval
        self._maxlen = str(options.stream_maxlen)
        self.synced = asyncio.Event()

    def _k(self, *parts: str) -> str:
        return self.prefix + parts[0] + SEP.join(parts[1:])

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        # The replay runs in the background: the port opens at once, and until the index is
        # rebuilt the semantic tier only misses (the exact tier reads Redis directly).
        self._last_id = ""
        self._tasks = [
            asyncio.create_task(self._follow(), name="cache-redis-follow"),
            asyncio.create_task(self._sweeper(), name="cache-redis-sweep"),
        ]

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        # redis-py can swallow a cancellation that races its read timeout (then retries the
        # blocked XREAD), so: flag, cancel again until the tasks end, bounded by the block time.
        self._closing = True
        deadline = time.monotonic() + self.options.sync_block + 2
        pending = {task for task in self._tasks if not task.done()}
        while pending and time.monotonic() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        if pending:
            log.warning("cache change stream follower did not stop in time")
        await self._follower.aclose()
        await self._redis.aclose()

    async def _replay(self) -> None:
        """Rebuilds this replica's index from Redis; the stream position is taken first, so
        changes made during the replay are applied afterwards (idempotently)."""
        started = time.perf_counter()
        last = await self._redis.xrevrange(self._k("changes"), count=1)
        self._last_id = last[0][0].decode() if last else "0-0"
        self.indexes.clear()
        now = time.time()
        chunk = 2000
        start = 0
        while True:
            ids = await self._redis.zrange(self._k("lru"), start, start + chunk - 1)
            if not ids:
                break
            start += chunk
            async with self._redis.pipeline(transaction=False) as pipe:
                for raw in ids:
                    pipe.hmget(self._k("e:", raw.decode()), "m", "v")
                rows = await pipe.execute()
            for meta_raw, vector in rows:
                if not meta_raw or not vector:
                    continue
                meta = json.loads(meta_raw)
                if meta["x"] > now:
                    self.indexes.add(meta["id"], meta["part"], np.frombuffer(vector, dtype=np.float32))
        self.synced.set()
        log.info(
            "cache index replayed",
            extra={"vectors": len(self.indexes), "seconds": round(time.perf_counter() - started, 3)},
        )

    async def _follow(self) -> None:
        block_ms = max(1, int(self.options.sync_block * 1000))
        backoff = Backoff(_FOLLOW_RETRY_FIRST, _FOLLOW_RETRY_CAP)
        while not self._closing:
            try:
                if not self._last_id:
                    await self._replay()
                replies = await self._follower.xread(
                    {self._k("changes"): self._last_id}, count=1000, block=block_ms
                )
                backoff.succeeded()
                for _, messages in replies or []:
                    for message_id, fields in messages:
                        self._apply(fields)
                        self._last_id = message_id.decode()
                    if len(messages) == 1000 and await self._trimmed_past_us():
                        self._last_id = ""  # fell behind the trimmed stream: rebuild
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, or a malformed record: rebuild, never stop following
                if self._closing:
                    return
                log.warning("cache change stream failed; resyncing", extra={"error": str(exc)})
                self._last_id = ""
                await asyncio.sleep(backoff.failed())

    async def _trimmed_past_us(self) -> bool:
        first = await self._redis.xrange(self._k("changes"), count=1)
        return bool(first) and _stream_id(first[0][0].decode()) > _stream_id(self._last_id)

    def _apply(self, fields: Mapping[bytes, bytes]) -> None:
        op = fields.get(b"op")
        entry_id = fields.get(b"id", b"").decode()
        if op == b"put":
            self.indexes.add(
                entry_id, fields[b"part"].decode(), np.frombuffer(fields[b"v"], dtype=np.float32)
            )
        elif op == b"del":
            self.indexes.remove(entry_id)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            with contextlib.suppress(RedisError, OSError):
                await self._run_sweep(time.time(), SWEEP_BATCH)

    async def _run_sweep(self, now: float, limit: int) -> int:
        return int(await self._sweep(args=[self.prefix, self._maxlen, now, limit]))

    # --- entries ----------------------------------------------------------------

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise Unavailable(f"cache store (Redis) unavailable: {exc}") from exc

    async def put(self, entry: Entry, now: float) -> None:
        vector = b"" if entry.vector is None else np.asarray(entry.vector, dtype=np.float32).tobytes()
        backstop_ms = int((entry.expires_at - now + BACKSTOP_SECONDS) * 1000)
        evicted = await self._call(
            self._put(
                args=[
                    self.prefix,
                    self._maxlen,
                    entry.id,
                    json.dumps(_meta(entry)),
                    entry.payload,
                    vector,
                    now,
                    self.options.max_bytes,
                    backstop_ms,
                    self.options.tenant_quota(entry.tenant_id),
                ]
            )
        )
        if entry.vector is not None:
            self.indexes.add(entry.id, entry.partition, entry.vector)
        for victim in evicted:
            self.indexes.remove(victim.decode())

    async def get(self, key: str, now: float) -> Entry | None:
        found = await self._call(self._get(args=[self.prefix, key, now]))
        if not found:
            return None
        entry = _entry(found[1], found[2])
        return entry if entry.expires_at > now else None

    def has_vectors(self, partition: str) -> bool:
        return self.indexes.has(partition)

    async def search(self, partition: str, vector: Vector, k: int, now: float) -> list[tuple[Entry, float]]:
        candidates = self.indexes.search(partition, vector, k)
        if not candidates:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in candidates:
                pipe.hmget(self._k("e:", entry_id), "m", "p")
            rows = await self._call(pipe.execute())
        out = []
        for (entry_id, score), (meta_raw, payload) in zip(candidates, rows, strict=True):
            if not meta_raw:
                self.indexes.remove(entry_id)  # deleted or expired elsewhere; the stream will say so too
                continue
            entry = _entry(meta_raw, payload)
            if entry.expires_at > now:
                out.append((entry, score))
        return out

    async def touch(self, entry_id: str, now: float) -> None:
        await self._call(self._touch(args=[self.prefix, entry_id]))

    async def _delete_ids(self, tenant_id: str, namespace: str, ids: list[str]) -> int:
        deleted = 0
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            deleted += int(
                await self._call(self._delete(args=[self.prefix, self._maxlen, tenant_id, namespace, *chunk]))
            )
            for entry_id in chunk:
                self.indexes.remove(entry_id)
        return deleted

    async def delete_ids(self, tenant_id: str, ids: list[str]) -> int:
        return await self._delete_ids(tenant_id, "", ids)

    async def delete_namespace(self, tenant_id: str, namespace: str) -> int:
        ids = await self._call(self._redis.zrange(self._k("ns:", tenant_id, namespace), 0, -1))
        return await self._delete_ids(tenant_id, namespace, [i.decode() for i in ids])

    async def delete_attribute(self, tenant_id: str, namespace: str | None, key: str, value: str) -> int:
        ids = await self._call(self._redis.smembers(self._k("a:", tenant_id, key, value)))
        return await self._delete_ids(tenant_id, namespace or "", sorted(i.decode() for i in ids))

    # --- counters and versions --------------------------------------------------------

    async def count(self, tenant_id: str, namespace: str, counters: Mapping[str, int]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, value in counters.items():
                if name in COUNTERS and value:
                    pipe.hincrby(self._k("st:", tenant_id, namespace), name, value)
            pipe.sadd(self._k("tns:", tenant_id), namespace)
            await self._call(pipe.execute())

    async def stats(self, tenant_id: str, namespace: str | None, now: float) -> list[NamespaceCounters]:
        await self._call(self._run_sweep(now, 10 * SWEEP_BATCH))
        if namespace is None:
            names = sorted(
                n.decode() for n in await self._call(self._redis.smembers(self._k("tns:", tenant_id)))
            )
        else:
            names = [namespace]
        async with self._redis.pipeline(transaction=False) as pipe:
            for ns in names:
                pipe.hgetall(self._k("st:", tenant_id, ns))
                pipe.zcard(self._k("ns:", tenant_id, ns))
                pipe.get(self._k("nsb:", tenant_id, ns))
            rows = await self._call(pipe.execute())
        out = []
        for i, ns in enumerate(names):
            counters, entries, size = rows[3 * i : 3 * i + 3]
            values = {k.decode(): int(v) for k, v in counters.items()}
            out.append(
                NamespaceCounters(
                    namespace=ns,
                    entries=int(entries),
                    bytes=int(size or 0),
                    **{name: values.get(name, 0) for name in COUNTERS},
                )
            )
        return out

    async def version(self, key: str) -> int:
        value = await self._call(self._redis.get(self._k("ver:", key)))
        return int(value or 0)

    async def bump_version(self, key: str) -> int:
        return int(await self._call(self._redis.incr(self._k("ver:", key))))


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms or 0), int(seq or 0)

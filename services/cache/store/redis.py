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

Redis Cluster (`?cluster=true`): every key of one tenant carries the tenant's hash tag
(`cache:{t:<tenant>}…`, the limiter's tag), so each script, and so each Lookup and Store, runs on
the one shard that owns the tenant; the scripts then keep the tenant's own LRU order, expiry set,
byte count and quota exactly as on one node. What spans tenants lives under the `{cache}` tag on
one shard and is kept by a second call after the tenant's script: the whole cache's byte count
(per tenant, which is also the list of tenants the sweeper and a replay walk), the change stream,
and the whole-cache bound (over it, the heaviest tenant's least recently used entries are evicted
by a script on that tenant's shard). On one node everything is one script, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import numpy as np
import redis.asyncio as aioredis

from services.cache.store.base import COUNTERS, Entry, LocalIndexes, NamespaceCounters, StoreOptions, Vector
from services.kit.backoff import Backoff
from services.kit.errors import Unavailable
from services.kit.redisconn import REDIS_FAILURES, cluster_option, open_client, split_key_prefix

log = logging.getLogger("ballast.cache.redis")

SEP = "\x1f"
BACKSTOP_SECONDS = 86400
SWEEP_BATCH = 500
# After the change stream fails, the follower retries after 0.1 s, doubling up to 5 s.
_FOLLOW_RETRY_FIRST = 0.1
_FOLLOW_RETRY_CAP = 5.0
# A cluster's store evicts toward the whole-cache bound in at most this many calls per write
# (each evicts as much as the excess, so one normally suffices).
_EVICT_ROUNDS = 8

# ARGV[1] the key prefix (on a cluster, the tenant's tagged prefix), ARGV[2] the change stream's
# length, or '0' on a cluster: then deleted vector ids are returned (`gone`), for the caller to
# announce on the cross-tenant stream. Scripts answer {result, gone, byte delta}. KEYS[1] only
# routes the call to the prefix's shard.
_DELETE_FN = """
local P = ARGV[1]
local maxlen = ARGV[2]
local gone = {}
local before = tonumber(redis.call('GET', P .. 'bytes') or '0')
local function outcome(result)
  return {result, gone, tonumber(redis.call('GET', P .. 'bytes') or '0') - before}
end
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
    if maxlen == '0' then gone[#gone + 1] = id
    else redis.call('XADD', P .. 'changes', 'MAXLEN', '~', maxlen, '*', 'op', 'del', 'id', id) end
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
if vector ~= '' and maxlen ~= '0' then
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
-- per-tenant bookkeeping existed fall back to the global order). 0: the caller keeps the bound.
while max_bytes > 0 and tonumber(redis.call('GET', P .. 'bytes') or '0') > max_bytes do
  local heaviest = redis.call('ZREVRANGE', P .. 'tbytes', 0, 0)[1]
  local victim = heaviest and redis.call('ZRANGE', P .. 'tlru:' .. heaviest, 0, 0)[1]
  if not victim then victim = redis.call('ZRANGE', P .. 'lru', 0, 0)[1] end
  if not victim then break end
  if del(victim, true, nil) == 1 then table.insert(evicted, victim)
  elseif heaviest then redis.call('ZREM', P .. 'tlru:' .. heaviest, victim) end
end
return outcome(evicted)
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
return outcome(n)
"""
)

_SWEEP = (
    _DELETE_FN
    + """
return outcome(sweep(tonumber(ARGV[3]), tonumber(ARGV[4])))
"""
)

# Cluster only: the tenant's least recently used entries are evicted until ARGV[4] bytes are freed.
_EVICT = (
    _DELETE_FN
    + """
local tenant, need = ARGV[3], tonumber(ARGV[4])
local evicted = {}
while before - tonumber(redis.call('GET', P .. 'bytes') or '0') < need do
  local victim = redis.call('ZRANGE', P .. 'tlru:' .. tenant, 0, 0)[1]
  if not victim then break end
  if del(victim, true, nil) == 1 then table.insert(evicted, victim)
  else redis.call('ZREM', P .. 'tlru:' .. tenant, victim) end
end
return outcome(evicted)
"""
)

# Cluster only, on the `{cache}` shard, after a tenant's script: its byte delta into the whole
# cache's count and the per-tenant counts (a tenant leaves them at 0 bytes), and the change stream
# records. ARGV: prefix, tenant, delta, stream length, put id ('' for none), put partition, put
# vector, deleted ids... Answers {bytes of the whole cache, heaviest tenant, its bytes}.
_ACCOUNT = """
local G, tenant, delta, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if delta ~= 0 then
  redis.call('INCRBY', G .. 'bytes', delta)
  if tonumber(redis.call('ZINCRBY', G .. 'tbytes', delta, tenant)) <= 0 then
    redis.call('ZREM', G .. 'tbytes', tenant)
  end
end
if ARGV[5] ~= '' then
  redis.call('XADD', G .. 'changes', 'MAXLEN', '~', maxlen, '*', 'op', 'put', 'id', ARGV[5], 'part', ARGV[6], 'v', ARGV[7])
end
for i = 8, #ARGV do
  redis.call('XADD', G .. 'changes', 'MAXLEN', '~', maxlen, '*', 'op', 'del', 'id', ARGV[i])
end
local top = redis.call('ZREVRANGE', G .. 'tbytes', 0, 0, 'WITHSCORES')
return {tonumber(redis.call('GET', G .. 'bytes') or '0'), top[1] or '', tonumber(top[2] or '0')}
"""

# ARGV[1] prefix, ARGV[2] unused (the stream length other scripts take), ARGV[3] the key or id.
_GET = """
local P = ARGV[1]
local id = redis.call('GET', P .. 'k:' .. ARGV[3])
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
local m = redis.call('HGET', P .. 'e:' .. ARGV[3], 'm')
if not m then return end
local seq = redis.call('INCR', P .. 'lruseq')
redis.call('ZADD', P .. 'lru', 'XX', seq, ARGV[3])
redis.call('ZADD', P .. 'tlru:' .. cjson.decode(m).t, 'XX', seq, ARGV[3])
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
        self._base = prefix + "cache:"
        # Kept for callers that name keys (tests, tools): the prefix of every key of this store.
        self.prefix = self._base
        # redis-py's stubs type replies as unions of every shape; this module knows the shapes.
        self._redis, self.cluster = open_client(
            redis_url, pool_size=options.pool_size, timeout=options.timeout
        )
        # Blocking reads of the change stream get their own connection (no read timeout shorter
        # than the block).
        self._follower: Any
        if self.cluster:
            self._follower = aioredis.RedisCluster.from_url(
                cluster_option(redis_url)[0],
                socket_connect_timeout=options.timeout,
                socket_timeout=options.sync_block + options.timeout,
            )
        else:
            self._follower = aioredis.from_url(redis_url, socket_connect_timeout=options.timeout)
        self._closing = False
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)
        self._sweep = self._redis.register_script(_SWEEP)
        self._get = self._redis.register_script(_GET)
        self._touch = self._redis.register_script(_TOUCH)
        self._evict = self._redis.register_script(_EVICT)
        self._account_script = self._redis.register_script(_ACCOUNT)
        self.indexes = LocalIndexes(options.dim, options.ann)
        self._last_id = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_interval = sweep_interval
        self._maxlen = str(options.stream_maxlen)
        # On a cluster the tenant scripts neither write the stream nor keep the whole bound.
        self._script_maxlen = "0" if self.cluster else self._maxlen
        self._script_max_bytes = 0 if self.cluster else options.max_bytes
        self.synced = asyncio.Event()

    def _p(self, tenant_id: str) -> str:
        """The prefix of `tenant_id`'s keys: on a cluster it carries the tenant's hash tag (the id
        percent-encoded, as the limiter's, so no id can end the tag early or forge another's)."""
        return f"{self._base}{{t:{quote(tenant_id, safe='')}}}" if self.cluster else self._base

    def _k(self, tenant_id: str, *parts: str) -> str:
        return self._p(tenant_id) + parts[0] + SEP.join(parts[1:])

    def _g(self, name: str = "") -> str:
        """A key that spans tenants (one `{cache}` slot on a cluster)."""
        return f"{self._base}{{cache}}{name}" if self.cluster else self._base + name

    async def _tenant_script(self, script: Any, tenant_id: str, *args: Any) -> Any:
        """A script on `tenant_id`'s keys (KEYS[1] routes it to the tenant's shard)."""
        prefix = self._p(tenant_id)
        return await script(keys=[prefix + "bytes"], args=[prefix, self._script_maxlen, *args])

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

    async def _tenants(self) -> list[str]:
        """Whose entries to walk: on one node all keys share one prefix (one walk, any tenant
        name); on a cluster every tenant holding bytes (counted on the `{cache}` shard)."""
        if not self.cluster:
            return [""]
        return [t.decode() for t in await self._redis.zrange(self._g("tbytes"), 0, -1)]

    async def _replay(self) -> None:
        """Rebuilds this replica's index from Redis; the stream position is taken first, so
        changes made during the replay are applied afterwards (idempotently)."""
        started = time.perf_counter()
        last = await self._redis.xrevrange(self._g("changes"), count=1)
        self._last_id = last[0][0].decode() if last else "0-0"
        self.indexes.clear()
        now = time.time()
        chunk = 2000
        for tenant_id in await self._tenants():
            prefix = self._p(tenant_id)
            start = 0
            while True:
                ids = await self._redis.zrange(prefix + "lru", start, start + chunk - 1)
                if not ids:
                    break
                start += chunk
                async with self._redis.pipeline(transaction=False) as pipe:
                    for raw in ids:
                        pipe.hmget(prefix + "e:" + raw.decode(), "m", "v")
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
                    {self._g("changes"): self._last_id}, count=1000, block=block_ms
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
        first = await self._redis.xrange(self._g("changes"), count=1)
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
            with contextlib.suppress(*REDIS_FAILURES):
                for tenant_id in await self._tenants():
                    await self._run_sweep(tenant_id, time.time(), SWEEP_BATCH)

    async def _run_sweep(self, tenant_id: str, now: float, limit: int) -> int:
        """Deletes expired entries: all tenants' on one node, `tenant_id`'s on a cluster."""
        swept, gone, delta = await self._tenant_script(self._sweep, tenant_id, now, limit)
        await self._settle(tenant_id, gone, delta)
        return int(swept)

    # --- the cross-tenant bookkeeping of a cluster ----------------------------------------

    async def _settle(
        self, tenant_id: str, gone: list[bytes], delta: int, put: tuple[str, str, bytes] | None = None
    ) -> None:
        """After a tenant's script: on one node nothing is left to do. On a cluster, its byte
        delta and stream records go to the `{cache}` shard, and over the whole-cache bound the
        heaviest tenant's least recently used entries are evicted (on its shard) until under."""
        for raw in gone:
            self.indexes.remove(raw.decode())
        if not self.cluster:
            return
        put_args: list[Any] = ["", "", ""] if put is None else list(put)
        total, heaviest, heaviest_bytes = await self._account(tenant_id, delta, put_args, gone)
        for _ in range(_EVICT_ROUNDS):
            if total <= self.options.max_bytes or not heaviest:
                return
            evicted, gone, freed = await self._tenant_script(
                self._evict, heaviest, heaviest, total - self.options.max_bytes
            )
            for raw in evicted:
                self.indexes.remove(raw.decode())
            if not evicted:
                # The count says more than the tenant holds (a replica died between its two
                # calls): set it to what the tenant's shard says.
                held = int(await self._redis.get(self._p(heaviest) + "bytes") or 0)
                freed = held - heaviest_bytes
            total, heaviest, heaviest_bytes = await self._account(heaviest, freed, ["", "", ""], gone)

    async def _account(
        self, tenant_id: str, delta: int, put_args: list[Any], gone: list[bytes]
    ) -> tuple[int, str, int]:
        total, heaviest, heaviest_bytes = await self._account_script(
            keys=[self._g("bytes")],
            args=[self._g(), tenant_id, int(delta), self._maxlen, *put_args, *gone],
        )
        return int(total), _text(heaviest), int(heaviest_bytes)

    # --- entries ----------------------------------------------------------------

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except REDIS_FAILURES as exc:
            raise Unavailable(f"cache store (Redis) unavailable: {exc}") from exc

    async def put(self, entry: Entry, now: float) -> None:
        vector = b"" if entry.vector is None else np.asarray(entry.vector, dtype=np.float32).tobytes()
        backstop_ms = int((entry.expires_at - now + BACKSTOP_SECONDS) * 1000)
        evicted, gone, delta = await self._call(
            self._tenant_script(
                self._put,
                entry.tenant_id,
                entry.id,
                json.dumps(_meta(entry)),
                entry.payload,
                vector,
                now,
                self._script_max_bytes,
                backstop_ms,
                self.options.tenant_quota(entry.tenant_id),
            )
        )
        if entry.vector is not None:
            self.indexes.add(entry.id, entry.partition, entry.vector)
        for victim in evicted:
            self.indexes.remove(victim.decode())
        put = (entry.id, entry.partition, vector) if vector else None
        await self._call(self._settle(entry.tenant_id, gone, delta, put))

    async def get(self, tenant_id: str, key: str, now: float) -> Entry | None:
        found = await self._call(self._tenant_script(self._get, tenant_id, key, now))
        if not found:
            return None
        entry = _entry(found[1], found[2])
        return entry if entry.expires_at > now and entry.tenant_id == tenant_id else None

    def has_vectors(self, partition: str) -> bool:
        return self.indexes.has(partition)

    async def search(
        self, tenant_id: str, partition: str, vector: Vector, k: int, now: float
    ) -> list[tuple[Entry, float]]:
        candidates = self.indexes.search(partition, vector, k)
        if not candidates:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in candidates:
                pipe.hmget(self._k(tenant_id, "e:", entry_id), "m", "p")
            rows = await self._call(pipe.execute())
        out = []
        for (entry_id, score), (meta_raw, payload) in zip(candidates, rows, strict=True):
            if not meta_raw:
                self.indexes.remove(entry_id)  # deleted or expired elsewhere; the stream will say so too
                continue
            entry = _entry(meta_raw, payload)
            if entry.expires_at > now and entry.tenant_id == tenant_id:
                out.append((entry, score))
        return out

    async def touch(self, tenant_id: str, entry_id: str, now: float) -> None:
        await self._call(self._tenant_script(self._touch, tenant_id, entry_id))

    async def _delete_ids(self, tenant_id: str, namespace: str, ids: list[str]) -> int:
        deleted = 0
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            n, gone, delta = await self._call(
                self._tenant_script(self._delete, tenant_id, tenant_id, namespace, *chunk)
            )
            deleted += int(n)
            for entry_id in chunk:
                self.indexes.remove(entry_id)
            await self._call(self._settle(tenant_id, gone, delta))
        return deleted

    async def delete_ids(self, tenant_id: str, ids: list[str]) -> int:
        return await self._delete_ids(tenant_id, "", ids)

    async def delete_namespace(self, tenant_id: str, namespace: str) -> int:
        ids = await self._call(self._redis.zrange(self._k(tenant_id, "ns:", tenant_id, namespace), 0, -1))
        return await self._delete_ids(tenant_id, namespace, [i.decode() for i in ids])

    async def delete_attribute(self, tenant_id: str, namespace: str | None, key: str, value: str) -> int:
        ids = await self._call(self._redis.smembers(self._k(tenant_id, "a:", tenant_id, key, value)))
        return await self._delete_ids(tenant_id, namespace or "", sorted(i.decode() for i in ids))

    # --- counters and versions --------------------------------------------------------

    async def count(self, tenant_id: str, namespace: str, counters: Mapping[str, int]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, value in counters.items():
                if name in COUNTERS and value:
                    pipe.hincrby(self._k(tenant_id, "st:", tenant_id, namespace), name, value)
            pipe.sadd(self._k(tenant_id, "tns:", tenant_id), namespace)
            await self._call(pipe.execute())

    async def stats(self, tenant_id: str, namespace: str | None, now: float) -> list[NamespaceCounters]:
        await self._call(self._run_sweep(tenant_id, now, 10 * SWEEP_BATCH))
        if namespace is None:
            names = sorted(
                n.decode()
                for n in await self._call(self._redis.smembers(self._k(tenant_id, "tns:", tenant_id)))
            )
        else:
            names = [namespace]
        async with self._redis.pipeline(transaction=False) as pipe:
            for ns in names:
                pipe.hgetall(self._k(tenant_id, "st:", tenant_id, ns))
                pipe.zcard(self._k(tenant_id, "ns:", tenant_id, ns))
                pipe.get(self._k(tenant_id, "nsb:", tenant_id, ns))
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

    async def version(self, tenant_id: str, key: str) -> int:
        value = await self._call(self._redis.get(self._k(tenant_id, "ver:", key)))
        return int(value or 0)

    async def bump_version(self, tenant_id: str, key: str) -> int:
        return int(await self._call(self._redis.incr(self._k(tenant_id, "ver:", key))))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms or 0), int(seq or 0)

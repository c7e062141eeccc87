"""Redis edge store: API keys, job records and a priority queue on Redis Streams.

One stream per priority with one consumer group; workers read the highest priority
first, and within a priority tenants take turns (see _FAIR). Beside each, a tally stream holds
one entry per job waiting, so the tally's consumer-group lag is the number of jobs waiting
(what an autoscaler reads; see _FAIR). A delivered entry stays pending until the job ends, so a worker that dies
mid-job leaves it pending, and `reclaim` (XAUTOCLAIM) puts it back on the queue.
A job's terminal state is written once (compare-and-set in Lua), so a duplicate
delivery cannot overwrite a result. All keys share the `{edge}` hash tag, so on a Redis
Cluster (`?cluster=true`) the queue lives in one slot: every script, XADD, XREADGROUP, XACK and
XAUTOCLAIM touches that one shard, and fair admission stays atomic with the claim.
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

from redis.exceptions import ResponseError

from services.edge.auth import ApiKey
from services.edge.store.base import (
    PRIORITY_ORDER,
    QUEUED,
    RUNNING,
    CapReachedError,
    Claim,
    JobCaps,
    JobRecord,
    idempotency_scope,
)
from services.kit.errors import Unavailable
from services.kit.redisconn import REDIS_FAILURES, open_client, split_key_prefix

T = TypeVar("T")

GROUP = "workers"
_BYTES_FIELDS = ("request", "caller", "result", "error")

# Fair admission (round robin across tenants within a priority): the stream holds at most one
# not-yet-delivered entry per tenant (`ready` counts them); a tenant's other jobs wait in its own
# backlog list and the next one is admitted, at the back of the stream, when a worker takes the
# previous one. Claims still go through the consumer group (pending entries, XAUTOCLAIM), so
# exactly-once claiming is unchanged; admission runs inside the same scripts as the claim, so it
# is atomic with it. `waiting` (job -> time) and `backlogged` (tenants) make depth and repair cheap.
#
# So the job stream's consumer-group lag counts tenants with a job waiting, not jobs. The tally
# stream counts jobs: every job that starts waiting (submitted, put back after its worker died, or
# due after being parked) appends one entry, and every job that stops waiting (a worker takes its
# stream entry, or it is cancelled from its tenant's backlog) reads one for the same group with
# the fixed consumer TALLY_CONSUMER, acknowledges it and trims the tally's head. The tally's lag
# (XINFO GROUPS, Redis 7+) is therefore the number of jobs waiting, which KEDA scales on.
_FAIR = """
local function tally_add(tally, job_id)
  redis.call('XADD', tally, '*', 'job_id', job_id)
end

local function tally_take(tally, group, consumer)
  local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', tally, '>')
  if not got then return end
  local id = got[1][2][1][1]
  redis.call('XACK', tally, group, id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  redis.call('XTRIM', tally, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
end

local function enqueue(stream, ready, prefix, waiting, backlogged, tally, job_id, tenant, front, now)
  tally_add(tally, job_id)
  if tonumber(redis.call('HGET', ready, tenant) or '0') < 1 then
    redis.call('XADD', stream, '*', 'job_id', job_id, 'tenant', tenant)
    redis.call('HINCRBY', ready, tenant, 1)
    return
  end
  if front then redis.call('LPUSH', prefix .. tenant, job_id) else redis.call('RPUSH', prefix .. tenant, job_id) end
  redis.call('SADD', backlogged, tenant)
  redis.call('ZADD', waiting, 'NX', now, job_id)
end

local function admit_next(stream, ready, prefix, waiting, backlogged, tenant)
  local next_id = redis.call('LPOP', prefix .. tenant)
  if not next_id then
    redis.call('SREM', backlogged, tenant)
    return false
  end
  redis.call('ZREM', waiting, next_id)
  redis.call('XADD', stream, '*', 'job_id', next_id, 'tenant', tenant)
  redis.call('HINCRBY', ready, tenant, 1)
  if redis.call('LLEN', prefix .. tenant) == 0 then redis.call('SREM', backlogged, tenant) end
  return true
end
"""

# KEYS[1] job hash, KEYS[2] stream, KEYS[3] ready, KEYS[4] waiting, KEYS[5] backlogged,
# KEYS[6..9] queued-per-tenant, queued-per-user, stored-per-tenant, stored-per-user (job -> time),
# KEYS[10] tally;
# ARGV[1] job id, ARGV[2] tenant, ARGV[3] record, ARGV[4] state, ARGV[5] ttl, ARGV[6] now,
# ARGV[7] oldest time still kept, ARGV[8..11] the four caps (0 = none), ARGV[12] backlog prefix.
# Returns 'ok', or the name of the cap that refused the job (nothing is written then).
_SUBMIT = (
    _FAIR
    + """
local names = {'queued_per_tenant', 'queued_per_user', 'stored_per_tenant', 'stored_per_user'}
for i = 1, 4 do
  redis.call('ZREMRANGEBYSCORE', KEYS[5 + i], '-inf', '(' .. ARGV[7])
  local cap = tonumber(ARGV[7 + i])
  if cap > 0 and redis.call('ZCARD', KEYS[5 + i]) >= cap then return names[i] end
end
redis.call('HSET', KEYS[1], 'record', ARGV[3], 'state', ARGV[4], 'tenant', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
for i = 6, 9 do
  redis.call('ZADD', KEYS[i], ARGV[6], ARGV[1])
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
enqueue(KEYS[2], KEYS[3], ARGV[12], KEYS[4], KEYS[5], KEYS[10], ARGV[1], ARGV[2], false, ARGV[6])
return 'ok'
"""
)

# KEYS: per priority, highest first, six keys: stream, ready, parked, waiting, backlogged, tally.
# ARGV[1] group, ARGV[2] consumer, ARGV[3] now, ARGV[4] job key prefix, ARGV[5..8] backlog
# prefixes, ARGV[9] the tally's consumer. Promotes due parked jobs, claims the next entry of the highest priority that has one
# and admits that tenant's next job. Returns {priority index, entry id, job id} or false.
_CLAIM = (
    _FAIR
    + """
for i = 0, 3 do
  local stream, ready, parked, waiting, backlogged, tally = KEYS[i*6+1], KEYS[i*6+2], KEYS[i*6+3], KEYS[i*6+4], KEYS[i*6+5], KEYS[i*6+6]
  local prefix = ARGV[5 + i]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', parked, '-inf', ARGV[3], 'LIMIT', 0, 100)) do
    redis.call('ZREM', parked, id)
    local tenant = redis.call('HGET', ARGV[4] .. id, 'tenant')
    if tenant then
      enqueue(stream, ready, prefix, waiting, backlogged, tally, id, tenant, true, ARGV[3])
    else
      tally_add(tally, id)
      redis.call('XADD', stream, '*', 'job_id', id)
    end
  end
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
  if (not reply) and redis.call('SCARD', backlogged) > 0 then
    -- Nothing undelivered in the stream, so no tenant holds a place there: any backlog left is
    -- stranded (an interrupted upgrade, a hand edit) and is admitted again.
    redis.call('DEL', ready)
    for _, tenant in ipairs(redis.call('SMEMBERS', backlogged)) do
      admit_next(stream, ready, prefix, waiting, backlogged, tenant)
    end
    reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
  end
  if reply then
    tally_take(tally, ARGV[1], ARGV[9])
    local entry = reply[1][2][1]
    local fields = entry[2]
    local job_id, tenant = '', nil
    for f = 1, #fields, 2 do
      if fields[f] == 'job_id' then job_id = fields[f + 1] elseif fields[f] == 'tenant' then tenant = fields[f + 1] end
    end
    if tenant then
      if redis.call('HINCRBY', ready, tenant, -1) <= 0 then redis.call('HDEL', ready, tenant) end
      admit_next(stream, ready, prefix, waiting, backlogged, tenant)
    end
    return {i, entry[1], job_id}
  end
end
return false
"""
)

# KEYS[1] stream, KEYS[2] ready, KEYS[3] waiting, KEYS[4] backlogged, KEYS[5] tally; ARGV[1] job id,
# ARGV[2] tenant, ARGV[3] now, ARGV[4] backlog prefix. Puts a reclaimed job back, ahead of its tenant's backlog.
_REQUEUE = (
    _FAIR
    + """
enqueue(KEYS[1], KEYS[2], ARGV[4], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], true, ARGV[3])
return 1
"""
)

# KEYS[1] job hash, KEYS[2..3] the job's queued-per-tenant and -per-user sets; ARGV[1] new record
# JSON, ARGV[2] new state, ARGV[3] job id. Writes only if not yet terminal.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'state', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
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

# KEYS: per priority, as _CLAIM's (stream, ready, parked, waiting, backlogged, tally); ARGV[1] now,
# ARGV[2] job key prefix, ARGV[3..6] backlog prefixes. Puts parked jobs that fell due back in line
# as _CLAIM does, for an edge whose workers run apart (no claim promotes them there).
_PROMOTE = (
    _FAIR
    + """
local moved = 0
for i = 0, 3 do
  local stream, ready, parked, waiting, backlogged, tally = KEYS[i*6+1], KEYS[i*6+2], KEYS[i*6+3], KEYS[i*6+4], KEYS[i*6+5], KEYS[i*6+6]
  local prefix = ARGV[3 + i]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', parked, '-inf', ARGV[1], 'LIMIT', 0, 100)) do
    redis.call('ZREM', parked, id)
    local tenant = redis.call('HGET', ARGV[2] .. id, 'tenant')
    if tenant then
      enqueue(stream, ready, prefix, waiting, backlogged, tally, id, tenant, true, ARGV[1])
    else
      tally_add(tally, id)
      redis.call('XADD', stream, '*', 'job_id', id)
    end
    moved = moved + 1
  end
end
return moved
"""
)


# KEYS[1] waiting, KEYS[2] the tenant's backlog, KEYS[3] tally; ARGV[1] job id, ARGV[2] group,
# ARGV[3] the tally's consumer. Takes a cancelled job out of its tenant's backlog (when it waits
# there) and out of the tally: it no longer waits.
_UNBACKLOG = (
    _FAIR
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LREM', KEYS[2], 1, ARGV[1])
tally_take(KEYS[3], ARGV[2], ARGV[3])
return 1
"""
)

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] least idle time in ms. Removes the
# consumer only if it exists, holds no entry (XGROUP DELCONSUMER would drop its pending entries,
# losing their jobs) and has been idle that long; 1 when removed. Checked and done at once, so a
# consumer that claims a job meanwhile is kept.
_DELCONSUMER = """
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['name'] == ARGV[2] then
    if fields['pending'] > 0 or fields['idle'] < tonumber(ARGV[3]) then return 0 end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
"""

#: The one consumer that reads the tally streams (every claim and cancel reads one entry as it).
TALLY_CONSUMER = "tally"


def stream_key(priority: str, key_prefix: str = "") -> str:
    """The Redis Stream of one priority: what workers claim from (pending entries: jobs running)."""
    return f"{key_prefix}{{edge}}:stream:{priority}"


def tally_key(priority: str, key_prefix: str = "") -> str:
    """One priority's tally stream: its consumer-group lag (group GROUP) is the number of jobs
    waiting, what an autoscaler scales the workers on (KEDA's redis-streams lagCount)."""
    return f"{key_prefix}{{edge}}:tally:{priority}"


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
                except REDIS_FAILURES as exc:
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
        self._redis, self.cluster = open_client(clean, pool_size=pool_size, timeout=socket_timeout)
        self._prefix = prefix
        self._p = f"{prefix}{{edge}}:"
        self._job_ttl = int(job_ttl)
        self._finish = self._redis.register_script(_FINISH)
        self._start = self._redis.register_script(_START)
        self._ack_script = self._redis.register_script(_ACK)
        self._promote = self._redis.register_script(_PROMOTE)
        self._submit = self._redis.register_script(_SUBMIT)
        self._claim = self._redis.register_script(_CLAIM)
        self._requeue = self._redis.register_script(_REQUEUE)
        self._unbacklog = self._redis.register_script(_UNBACKLOG)
        self._delconsumer = self._redis.register_script(_DELCONSUMER)
        self._claim_keys = [
            key
            for p in PRIORITY_ORDER
            for key in (
                self._stream(p),
                self._ready(p),
                self._parked(p),
                self._waiting(p),
                self._backlogged(p),
                self._tally(p),
            )
        ]

    def _stream(self, priority: str) -> str:
        return stream_key(priority, self._prefix)

    def _tally(self, priority: str) -> str:
        return tally_key(priority, self._prefix)

    def _parked(self, priority: str) -> str:
        return f"{self._p}parked:{priority}"

    def _job(self, job_id: str) -> str:
        return f"{self._p}job:{job_id}"

    def _ready(self, priority: str) -> str:
        return f"{self._p}ready:{priority}"

    def _waiting(self, priority: str) -> str:
        return f"{self._p}waiting:{priority}"

    def _backlogged(self, priority: str) -> str:
        return f"{self._p}backlogged:{priority}"

    def _backlog(self, priority: str, tenant: str = "") -> str:
        return f"{self._p}backlog:{priority}:{tenant}"

    def _owned(self, kind: str, job: JobRecord) -> tuple[str, str]:
        """The per-tenant and per-user sets of `kind` ("queued" or "stored") holding `job`."""
        user = idempotency_scope(job.tenant_id, job.user_id, "")
        return f"{self._p}{kind}:t:{job.tenant_id}", f"{self._p}{kind}:u:{user}"

    async def start(self) -> None:
        for priority in PRIORITY_ORDER:
            for stream in (self._stream(priority), self._tally(priority)):
                try:
                    await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def ping(self) -> None:
        await self._redis.ping()

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

    async def submit(self, job: JobRecord, idempotency_key: str, caps: JobCaps | None = None) -> JobRecord:
        idem = ""
        if idempotency_key:
            idem = f"{self._p}idem:{idempotency_scope(job.tenant_id, job.user_id, idempotency_key)}"
            if not await self._redis.set(idem, job.job_id, nx=True, ex=self._job_ttl):
                existing_id: Any = await self._redis.get(idem)
                existing = await self.get_job(existing_id.decode()) if existing_id else None
                if existing is not None:
                    return existing
        caps = caps or JobCaps()
        now = time.time()
        priority = job.priority
        refused: Any = await self._submit(
            keys=[
                self._job(job.job_id),
                self._stream(priority),
                self._ready(priority),
                self._waiting(priority),
                self._backlogged(priority),
                *self._owned("queued", job),
                *self._owned("stored", job),
                self._tally(priority),
            ],
            args=[
                job.job_id,
                job.tenant_id,
                _encode(job),
                job.state,
                self._job_ttl,
                now,
                now - self._job_ttl,
                caps.queued_per_tenant,
                caps.queued_per_user,
                caps.stored_per_tenant,
                caps.stored_per_user,
                self._backlog(priority),
            ],
        )
        if refused != b"ok":
            if idem:
                # The key names no job: a retry after jobs finish must be able to submit.
                await self._redis.delete(idem)
            raise CapReachedError(refused.decode())
        return job

    async def get_job(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.hget(self._job(job_id), "record")
        return None if raw is None else _decode(raw)

    async def _save(self, job: JobRecord) -> None:
        await self._redis.hset(self._job(job.job_id), mapping={"record": _encode(job), "state": job.state})

    async def _ack(self, priority: str, entry_id: str) -> None:
        await self._ack_script(keys=[self._stream(priority)], args=[GROUP, entry_id])

    async def claim(self, consumer: str, block: float) -> Claim | None:
        deadline = time.monotonic() + block
        prefixes = [self._backlog(p) for p in PRIORITY_ORDER]
        while True:
            found: Any = await self._claim(
                keys=self._claim_keys,
                args=[GROUP, consumer, time.time(), self._job(""), *prefixes, TALLY_CONSUMER],
            )
            if not found:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Wait for a new entry without taking it (the script claims), and wake at least
                # every 100 ms so parked jobs that fall due are promoted.
                await self._redis.xread(
                    {self._stream(p): "$" for p in PRIORITY_ORDER},
                    count=1,
                    block=max(1, int(min(remaining, 0.1) * 1000)),
                )
                continue
            priority, entry_id, job_id = PRIORITY_ORDER[int(found[0])], found[1].decode(), found[2].decode()
            job = await self.get_job(job_id) if job_id else None
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
                count += await self._put_back(priority, entry_id.decode(), fields)
        return count

    async def _put_back(self, priority: str, entry_id: str, fields: Any) -> int:
        """Acknowledges a claimed entry and puts its job back in line, ahead of its tenant's
        backlog, unless it ended or is parked; 1 when it went back."""
        job_id = fields[b"job_id"].decode() if fields else ""
        await self._ack(priority, entry_id)
        job = await self.get_job(job_id) if job_id else None
        # QUEUED too: a worker that died between reading the entry and marking the job
        # running (or mid-park) leaves a pending entry for a job that is in no queue.
        if job is None or job.state not in (RUNNING, QUEUED):
            return 0
        if job.state == QUEUED and await self._redis.zscore(self._parked(priority), job.job_id) is not None:
            return 0
        job.state = QUEUED
        await self._save(job)
        await self._requeue(
            keys=[
                self._stream(priority),
                self._ready(priority),
                self._waiting(priority),
                self._backlogged(priority),
                self._tally(priority),
            ],
            args=[job.job_id, job.tenant_id, time.time(), self._backlog(priority)],
        )
        return 1

    async def release(self, consumer: str) -> int:
        count = 0
        for priority in PRIORITY_ORDER:
            stream = self._stream(priority)
            while True:
                held: Any = await self._redis.xpending_range(
                    stream, GROUP, min="-", max="+", count=100, consumername=consumer
                )
                if not held:
                    break
                ids = [entry["message_id"] for entry in held]
                # Our own entries, read with their fields (min idle 0: we hold them already).
                entries: Any = await self._redis.xclaim(stream, GROUP, consumer, 0, ids)
                found = {entry_id for entry_id, _ in entries}
                for entry_id, fields in entries:
                    count += await self._put_back(priority, entry_id.decode(), fields)
                for entry_id in ids:
                    # An entry trimmed from the stream has no job left to put back.
                    if entry_id not in found:
                        await self._ack(priority, entry_id.decode())
            await self._delconsumer(keys=[stream], args=[GROUP, consumer, 0])
        return count

    async def reap(self, consumer: str, idle: float) -> int:
        removed = 0
        least_ms = int(idle * 1000)
        for priority in PRIORITY_ORDER:
            stream = self._stream(priority)
            consumers: Any = await self._redis.xinfo_consumers(stream, GROUP)
            for info in consumers:
                name = _text(info["name"])
                if name == consumer or int(info["pending"]) > 0 or int(info["idle"]) < least_ms:
                    continue
                removed += int(await self._delconsumer(keys=[stream], args=[GROUP, name, least_ms]))
        return removed

    async def promote_due(self) -> int:
        prefixes = [self._backlog(p) for p in PRIORITY_ORDER]
        moved: Any = await self._promote(keys=self._claim_keys, args=[time.time(), self._job(""), *prefixes])
        return int(moved)

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
        written = await self._finish(
            keys=[self._job(job.job_id), *self._owned("queued", job)],
            args=[_encode(job), job.state, job.job_id],
        )
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
            await self._finish(
                keys=[self._job(job_id), *self._owned("queued", job)], args=[_encode(job), job.state, job_id]
            )
            # Out of the parked set and its tenant's backlog; an entry already in the stream is
            # skipped by the worker that reads it.
            for priority in PRIORITY_ORDER:
                await self._redis.zrem(self._parked(priority), job_id)
            await self._unbacklog(
                keys=[
                    self._waiting(job.priority),
                    self._backlog(job.priority, job.tenant_id),
                    self._tally(job.priority),
                ],
                args=[job_id, GROUP, TALLY_CONSUMER],
            )
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
            for waiting in (self._parked(priority), self._waiting(priority)):
                first_waiting: Any = await self._redis.zrange(waiting, 0, 0, withscores=True)
                if first_waiting:
                    at = float(first_waiting[0][1])
                    oldest = at if oldest is None else min(oldest, at)
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
            # Fair admission keeps each tenant's further jobs in its backlog, outside the stream.
            backlog = await self._redis.zcard(self._waiting(priority))
            counts[priority] = int(lag) + int(parked) + int(backlog)
        return counts

    # --- settlements --------------------------------------------------------------------------------
    # One hash, field = the settlement's key (the reservation id): recorded once however often
    # a settlement is recorded, and it outlives the edge process that recorded it.

    async def put_settlement(self, key: str, record: bytes) -> None:
        await self._redis.hset(f"{self._p}settlements", key, record)

    async def pending_settlements(self, limit: int) -> list[tuple[str, bytes]]:
        if limit <= 0:
            return []
        found: Any = await self._redis.hscan(f"{self._p}settlements", 0, count=limit)
        items = [(_text(k), v.encode() if isinstance(v, str) else bytes(v)) for k, v in found[1].items()]
        return items[:limit]

    async def drop_settlement(self, key: str) -> None:
        await self._redis.hdel(f"{self._p}settlements", key)

    async def settlement_count(self) -> int:
        return int(await self._redis.hlen(f"{self._p}settlements"))
